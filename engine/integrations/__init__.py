"""Thin adapters from training frameworks to the Monitor (import the one you use:
``probescope.integrations.lightning``, ``probescope.integrations.keras``,
``probescope.integrations.fastai``, ``probescope.integrations.transformers``)."""

from __future__ import annotations

import inspect
import os
from typing import Any


def check_monitor_kwargs(owner: str, kwargs: dict[str, Any], own: tuple[str, ...]) -> None:
    """Raise a TypeError naming every key of ``kwargs`` that is not a Monitor argument the
    adapter leaves to its user (``own``: those it passes itself)."""
    from probescope.monitor import Monitor

    parameters = inspect.signature(Monitor).parameters
    unknown = sorted(k for k in kwargs if k not in parameters or k in own)
    if unknown:
        options = ", ".join(k for k in parameters if k not in own)
        raise TypeError(f"{owner}: unknown Monitor arguments {unknown}; they are {options}")


def fit_kwargs(kwargs: dict[str, Any], fits: int) -> dict[str, Any]:
    """The Monitor arguments of fit number ``fits`` of one callback: a later fit records into
    ``RUN_DIR-fit<n>`` (the first fit's run stays as it is), unless ``resume=True``, with
    which every fit goes on in the same run."""
    kwargs = dict(kwargs)
    if fits > 1 and kwargs.get("run_dir") is not None and kwargs.get("resume") is not True:
        kwargs["run_dir"] = f"{os.fspath(kwargs['run_dir'])}-fit{fits}"
    return kwargs


def is_scalar(value) -> bool:
    """A number a framework logged: a Python number, a one-element tensor, a 0-d array."""
    if isinstance(value, (int, float)):
        return True
    numel = getattr(value, "numel", None)  # torch tensors
    if callable(numel):
        return numel() == 1
    return getattr(value, "shape", None) == ()  # NumPy and Keras scalars


def take_step(monitor, pending: bool, **values) -> bool:
    """The Monitor's step of an optimizer step that waited (``pending``) for the validation
    run right after it, with that validation's ``values`` recorded at the step before its
    frames are taken (they see them: CheckpointProbe keeps the best by them); with none
    waiting, ``values`` as the validation of the step that ended. Returns False: nothing
    waits any more."""
    if pending:
        monitor.validated_step(values)
    elif values:
        monitor.after_validate(**values)
    return False
