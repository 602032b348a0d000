"""When a probe runs: every n steps, every n epochs, a mask, a list, a callable, log-spaced.

Steps count completed optimizer steps; step 0 is the model before the first step, so a
schedule that is due at step 0 gives the initial frame. Epoch-based schedules fire when
an epoch ends (``Monitor.end_epoch()``), epochs counted from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from probescope.validation import positive_int


@dataclass(frozen=True)
class StepInfo:
    """What a callable schedule is told about the step it decides on."""

    step: int
    epoch: int
    monitor: Any = None


class Schedule:
    """Decides at which steps (and epoch ends) a probe is due."""

    def due(self, info: StepInfo) -> bool:
        """Whether the probe is due right after step ``info.step``."""
        return False

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether the probe is due when epoch ``epoch`` ends."""
        return False

    def describe(self) -> dict:
        """A JSON-serialisable description, stored in the run's metadata."""
        return {"kind": type(self).__name__}

    def __or__(self, other: Schedule) -> Schedule:
        return AnyOf((self, other))

    # Constructors: the public vocabulary.
    @staticmethod
    def every(n: int) -> Schedule:
        """Every ``n`` steps: 0, n, 2n, ..."""
        return EveryNSteps(n)

    @staticmethod
    def every_epoch(n: int = 1) -> Schedule:
        """At step 0 and at the end of every ``n``-th epoch (train-viz's epoch_freq)."""
        return EveryNEpochs(n)

    @staticmethod
    def steps(steps: Iterable[int]) -> Schedule:
        """Exactly at the listed steps."""
        return AtSteps(steps)

    @staticmethod
    def mask(mask: Sequence[bool]) -> Schedule:
        """``mask[s]`` says whether step s is probed; steps past the mask are not."""
        return StepMask(mask)

    @staticmethod
    def when(decide: Callable[[StepInfo], bool]) -> Schedule:
        """Whenever ``decide(StepInfo)`` returns True."""
        return WhenCallable(decide)

    @staticmethod
    def log_spaced(per_decade: int = 10) -> Schedule:
        """Dense early, sparse late: about ``per_decade`` frames per factor of ten in steps."""
        return LogSpaced(per_decade)

    @staticmethod
    def never() -> Schedule:
        """Never during training (a Monitor still takes a final frame at close)."""
        return Schedule()


class EveryNSteps(Schedule):
    def __init__(self, n: int):
        self.n = positive_int("Schedule.every(n)", n)

    def due(self, info: StepInfo) -> bool:
        return info.step % self.n == 0

    def describe(self) -> dict:
        return {"kind": "every", "n": self.n}


class EveryNEpochs(Schedule):
    def __init__(self, n: int):
        self.n = positive_int("Schedule.every_epoch(n)", n)

    def due(self, info: StepInfo) -> bool:
        return info.step == 0

    def due_at_epoch_end(self, epoch: int) -> bool:
        return (epoch + 1) % self.n == 0

    def describe(self) -> dict:
        return {"kind": "every_epoch", "n": self.n}


class AtSteps(Schedule):
    def __init__(self, steps: Iterable[int]):
        self.steps = frozenset(int(s) for s in steps)
        if any(s < 0 for s in self.steps):
            raise ValueError(f"Schedule.steps: steps must be >= 0, got {sorted(self.steps)[:5]}")

    def due(self, info: StepInfo) -> bool:
        return info.step in self.steps

    def describe(self) -> dict:
        return {"kind": "steps", "steps": sorted(self.steps)}


class StepMask(Schedule):
    def __init__(self, mask: Sequence[bool]):
        self.mask = [bool(m) for m in mask]

    def due(self, info: StepInfo) -> bool:
        return info.step < len(self.mask) and self.mask[info.step]

    def describe(self) -> dict:
        return {"kind": "mask", "length": len(self.mask), "true": sum(self.mask)}


class WhenCallable(Schedule):
    def __init__(self, decide: Callable[[StepInfo], bool]):
        if not callable(decide):
            raise TypeError(f"Schedule.when needs a callable, got {type(decide).__name__}")
        self.decide = decide

    def due(self, info: StepInfo) -> bool:
        return bool(self.decide(info))

    def describe(self) -> dict:
        return {"kind": "when", "callable": getattr(self.decide, "__qualname__", repr(self.decide))}


class LogSpaced(Schedule):
    """Due at step 0 and at ceil(10 ** (k / per_decade)) for k = 0, 1, 2, ..."""

    def __init__(self, per_decade: int):
        self.per_decade = positive_int("Schedule.log_spaced(per_decade)", per_decade)

    def _target(self, k: int) -> int:
        return math.ceil(10.0 ** (k / self.per_decade) - 1e-9)

    def due(self, info: StepInfo) -> bool:
        s = info.step
        if s <= 1:
            return True
        # The first k whose target reaches s; s is due exactly when that target equals s.
        k = max(0, math.floor(self.per_decade * math.log10(s - 1)) - 1)
        while self._target(k) < s:
            k += 1
        return self._target(k) == s

    def describe(self) -> dict:
        return {"kind": "log_spaced", "per_decade": self.per_decade}


class AnyOf(Schedule):
    def __init__(self, schedules: Iterable[Schedule]):
        self.schedules = tuple(schedules)

    def due(self, info: StepInfo) -> bool:
        return any(s.due(info) for s in self.schedules)

    def due_at_epoch_end(self, epoch: int) -> bool:
        return any(s.due_at_epoch_end(epoch) for s in self.schedules)

    def describe(self) -> dict:
        return {"kind": "any", "of": [s.describe() for s in self.schedules]}
