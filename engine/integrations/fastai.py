"""fastai: a Callback that attaches a Monitor to ``Learner.fit`` (and ``fit_one_cycle``,
``fine_tune``, ...).

    from probescope.integrations.fastai import ProbescopeCallback

    learn = Learner(dls, model, metrics=accuracy, cbs=ProbescopeCallback(run_dir="runs/f"))
    learn.fit_one_cycle(5, 3e-3)

With no probes, the callback watches what tsai's PredictionDynamics does, live and off the
training path: a PredictionProbe on a fixed batch of the validation set (its first) and a
LossProbe; pass ``probes`` to choose them. The Monitor starts when a fit first trains (the
optimizer exists then; ``validate`` and ``get_preds``, which run a fit's events around a
validation pass, make no run), takes a step after every optimizer step (a step that a callback
cancels, as GradientAccumulation and MixedPrecision do, is no step), records each batch's
training loss, and at the end of each epoch the Recorder's values: ``valid_loss`` and each
metric as ``valid_<name>`` (``train_<name>`` for training metrics). It closes when fitting
ends. ``lr_find`` runs are not recorded.

A later fit with the same callback records into ``RUN_DIR-fit2``, ``-fit3``, ... (``fine_tune``
fits twice: frozen, then the whole model); with ``resume=True`` every fit goes on in the same
run (see ``Monitor(resume=...)``). fastai calls no callback when ``fit`` raises
(other than its own Cancel exceptions): use the callback as a context manager (``with
ProbescopeCallback(...) as cb: learn.fit(..., cbs=cb)``) to close the Monitor then too,
keeping the frames written so far.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder
from fastai.learner import Recorder

from probescope.integrations import check_monitor_kwargs, fit_kwargs, is_scalar, take_step
from probescope.monitor import Monitor
from probescope.probes.base import Probe
from probescope.probes.loss import LossProbe
from probescope.probes.prediction import PredictionProbe

log = logging.getLogger(__name__)

_OWN = ("model", "probes", "optimizer")  # what the callback passes to the Monitor itself


class ProbescopeCallback(Callback):
    """Monitor a fastai Learner's model while it fits.

    ``probes`` (default: a PredictionProbe on the first validation batch and a LossProbe,
    made anew for each fit) and every keyword argument go to ``probescope.Monitor``
    (``run_dir``, ``viewer``, ``snapshot``, ...); the model and optimizer come from the
    Learner. ``monitor`` is the Monitor of the fit in progress (or the last one).
    """

    order = Recorder.order + 15  # after the Recorder's epoch values and the ParamScheduler
    run_valid = False  # the inner loop's events of training batches only

    def __init__(self, probes: Iterable[Probe] | None = None, **monitor_kwargs: Any):
        check_monitor_kwargs("ProbescopeCallback", monitor_kwargs, _OWN)
        self.probes = None if probes is None else list(probes)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.fits = 0
        self._live: Monitor | None = None  # the Monitor events go to (none during lr_find)
        self._starting = False  # a fit began; its Monitor starts when it first trains
        self._pending = False  # an optimizer step whose Monitor step waits (see after_step)

    def __getstate__(self) -> dict[str, Any]:
        """Without the Monitor of the last fit (threads, locks, open files: it belongs to this
        process), so that ``learn.export()`` pickles a Learner that holds the callback."""
        state = dict(self.__dict__)
        state["monitor"] = state["_live"] = None
        return state

    def __enter__(self) -> ProbescopeCallback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def before_fit(self) -> None:
        self.close()  # a Monitor left open by a fit that raised
        self._live = None
        # lr_find's fit is thrown away (fastai puts the weights back): not a run.
        self._starting = not any(isinstance(cb, LRFinder) for cb in self.learn.cbs)

    def before_train(self) -> None:
        """The Monitor starts with the fit's first training epoch: ``validate`` and
        ``get_preds`` run the fit's events around a validation pass (``before_fit`` ...
        ``after_fit``) and train nothing, so they make no run."""
        if not self._starting:
            return
        self._starting = False
        self.fits += 1
        kwargs = fit_kwargs(self.monitor_kwargs, self.fits)
        probes = self.probes if self.probes is not None else default_probes(self.learn)
        optimizer = getattr(self.learn.opt, "opt", self.learn.opt)  # OptimWrapper: the torch one
        self.monitor = self._live = Monitor(self.learn.model, probes, optimizer=optimizer, **kwargs)
        self._pending = False
        self.monitor.start()

    def after_loss(self) -> None:
        loss = getattr(self.learn, "loss", None)
        if self._live is None or not isinstance(loss, torch.Tensor):
            return
        # fastai's tensor types send every op through Python (~5 us each): plain ops, plain result.
        with torch._C.DisableTorchFunctionSubclass():
            if loss.numel() == 1:
                self._live.after_loss(loss=loss.detach())

    def after_step(self) -> None:
        if self._live is None:
            return
        if self.learn.iter < self.learn.n_iter - 1:
            self._live.after_step()
        else:  # the epoch's last step: taken after its validation, so that its frames see the
            self._pending = True  # epoch's values (CheckpointProbe keeps the best by them)

    def _take_step(self, **values) -> None:
        if self._live is not None:
            self._pending = take_step(self._live, self._pending, **values)

    def after_epoch(self) -> None:
        if self._live is None:
            return
        self._take_step(**epoch_values(self.learn))
        self._live.end_epoch()

    def after_fit(self) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Close the Monitor of the last fit (a no-op when it is closed already); ``error``:
        what ended the fit early (see ``Monitor.close``)."""
        self._take_step()  # a step whose epoch did not end (a fit that raised)
        if self.monitor is not None:
            self.monitor.close(error)


