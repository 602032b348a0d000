"""When a probe runs: every n steps, every n epochs, a mask, a list, a callable, log-spaced.

Steps count completed optimizer steps; step 0 is the model before the first step, so a
schedule that is due at step 0 gives the initial frame. Epoch-based schedules fire when
an epoch ends (``Monitor.end_epoch()``), epochs counted from 0.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import logging
import math
import operator
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from probescope import validation
from probescope.spec import Reproducible
from probescope.validation import positive_int

log = logging.getLogger("probescope")


class StepInfo(NamedTuple):
    """What a callable schedule is told about the step it decides on (made at every step: a
    tuple is the cheapest immutable record)."""

    step: int
    epoch: int
    monitor: Any = None


class StepTime(NamedTuple):
    """One training step as a budget is told it (``Schedule.observe_steps``)."""

    step_s: float  # its duration, without the Monitor's own work
    frame: int | None  # the number of this probe's frame in flight at any time during it
    quiet: bool  # no probe's frame at all was in flight during it
    share: float  # this frame's part of the step's excess where frames of several probes ran
    own_s: float | None  # the Monitor's own work in the training thread at it (host clock)


class Schedule(Reproducible):
    """Decides at which steps (and epoch ends) a probe is due. A probe spec (probescope.spec)
    writes a schedule down by the arguments it was built with."""

    def due(self, info: StepInfo) -> bool:
        """Whether the probe is due right after step ``info.step``."""
        return False

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether the probe is due when epoch ``epoch`` ends."""
        return False

    def next_due(self, step: int) -> int | None:
        """The first step after ``step`` at which ``due`` may be true, as far as the schedule
        knows now; None if no later step will be. The Monitor does not ask ``due`` before that
        step (an adaptive schedule is asked again whenever it has been told steps), so a
        schedule that can tell spares the training thread a call at every step. By default the
        next step: ``due`` is asked at every step (never, for a schedule that is never due).
        A subclass that overrides ``due`` below the class that answers this is asked at every
        step (``next_due`` below)."""
        return None if type(self).due is Schedule.due else step + 1

    def describe(self) -> dict:
        """A JSON-serialisable description, stored in the run's metadata."""
        return {"kind": type(self).__name__}

    def observe(
        self,
        *,
        step_s: float | None = None,
        probe_s: float | None = None,
        frame: int | None = None,
        copy_s: float | None = None,
        own_s: float | None = None,
        quiet: bool = True,
        share: float = 1.0,
    ) -> None:
        """Told (budget mode) the end of frame ``frame``: its evaluation's duration and its
        weight snapshot's; or one training step (see ``observe_steps``), with ``frame`` the
        number of its probe's frame that was in flight at any time during that step (None if
        none was), ``quiet`` whether no probe's frame at all was, ``share`` the part of the
        step's excess time that is this frame's where frames of several probes ran in it, and
        ``own_s`` the Monitor's own work in the training thread at that step. A schedule whose
        ``observe`` takes no ``quiet`` or ``share`` is not told it."""

    def observe_steps(self, steps: Sequence[StepTime]) -> None:
        """Told (budget mode) training steps in the order they ran, a few at a time (the
        Monitor tells them in batches, so that a step costs the training thread an append).
        By default each goes to ``observe``."""
        told = _keywords(type(self).observe, ("quiet", "share"))
        for s in steps:
            extra = {"quiet": s.quiet, "share": s.share}
            self.observe(step_s=s.step_s, frame=s.frame, own_s=s.own_s, **{k: extra[k] for k in told})

    def state(self) -> dict | None:
        """What an adaptive schedule has learned so far (budget mode), for the run's summary."""
        return None

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
    def budget(fraction: float, *, start: int = 10, max_interval: int = 100_000) -> Schedule:
        """As often as costs at most ``fraction`` of training time: the interval between frames
        adapts to the measured probe and step times (see ``Budget``)."""
        return Budget(fraction, start=start, max_interval=max_interval)

    @staticmethod
    def never() -> Schedule:
        """Never during training (a Monitor still takes a final frame at close)."""
        return Schedule()


