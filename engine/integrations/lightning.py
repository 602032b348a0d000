"""Lightning: a Callback that attaches a Monitor to ``Trainer.fit``.

    from probescope.integrations.lightning import ProbescopeCallback

    trainer = L.Trainer(callbacks=[ProbescopeCallback([ps.GridProbe(x, y)], run_dir="runs/x")])

The Monitor starts when fitting starts (the module is on its device and the optimizers
exist; with ``resume=True`` and ``fit(ckpt_path=...)``, once Lightning has restored the
checkpoint's step and epoch, and the run goes on from them), takes a step after every
optimizer step (with gradient accumulation, every ``accumulate_grad_batches`` batches; with
manual optimization, every step of any of the module's optimizers, as it ends),
records each batch's training loss, and closes when fitting ends or fails (the frames
written so far stay on disk). Probes call the LightningModule's ``forward``. Lightning runs
callbacks on every rank; the Monitor probes on one (see probescope.distributed). A later fit
with the same callback records into ``RUN_DIR-fit2``, ``-fit3``, ... (with ``resume=True``,
every fit goes on in the same run).

The metrics logged during validation (``self.log`` in ``validation_step``) are recorded at
the end of each validation run, so LossProbe draws them beside the training loss. A step's
frames are taken when the next batch starts, or, when a validation runs right after the step
(at the end of an epoch, or every ``val_check_interval`` batches), once it has ended: they see
the metrics of their step (CheckpointProbe keeps the best by them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from probescope.integrations import check_monitor_kwargs, fit_kwargs, is_scalar, take_step
from probescope.monitor import Monitor
from probescope.probes.base import Probe

_OWN = ("model", "probes", "optimizer")  # what the callback passes to the Monitor itself


class ProbescopeCallback(L.Callback):
    """Monitor a LightningModule while ``Trainer.fit`` trains it.

    ``probes`` and every keyword argument go to ``probescope.Monitor`` (``run_dir``,
    ``viewer``, ``snapshot``, ``cuda_graphs``, ...); the model and its first optimizer come
    from the trainer. ``monitor`` is the Monitor of the fit in progress (or the last one).
    """

    def __init__(self, probes: Iterable[Probe], **monitor_kwargs: Any):
        check_monitor_kwargs("ProbescopeCallback", monitor_kwargs, _OWN)
        self.probes = list(probes)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.fits = 0
        self._optimizer_steps = 0
        self._before_validation: dict[str, Any] = {}
        self._deferred: dict[str, Any] | None = None  # a fit's Monitor arguments, until its step is known
        self._step_hooks: list = []  # manual optimization: a post-hook on each optimizer
        self._pending = False  # an optimizer step whose Monitor step waits (see on_train_batch_end)

    def __getstate__(self) -> dict[str, Any]:
        """Without the Monitor of the last fit and its hooks (threads, locks: they belong to
        this process), so that a spawning strategy or a checkpoint can pickle the callback."""
        state = dict(self.__dict__)
        state["monitor"], state["_step_hooks"], state["_deferred"] = None, [], None
        return state

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fits += 1
        kwargs = fit_kwargs(self.monitor_kwargs, self.fits)  # a later fit: RUN_DIR-fit<n>
        if kwargs.get("resume") is True and trainer.ckpt_path:
            # Fitting from a checkpoint: Lightning restores its step after this hook; the run
            # goes on from that step, in on_train_start.
            self._deferred = kwargs
            return
        self._start(trainer, pl_module, kwargs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred is not None:
            kwargs, self._deferred = self._deferred, None
            resume = (trainer.global_step, trainer.current_epoch)
            self._start(trainer, pl_module, {**kwargs, "resume": resume})

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, kwargs: dict[str, Any]) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = Monitor(pl_module, self.probes, optimizer=optimizer, **kwargs)
        self._optimizer_steps, self._pending = trainer.global_step, False
        self.monitor.start()
        if not pl_module.automatic_optimization:
            # The module steps its optimizers itself, any number of times a batch (Lightning
            # counts each in global_step): each is a step of the Monitor's, taken as it ends,
            # so its frames see that step's weights.
            self._step_hooks = [
                o.register_step_post_hook(self._after_optimizer_step) for o in trainer.optimizers
            ]

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_steps += 1
        self.monitor.after_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.monitor.after_loss(loss=loss.detach())
        if not self._step_hooks and trainer.global_step > self._optimizer_steps:  # a step has just run
            # Taken when the next batch starts, or once a validation that runs after this
            # batch has ended (its frames then see the metrics of their step: CheckpointProbe
            # keeps the best by them). The weights do not change in between.
            self._optimizer_steps = trainer.global_step
            self._pending = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._take_step()

    def _take_step(self, **values) -> None:
        self._pending = take_step(self.monitor, self._pending, **values)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor is None or trainer.state.fn != TrainerFn.FITTING:
            return  # (trainer.validate() after a fit: the fit's run is finished)
        before = self._before_validation
        logged = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if before.get(name) is not value and is_scalar(value)
        }
        self._take_step(**logged)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._take_step()
        self.monitor.end_epoch()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close(exception)

    def _close(self, error: BaseException | None = None) -> None:
        if self.monitor is not None:
            self._take_step()  # the last step, when nothing came after it
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []
        if self.monitor is not None:
            self.monitor.close(error)