def default_probes(learn) -> list[Probe]:
    """A LossProbe and, when the validation set has batches of one input and one target that a
    PredictionProbe can score (a class, a 0/1 row of labels, a value or a row of values per
    sample), a PredictionProbe on its first batch (fixed for the fit)."""
    probes: list[Probe] = [LossProbe()]
    valid = learn.dls.valid
    try:
        batch = valid.one_batch() if len(valid) else None
    except Exception as err:  # a DataLoader that cannot give one batch: no prediction probe
        log.warning("probescope: no PredictionProbe: the validation set gave no batch (%s)", err)
        return probes
    n_inputs = getattr(learn.dls, "n_inp", 1)
    if batch is None or len(batch) != n_inputs + 1 or n_inputs != 1:
        log.warning(
            "probescope: no PredictionProbe: it takes batches of one input and one target, "
            "and the validation set has %s; pass probes=[...] to choose them",
            "no batch" if batch is None else f"{n_inputs} input(s) and {len(batch) - n_inputs} target(s)",
        )
        return probes
    x, y = (_plain(t) for t in batch)
    try:  # targets it cannot score (a mask per sample) cost the fit its PredictionProbe only
        probe = PredictionProbe(x, y)
        probe.attach(learn.model)  # (the Monitor attaches it again)
    except (ValueError, TypeError) as err:
        log.warning("probescope: no PredictionProbe: %s; pass probes=[...] to choose them", err)
        return probes
    names = vocab_names(learn.dls, probe.num_classes if probe.task != "regression" else None)
    if names is not None:  # the classes (labels) by the names the DataLoaders gave them
        probe = PredictionProbe(x, y, class_names=names)
        probe.attach(learn.model)
    return [probe, *probes]


def vocab_names(dls, count: int | None) -> list[str] | None:
    """The DataLoaders' vocab (a CategoryBlock's classes, a MultiCategoryBlock's labels) as
    ``count`` names, or None when it has none, or not as many."""
    if count is None:
        return None
    try:
        vocab = dls.vocab
    except Exception:  # (DataLoaders of plain datasets have none: fastai's lookup raises)
        return None
    if vocab is None or isinstance(vocab, str) or not hasattr(vocab, "__len__") or len(vocab) != count:
        return None
    if len(vocab) and not isinstance(vocab[0], (str, int, np.integer, bool)):
        return None  # (a vocab per target, as a tuple of CategoryMaps: not one class per name)
    names = [str(v) for v in vocab]
    return names if len(set(names)) == len(names) else None


def epoch_values(learn) -> dict[str, float]:
    """The epoch's values of the Learner's Recorder, named as probescope names series:
    ``valid_loss``, ``valid_<metric>``, ``train_<metric>`` (the Recorder's smoothed
    ``train_loss`` is left out: each batch's own loss is recorded)."""
    recorder = getattr(learn, "recorder", None)
    record = getattr(learn, "final_record", None)
    if recorder is None or record is None:
        return {}
    metrics = [m.name for m in learn.metrics]
    train = ["train_loss"] + ([f"train_{m}" for m in metrics] if recorder.train_metrics else [])
    valid = ["valid_loss"] + [f"valid_{m}" for m in metrics] if recorder.valid_metrics else []
    names = (train if not recorder.cancel_train else []) + (valid if not recorder.cancel_valid else [])
    if len(names) != len(record):
        log.warning("probescope: the Recorder's epoch values %s do not match %s; not recorded", record, names)
        return {}
    return {n: float(v) for n, v in zip(names, record, strict=True) if n != "train_loss" and is_scalar(v)}


def _plain(t):
    """A fastai tensor subclass (TensorImage, TensorCategory, ...) as a plain torch.Tensor."""
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t
