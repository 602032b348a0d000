"""Keras 3 on its torch backend: a Callback that attaches a Monitor to ``model.fit``.

    import os; os.environ["KERAS_BACKEND"] = "torch"   # before Keras is imported
    from probescope.integrations.keras import ProbescopeCallback

    model.fit(x, y, epochs=20, callbacks=[ProbescopeCallback([ps.CurveProbe(x, y)], run_dir="runs/k")])

On the torch backend a Keras model is a ``torch.nn.Module``, so every probe evaluates it as
it would a torch model: on a snapshot of one step's weights, off the training path. The
Monitor starts when fitting starts (Keras has built the model by then), takes a step after
every training batch (with ``steps_per_execution=k``, Keras reports every k batches and a
step is k optimizer steps), and closes when fitting ends. Each batch's own loss is recorded (from
the difference of Keras's running loss mean, on the device, without a sync); at the end of
each epoch the validation logs are recorded as ``valid_<name>`` (``val_loss`` becomes
``valid_loss``, the name CheckpointProbe and LossProbe use) and the other epoch metrics as
``train_<name>``; the epoch's last step is taken after its validation, so that its frames
see them. A model's last activation (softmax, sigmoid) is read from its last layer,
so ``output="auto"`` takes its outputs as probabilities.

A later ``fit`` with the same callback records into ``RUN_DIR-fit2``, ``-fit3``, ...; with
``resume=True`` every fit goes on in the same run (see ``Monitor(resume=...)``). Keras calls
no callback when ``fit`` raises: use the callback as a context manager (``with
ProbescopeCallback(...) as cb: model.fit(..., callbacks=[cb])``) to close the Monitor then
too, keeping the frames written so far.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # the backend is chosen by the environment at import
import torch
from torch import nn

from probescope.integrations import check_monitor_kwargs, fit_kwargs, is_scalar, take_step
from probescope.monitor import Monitor
from probescope.probes.base import Probe

if keras.backend.backend() != "torch":
    raise ImportError(
        f"probescope.integrations.keras needs Keras's torch backend, and Keras runs on "
        f"{keras.backend.backend()!r}: set KERAS_BACKEND=torch before Keras is first imported"
    )

_OWN = ("model", "probes")  # what the callback passes to the Monitor itself


class ProbescopeCallback(keras.callbacks.Callback):
    """Monitor a Keras model while ``model.fit`` trains it.

    ``probes`` and every keyword argument go to ``probescope.Monitor`` (``run_dir``,
    ``viewer``, ``snapshot``, ...); the model comes from ``fit``. ``monitor`` is the Monitor
    of the fit in progress (or the last one).
    """

    def __init__(self, probes: Iterable[Probe], **monitor_kwargs: Any):
        super().__init__()
        check_monitor_kwargs("ProbescopeCallback", monitor_kwargs, _OWN)
        self.probes = list(probes)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.fits = 0
        self._seen: torch.Tensor | None = None  # Keras's loss total and sample count so far
        self._pending = False  # an epoch's last step, taken once its validation has run

    def __enter__(self) -> ProbescopeCallback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def on_train_begin(self, logs=None) -> None:
        self.close()  # a Monitor left open by a fit that raised
        self.fits += 1
        kwargs = fit_kwargs(self.monitor_kwargs, self.fits)
        self.monitor = Monitor(self.model, self.probes, **kwargs)
        self._pending = False
        self.monitor.start()

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._seen = None  # Keras resets its running means every epoch

    def on_train_batch_end(self, batch, logs=None) -> None:
        loss = self._batch_loss()
        if loss is None and logs and "loss" in logs:
            loss = logs["loss"]  # without Keras's loss tracker: its running mean of the epoch
        if loss is not None:
            self.monitor.after_loss(loss=loss)
        steps = (self.params or {}).get("steps")
        if steps is not None and batch == steps - 1:  # the epoch's last step: taken after its
            self._pending = True  # validation, so that its frames see the epoch's logs
        else:
            self.monitor.after_step()

    def on_epoch_end(self, epoch, logs=None) -> None:
        values = {_series_name(k): v for k, v in (logs or {}).items() if k != "loss" and is_scalar(v)}
        self._take_step(**values)
        self.monitor.end_epoch()

    def _take_step(self, **values) -> None:
        self._pending = take_step(self.monitor, self._pending, **values)

    def on_train_end(self, logs=None) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Close the Monitor of the last fit (a no-op when it is closed already); ``error``:
        what ended the fit early (see ``Monitor.close``)."""
        if self.monitor is not None:
            self._take_step()  # a last step whose epoch did not end (a fit that raised)
            self.monitor.close(error)

    def _batch_loss(self) -> torch.Tensor | None:
        """This batch's loss (its samples' mean), as a device tensor: the growth of Keras's
        running loss total over the growth of its sample count."""
        tracker = getattr(self.model, "_loss_tracker", None)
        total, count = getattr(tracker, "total", None), getattr(tracker, "count", None)
        if total is None or count is None:
            return None
        now = torch.stack([total.value.detach(), count.value.detach()])  # a copy: Keras adds in place
        grown = now if self._seen is None else now - self._seen
        self._seen = now
        return grown[0] / grown[1]


def clone_for_probes(model: nn.Module) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of a Keras model for snapshots and, for each of its torch tensors, the copy's
    counterpart (keyed by the original's id).

    ``keras.models.clone_model`` builds new layers of the same configuration (no optimizer
    state); a model it cannot clone (a subclass without ``get_config``) is copied through
    Keras's saving format. Variables pair in order, which both keep."""
    try:
        shadow = keras.models.clone_model(model)
    except Exception:  # e.g. a subclassed model with no get_config: copy through the saving format
        shadow = copy.deepcopy(model)
    live, copies = list(model.variables), list(shadow.variables)
    if len(live) != len(copies) or any(
        a.shape != b.shape or a.dtype != b.dtype for a, b in zip(live, copies, strict=True)
    ):
        raise ValueError(f"a copy of the Keras model {model.name!r} does not have the same variables")
    twin = {id(a.value): b.value for a, b in zip(live, copies, strict=True)}
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if id(t) not in twin]
    if missing:
        raise ValueError(
            f"the Keras model {model.name!r} holds torch tensors that are not variables: {missing[:3]}"
        )
    _rename_like(shadow, model, twin)
    return shadow, twin


def _rename_like(shadow: nn.Module, model: nn.Module, twin: dict[int, torch.Tensor]) -> None:
    """Key the copy's torch parameters as the original's, so both have one state_dict layout
    (a checkpoint of the copy loads into the original). Keras keys them by variable path, and
    a copy's auto-named variables (a Dropout's seed generator) get new paths."""
    copies = dict(shadow.named_modules())
    for name, module in model.named_modules():
        params = module._parameters if isinstance(module, nn.ParameterDict) else None
        parent_name, _, attr = name.rpartition(".")
        if params is None or parent_name not in copies or attr != "_torch_params":
            continue
        renamed = nn.ParameterDict({key: twin[id(value)] for key, value in params.items()})
        copies[parent_name]._torch_params = renamed


def _series_name(key: str) -> str:
    """Keras's epoch log names in probescope's words: ``val_x`` -> ``valid_x``, ``x`` -> ``train_x``."""
    return f"valid_{key[4:]}" if key.startswith("val_") else f"train_{key}"
