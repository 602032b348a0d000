"""Hugging Face Transformers: a TrainerCallback that attaches a Monitor to ``Trainer.train``.

    from probescope.integrations.transformers import ProbescopeCallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[ProbescopeCallback(
        [ps.PredictionProbe(ids, labels), ps.StatsProbe()], run_dir="runs/bert")])

The Monitor starts when training starts (the Trainer's model and optimizer exist; with
``resume=True`` and ``train(resume_from_checkpoint=...)`` the run goes on from the
checkpoint's step and epoch), takes a step after every optimizer step (with gradient
accumulation, every ``gradient_accumulation_steps`` batches) and closes when training ends.

Each step's training loss is read from the model's output (its ``loss``, on the device:
nothing waits for it) and recorded the way the Trainer reports it: the mean of the step's
micro-batch losses, or their sum where the Trainer has the model normalise each by the items
of the whole accumulated batch (``num_items_in_batch``). So with ``logging_steps=1`` the
Trainer's logged losses are the same numbers, without its sync at every step. A model
whose output holds no loss (a ``compute_loss_func``, label smoothing) gets the loss the
Trainer logs, every ``logging_steps``. The loss is this process's: under torchrun the
Monitor probes on one rank (see probescope.distributed).

Everything else the Trainer logs while training is recorded at its step (``grad_norm``,
your own ``trainer.log`` values), except its timings and counters and its ``learning_rate``
(the Monitor records the rate each step used as ``lr``, every step); each
evaluation's metrics are recorded as ``valid_<name>`` (``eval_loss`` becomes ``valid_loss``,
the name LossProbe and CheckpointProbe use). Probes evaluate the model as the Trainer holds it:
on token ids, a Hugging Face model returns a ``ModelOutput``, whose ``logits`` the probes read.

A later ``train`` with the same callback records into ``RUN_DIR-fit2``, ``-fit3``, ...
(with ``resume=True``, every one goes on in the same run). The Trainer calls no callback
when ``train`` raises: use the callback as a context manager (``with ProbescopeCallback(...)
as cb: ... trainer.train()``) to close the Monitor then too, keeping the frames written so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from probescope.integrations import check_monitor_kwargs, fit_kwargs, is_scalar
from probescope.monitor import Monitor
from probescope.probes.base import Probe
from probescope.probes.loss import LossProbe
from probescope.schedule import Schedule

_OWN = ("model", "probes", "optimizer")  # what the callback passes to the Monitor itself

# What the Trainer logs that is not a series of the run: its timings, counters, the epoch
# (the Monitor counts epochs itself), the learning rate (the Monitor records the optimizer's
# own as ``lr``, at every step) and the whole run's mean loss at the end.
_NOT_SERIES = ("epoch", "total_flos", "train_loss", "num_input_tokens_seen", "learning_rate")
_NOT_SERIES_SUFFIXES = ("_runtime", "_per_second", "_flos")


class ProbescopeCallback(TrainerCallback):
    """Monitor a model while a Hugging Face ``Trainer`` trains it.

    ``probes`` (default: a LossProbe on log-spaced steps, 20 a decade: the loss of every
    step, the Trainer's logs and evaluations) and every keyword argument go to
    ``probescope.Monitor`` (``run_dir``, ``viewer``, ``snapshot``, ``cuda_graphs``, ...);
    the model and its optimizer come from the Trainer. ``model``: what the probes call
    instead, a module that holds the Trainer's model and picks the tensor they read (a
    language model's last position: ``forward(self, ids): return self.model(ids).logits[:,
    -1]``). ``monitor`` is the Monitor of the training in progress (or the last one).
    """

    def __init__(
        self, probes: Iterable[Probe] | None = None, model: nn.Module | None = None, **monitor_kwargs: Any
    ):
        check_monitor_kwargs("ProbescopeCallback", monitor_kwargs, _OWN)
        # By default the loss graph, on log-spaced steps: often early, a bounded number over a
        # long run (the whole series is in the run's history either way).
        self.probes = [LossProbe(schedule=Schedule.log_spaced(20))] if probes is None else list(probes)
        self.probed_model = model
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.fits = 0
        self._training = False
        self._losses: list[torch.Tensor] = []  # the model's losses of the step in progress
        self._shares = False  # whether they are shares of the step's loss (num_items_in_batch)
        self._step_losses = False  # whether the model's outputs gave this training's losses
        self._hook = None
        self._pending: dict[str, Any] | None = None  # a step's loss and logs, until it is taken
        self._evaluated: dict[str, Any] = {}  # and its evaluation's metrics
        self._epoch_ended = False

    def __getstate__(self) -> dict[str, Any]:
        """Without the Monitor of the last training and its hook (threads, locks: they
        belong to this process)."""
        state = dict(self.__dict__)
        state["monitor"], state["_hook"], state["_losses"], state["_pending"] = None, None, [], None
        state["_evaluated"] = {}
        return state

    def __enter__(self) -> ProbescopeCallback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.close()  # a Monitor left open by a training that raised
        self.fits += 1
        monitor_kwargs = fit_kwargs(self.monitor_kwargs, self.fits)  # a later training: RUN_DIR-fit<n>
        if monitor_kwargs.get("resume") is True and state.global_step > 0:
            # From a checkpoint: the Trainer has restored its step; the run goes on from it.
            monitor_kwargs["resume"] = (state.global_step, int(state.epoch))
        probed = model if self.probed_model is None else _holding(self.probed_model, model)
        self.monitor = Monitor(probed, self.probes, optimizer=optimizer, **monitor_kwargs)
        self._losses, self._shares, self._step_losses = [], False, False
        self._pending, self._evaluated, self._epoch_ended = None, {}, False
        self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)
        self._training = True
        self.monitor.start()

    def _read_loss(self, module, args, kwargs, output) -> None:
        """A training forward's loss (the Trainer's; not an evaluation's or a probe's)."""
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Mapping)):
            return
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach() if loss.dim() == 0 else loss.detach().reshape(()))
            self._shares = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._take_step()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        loss = None
        if len(self._losses) == 1:  # no gradient accumulation: the step's loss as it is
            loss, self._losses, self._step_losses = self._losses[0], [], True
        elif self._losses:
            losses = torch.stack(self._losses)
            loss = losses.sum() if self._shares else losses.mean()
            self._losses, self._step_losses = [], True
        # The Trainer logs and evaluates a step after this event: the step is taken (its
        # frames) once it has, so that they see the step's metrics (CheckpointProbe keeps the
        # best by them). The weights do not change in between.
        self._pending = {"loss": loss}
        if not (control.should_log or control.should_evaluate):
            self._take_step()

    def _take_step(self) -> None:
        if self._pending is not None:
            values, evaluated = self._pending, self._evaluated
            self._pending, self._evaluated = None, {}
            self.monitor.validated_step(evaluated, **values)

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self._end_epoch()

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        # Ended (with its last step, if that waits) once the Trainer has logged and evaluated
        # the epoch, which it does after this event.
        self._epoch_ended = True
        if not (control.should_log or control.should_evaluate):
            self._end_epoch()

    def _end_epoch(self) -> None:
        self._take_step()
        if self._epoch_ended:
            self._epoch_ended = False
            self.monitor.end_epoch()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not self._training:
            return  # (trainer.evaluate() or log() outside train: that run is finished)
        values = {}
        for name, value in (logs or {}).items():
            if name == "loss":
                if not self._step_losses:  # no loss in the model's outputs: the Trainer's mean
                    values["train_loss"] = value
            elif _is_series(name) and not name.startswith("eval_") and is_scalar(value):
                values[name] = value  # (evaluation metrics arrive in on_evaluate)
        self._record(values)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        if not self._training:
            return
        values = {
            _valid_name(name): value
            for name, value in (metrics or {}).items()
            if _is_series(name) and is_scalar(value)
        }
        if self._pending is not None:  # the step's own: taken with them
            self._evaluated.update(values)
        elif values:
            self.monitor.after_validate(**values)

    def _record(self, values: dict[str, Any]) -> None:
        """Values the Trainer logged at its current step: the step's own while it waits."""
        if self._pending is not None:
            self._pending.update(values)
        elif values:
            self.monitor.log(**values)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._end_epoch()
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Close the Monitor of the last training (a no-op when it is closed already);
        ``error``: what ended the training early (see ``Monitor.close``)."""
        if self.monitor is not None and self._training:
            self._take_step()  # a step whose metrics were awaited: its weights are the model's
        self._training = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close(error)


def _holding(probed: nn.Module, model: nn.Module) -> nn.Module:
    """``probed``, once it is known to hold the Trainer's ``model`` (the weights it trains)."""
    held = {id(p) for p in probed.parameters()}
    if not all(id(p) in held for p in model.parameters()):
        raise ValueError(
            f"ProbescopeCallback: model= ({type(probed).__name__}) must hold the Trainer's model "
            f"({type(model).__name__}), whose weights the probes watch; e.g. LastLogits(model) "
            "built on the model given to the Trainer"
        )
    return probed


def _is_series(name: str) -> bool:
    return name not in _NOT_SERIES and not name.endswith(_NOT_SERIES_SUFFIXES)


def _valid_name(name: str) -> str:
    """An evaluation metric in probescope's words: ``eval_loss`` -> ``valid_loss``."""
    return f"valid_{name[5:]}" if name.startswith("eval_") else f"valid_{name}"