class EveryNSteps(Schedule):
    def __init__(self, n: int):
        self.n = positive_int("Schedule.every(n)", n)

    def due(self, info: StepInfo) -> bool:
        return info.step % self.n == 0

    def next_due(self, step: int) -> int | None:
        return (step // self.n + 1) * self.n

    def describe(self) -> dict:
        return {"kind": "every", "n": self.n}


class EveryNEpochs(Schedule):
    def __init__(self, n: int):
        self.n = positive_int("Schedule.every_epoch(n)", n)

    def due(self, info: StepInfo) -> bool:
        return info.step == 0

    def next_due(self, step: int) -> int | None:
        return None  # after step 0, only at epoch ends

    def due_at_epoch_end(self, epoch: int) -> bool:
        return (epoch + 1) % self.n == 0

    def describe(self) -> dict:
        return {"kind": "every_epoch", "n": self.n}


class AtSteps(Schedule):
    def __init__(self, steps: Iterable[int]):
        self.steps = frozenset(int(s) for s in steps)
        if any(s < 0 for s in self.steps):
            raise ValueError(f"Schedule.steps: steps must be >= 0, got {sorted(self.steps)[:5]}")
        self._sorted = sorted(self.steps)

    def due(self, info: StepInfo) -> bool:
        return info.step in self.steps

    def next_due(self, step: int) -> int | None:
        return _first_after(self._sorted, step)

    def describe(self) -> dict:
        return {"kind": "steps", "steps": sorted(self.steps)}

    def spec_arguments(self) -> dict:
        return {"steps": sorted(self.steps)}  # the argument may have been an iterator


class StepMask(Schedule):
    def __init__(self, mask: Sequence[bool]):
        self.mask = [bool(m) for m in mask]
        self._true = [i for i, m in enumerate(self.mask) if m]

    def due(self, info: StepInfo) -> bool:
        return info.step < len(self.mask) and self.mask[info.step]

    def next_due(self, step: int) -> int | None:
        return _first_after(self._true, step)

    def describe(self) -> dict:
        return {"kind": "mask", "length": len(self.mask), "true": sum(self.mask)}

    def spec_arguments(self) -> dict:
        return {"mask": np.asarray(self.mask, dtype=bool)}  # an array: a long mask stays out of JSON


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
        return self._first_target(s) == s

    def next_due(self, step: int) -> int | None:
        return step + 1 if step < 1 else self._first_target(step + 1)

    def _first_target(self, s: int) -> int:
        """The first target at or after step ``s`` >= 2; ``s`` is due exactly when it is ``s``."""
        k = max(0, math.floor(self.per_decade * math.log10(s - 1)) - 1)
        while self._target(k) < s:
            k += 1
        return self._target(k)

    def describe(self) -> dict:
        return {"kind": "log_spaced", "per_decade": self.per_decade}


class Budget(Schedule):
    """Frames as often as a cost budget allows: ``fraction`` of the training time.

    The probe is due when ``interval`` steps have passed since its last frame, with
    ``interval = ceil(cost / (fraction * step - own_share * own))`` between 1 and
    ``max_interval`` (``max_interval`` when the Monitor's own work alone spends the budget),
    worked out again after every frame and every batch of steps the Monitor tells (a few steps at
    a time: ``observe_steps``). Step 0 is always probed.
    One Budget belongs to one probe; probes that share a budget (``Monitor(budget=...)``) each
    get a part of it and ``own_share`` of the Monitor's own work, so that the own work comes off
    the whole budget once.

    ``step`` is the median of the last ``WINDOW`` idle steps (at least ``MIN_SAMPLES`` of them,
    so that a pause in training does not pass for a step): the Monitor reports the time of every
    training step (between consecutive optimizer steps, without the Monitor's own work) with the
    number of this probe's frame that was in flight at any moment of it. Idle steps are those
    beside no probe's frame at all (other probes' frames slow steps too and would inflate the
    baseline; their steps count only while too few idle ones are known). A frame is in flight
    while it is evaluated (not while it waits behind another probe's) and, with a run
    directory, until the recorder has written it.

    ``cost`` is what a frame costs training, measured, not assumed: the steps that ran beside it
    took longer than idle steps do, and its cost is that excess, summed over its steps (the step
    in which it started, the steps it ran beside, the step in which it was done), plus the
    snapshot's copy, which the training thread pays itself. A step in which frames of several
    probes ran is shared between them (``share``: the Monitor splits it in proportion to their
    evaluation times), so that the step's excess is counted once and a short frame beside a
    long one is not charged with the long one's cost. A frame's cost is known once it has ended
    and a step without it has been reported; the two come from different threads and, on CUDA,
    step times arrive a step or two late, which is why steps carry the frame's number and not a
    busy flag read at one moment (a frame shorter than a step would slip between two such
    moments and cost nothing). A frame evaluated inline (the ``sync`` snapshot) runs between
    two steps: its whole evaluation is its cost. ``cost`` is the mean of the last ``FRAMES``
    frames': what a budget bounds is the total, and an occasional expensive frame is part of it.

    Before any frame has been measured, the whole evaluation counts, as if it ran in the
    training thread. The frame at step 0 cannot be measured (it runs beside the first steps,
    before an idle step time is known) and its evaluation is the coldest (kernels compiled,
    caches filled): counted as serial, it would put the next frame far later than the budget
    needs. So the interval is ``start`` until a step time and an evaluation time are known, and
    at most ``start`` until one frame has been measured: the next frame comes soon and is
    measured beside training. After ``TRIALS`` frames that ended unmeasured (their steps came
    before the step time was known, or were never reported) the serial count holds alone.

    Where the Monitor times steps with the host clock (the CPU path), it also reports ``own``,
    its own work in the training thread at every step (counting the step, recording, asking the
    schedules): that fixed cost is paid whether or not a frame is taken, so it comes off the
    budget first.
    """

    WINDOW = 25
    MIN_SAMPLES = 5
    FRAMES = 8
    TRIALS = 3

    def __init__(
        self, fraction: float, *, start: int = 10, max_interval: int = 100_000, own_share: float = 1.0
    ):
        self.fraction = validation.fraction("Schedule.budget: fraction", fraction)
        self.own_share = validation.fraction("Schedule.budget: own_share", own_share)
        self.start = positive_int("Schedule.budget(start=)", start)
        self.max_interval = positive_int("Schedule.budget(max_interval=)", max_interval)
        self.interval = self.start
        self._idle: deque[float] = deque(maxlen=self.WINDOW)  # steps beside no probe's frame
        self._beside: deque[float] = deque(maxlen=self.WINDOW)  # beside other probes' frames only
        self._probe: deque[float] = deque(maxlen=self.WINDOW)
        self._frames: deque[float] = deque(maxlen=self.FRAMES)  # measured cost of recent frames
        self._own: deque[float] = deque(maxlen=self.WINDOW)  # the Monitor's own work per step
        self._excess: dict[int, float] = {}  # frame -> its steps' excess so far (nan: unknown)
        self._ended: dict[int, float] = {}  # frame -> its snapshot's copy, once it has ended
        self._running: int | None = None  # the frame of the last step reported
        self._lock = threading.Lock()  # steps are told by the training thread, frame ends by the worker
        self.changes: list[tuple[int, int]] = []  # (step, new interval)
        self._last = 0
        self._step = 0
        self._unmeasured = 0  # frames that ended before any frame had been measured

    def due(self, info: StepInfo) -> bool:
        self._step = info.step
        if info.step == 0 or info.step - self._last >= self.interval:
            self._last = info.step
            return True
        return False

    def next_due(self, step: int) -> int | None:
        self._step = step  # the step it knows of, for its change log
        return max(step + 1, self._last + self.interval)

    @property
    def step_s(self) -> float | None:
        """Typical time of a step while no probe evaluates (None until enough are seen); while
        too few such steps are known (another probe evaluates nearly always), the steps beside
        other probes' frames count too."""
        if len(self._idle) >= self.MIN_SAMPLES:
            return statistics.median(self._idle)
        steps = [*self._idle, *self._beside]
        return statistics.median(steps) if len(steps) >= self.MIN_SAMPLES else None

    @property
    def probe_s(self) -> float | None:
        """Typical time of one evaluation, snapshot included."""
        return statistics.median(self._probe) if self._probe else None

    @property
    def own_s(self) -> float:
        """Typical time of the Monitor's own work in the training thread per step (0 if untold)."""
        return statistics.median(self._own) if self._own else 0.0

    @property
    def cost_s(self) -> float | None:
        """What one frame costs training, as measured so far (None before any measurement)."""
        if self._frames:
            return statistics.fmean(self._frames)
        return self.probe_s  # nothing measured beside training yet: count it as if serial

    def observe(
        self,
        *,
        step_s: float | None = None,
        probe_s: float | None = None,
        frame: int | None = None,
        copy_s: float | None = None,
        own_s: float | None = None,
        quiet: bool = True,
        share: float = 1.0,
    ) -> None:
        if probe_s is None or probe_s < 0:  # one step
            self.observe_steps((StepTime(step_s or 0.0, frame, quiet, share, own_s),))
            return
        with self._lock:
            self._probe.append(probe_s)
            if frame is None:  # inline, between two steps: all of it is training's time
                self._frames.append(probe_s)
            else:
                self._ended[frame] = copy_s or 0.0
                if not self._frames:
                    self._unmeasured += 1
            self._settle_frames()
            self._adapt()

    def observe_steps(self, steps: Sequence[StepTime]) -> None:
        with self._lock:
            for step_s, frame, quiet, share, own_s in steps:
                if own_s is not None and own_s >= 0:
                    self._own.append(own_s)
                if step_s <= 0:
                    continue
                if frame is None and quiet:  # most steps: _step_seen's first case written out
                    self._running = None
                    self._idle.append(step_s)
                else:
                    self._step_seen(step_s, frame, quiet, share)
            self._settle_frames()
            self._adapt()

    def _step_seen(self, step_s: float, frame: int | None, quiet: bool, share: float) -> None:
        self._running = frame
        if frame is None:
            (self._idle if quiet else self._beside).append(step_s)
            return
        idle = self.step_s
        excess = share * max(step_s - idle, 0.0) if idle is not None else math.nan
        self._excess[frame] = self._excess.get(frame, 0.0) + excess
        while len(self._excess) > 2 * self.FRAMES:  # frames that never ended (a failed probe)
            del self._excess[min(self._excess)]

    def _settle_frames(self) -> bool:
        """Move every frame that has ended and whose steps are all reported into the measured
        costs; forget frames too old to be completed. True if one moved."""
        if not self._ended:
            return False
        moved = False
        for frame in [f for f in self._ended if f in self._excess and f != self._running]:
            cost = self._excess.pop(frame) + self._ended.pop(frame)
            if not math.isnan(cost):
                self._frames.append(cost)
                moved = True
        while len(self._ended) > 2 * self.FRAMES:  # ended, but no step of theirs was ever told
            del self._ended[min(self._ended)]
        return moved

    def _adapt(self) -> None:
        cost, step = self.cost_s, self.step_s
        if cost is None or step is None:
            return
        spare = self.fraction * step - self.own_share * self.own_s  # what is left for frames per step
        wanted = math.ceil(cost / spare - 1e-9) if spare > 0 else self.max_interval
        if not self._frames and self._unmeasured < self.TRIALS:
            wanted = min(wanted, self.start)  # the next frame soon, to be measured beside training
        interval = min(max(wanted, 1), self.max_interval)
        if interval != self.interval:
            previous, self.interval = self.interval, interval
            if not self.changes or abs(interval - previous) > 0.25 * previous:
                self.changes.append((self._step, interval))
                log.info(
                    "Schedule.budget(%g): a frame costs training %.2f ms (evaluation %.2f ms), a step "
                    "%.2f ms -> every %d steps",
                    self.fraction, cost * 1e3, (self.probe_s or 0.0) * 1e3, step * 1e3, interval,
                )  # fmt: skip

    def describe(self) -> dict:
        return {
            "kind": "budget",
            "fraction": self.fraction,
            "start": self.start,
            "max_interval": self.max_interval,
            "own_share": self.own_share,
        }

    def state(self) -> dict:
        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1e3, 4)

        with self._lock:
            return {
                "fraction": self.fraction,
                "interval": self.interval,
                "cost_ms": ms(self.cost_s),
                "probe_ms": ms(self.probe_s),
                "step_ms": ms(self.step_s),
                "own_ms": ms(self.own_s),
                "frames_measured": len(self._frames),
                "changes": self.changes[-50:],
            }


class AnyOf(Schedule):
    def __init__(self, schedules: Iterable[Schedule]):
        self.schedules = tuple(schedules)

    def due(self, info: StepInfo) -> bool:
        return any(s.due(info) for s in self.schedules)

    def next_due(self, step: int) -> int | None:
        return min((n for s in self.schedules if (n := next_due(s, step)) is not None), default=None)

    def due_at_epoch_end(self, epoch: int) -> bool:
        return any(s.due_at_epoch_end(epoch) for s in self.schedules)

    def describe(self) -> dict:
        return {"kind": "any", "of": [s.describe() for s in self.schedules]}

    def spec_arguments(self) -> dict:
        return {"schedules": self.schedules}  # the argument may have been an iterator

    def observe(self, **times) -> None:
        for s in self.schedules:
            s.observe(**times)

    def observe_steps(self, steps: Sequence[StepTime]) -> None:
        for s in self.schedules:
            s.observe_steps(steps)

    def state(self) -> dict | None:
        states = [s.state() for s in self.schedules]
        return {"of": states} if any(x is not None for x in states) else None


def next_due(schedule: Schedule, step: int) -> int | None:
    """``schedule.next_due(step)`` where it can be trusted, else ``step + 1`` (ask at every
    step): a subclass that overrides ``due`` below the class that answers ``next_due`` (its own
    rule on an inherited schedule), an answer that raises, and one that is not an integer are
    not trusted. An answer at or before ``step`` is taken as ``step + 1``."""
    if not _answers_next_due(type(schedule)):
        return step + 1
    try:
        first = schedule.next_due(step)
        return None if first is None else max(step + 1, operator.index(first))
    except Exception:
        return step + 1


@functools.cache
def _answers_next_due(cls: type) -> bool:
    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in vars(k))

    return issubclass(owner("next_due"), owner("due"))


def _first_after(steps: Sequence[int], step: int) -> int | None:
    """The first of the sorted ``steps`` after ``step``, or None."""
    i = bisect.bisect_right(steps, step)
    return steps[i] if i < len(steps) else None


@functools.cache
def _keywords(method: Callable, names: tuple[str, ...]) -> tuple[str, ...]:
    """Which of ``names`` ``method`` accepts as keywords (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in names if any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters))
