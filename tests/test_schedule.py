"""Schedules fire at exactly the right steps, alone and inside a Monitor."""

import pytest
import torch

from probescope import Monitor, Probe, Schedule, StepInfo, StepTime
from probescope.schedule import Budget, next_due
from tests.conftest import train_steps


class StepProbe(Probe):
    """A probe whose frame is its step, at once."""

    def evaluate(self, model, context):
        return {"step": context.step}


def fired(schedule, steps=60):
    return [s for s in range(steps + 1) if schedule.due(StepInfo(s, 0))]


def test_every_n_steps_fires_at_multiples_including_step_zero():
    assert fired(Schedule.every(7), 30) == [0, 7, 14, 21, 28]


def test_explicit_steps_fire_only_there():
    assert fired(Schedule.steps([3, 5, 40])) == [3, 5, 40]


def test_mask_is_indexed_by_step_and_ends_with_the_mask():
    mask = [False, True, False, True, True]
    assert fired(Schedule.mask(mask)) == [1, 3, 4]


def test_callable_decides_per_step():
    assert fired(Schedule.when(lambda info: info.step % 9 == 4)) == [4, 13, 22, 31, 40, 49, 58]


def test_log_spaced_is_dense_early_and_sparse_late():
    assert fired(Schedule.log_spaced(1), 5000) == [0, 1, 10, 100, 1000]
    steps = fired(Schedule.log_spaced(4), 1000)
    # ceil(10 ** (k / 4)) for k = 0..12: 1, 2, 4, 6, 10, 18, 32, 57, 100, 178, 317, 563, 1000
    assert steps == [0, 1, 2, 4, 6, 10, 18, 32, 57, 100, 178, 317, 563, 1000]


def test_union_of_schedules():
    assert fired(Schedule.every(10) | Schedule.steps([3]), 25) == [0, 3, 10, 20]


def asked_and_fired(schedule, steps):
    """Where a Monitor asks ``schedule`` (step 0, then each step its ``next_due`` names) and
    where it is due among them."""
    asked, at, step = [], [], 0
    while step is not None and step <= steps:
        asked.append(step)
        if schedule.due(StepInfo(step, 0)):
            at.append(step)
        step = next_due(schedule, step)
    return asked, at


SCHEDULES = {
    "every": lambda: Schedule.every(7),
    "steps": lambda: Schedule.steps([3, 5, 40, 999]),
    "mask": lambda: Schedule.mask([False, True, False, True, True]),
    "log_spaced": lambda: Schedule.log_spaced(4),
    "log_spaced(1)": lambda: Schedule.log_spaced(1),
    "every_epoch": lambda: Schedule.every_epoch(3),
    "never": Schedule.never,
    "union": lambda: Schedule.every(10) | Schedule.steps([3, 57]) | Schedule.log_spaced(2),
    "budget": lambda: Schedule.budget(0.1, start=6),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_schedule_asked_only_where_it_may_be_due_fires_at_every_step_it_would(name):
    asked, at = asked_and_fired(SCHEDULES[name](), 1000)
    assert at == fired(SCHEDULES[name](), 1000)
    assert set(asked) - set(at) <= {0}  # asked nowhere else (step 0 is always asked)


def test_a_schedule_that_cannot_tell_its_next_step_is_asked_at_every_step():
    class Odd(Schedule.every(3).__class__):  # its own rule on an inherited next_due
        def due(self, info):
            return info.step % 2 == 1

    class Raising(Schedule):
        def due(self, info):
            return info.step == 12

        def next_due(self, step):
            raise RuntimeError("no idea")

    class Early(Raising):
        def next_due(self, step):
            return step - 5  # at or before the step: taken as the next one

    every_step = list(range(31))
    assert asked_and_fired(Schedule.when(lambda info: info.step % 9 == 4), 30) == (every_step, [4, 13, 22])
    assert asked_and_fired(Odd(3), 30) == (every_step, list(range(1, 31, 2)))
    assert asked_and_fired(Raising(), 30) == (every_step, [12])
    assert asked_and_fired(Early(), 30) == (every_step, [12])
    assert asked_and_fired(Odd(3) | Schedule.every(10), 30)[0] == every_step


def test_a_budget_names_its_next_step_from_its_interval_as_it_changes():
    budget = Schedule.budget(0.05, start=7)
    assert budget.due(StepInfo(0, 0)) and next_due(budget, 0) == 7 and next_due(budget, 3) == 7
    budget.observe(probe_s=0.005)
    for _ in range(5):
        budget.observe(step_s=0.010)  # every 10 steps now
    assert budget.interval == 10 and next_due(budget, 4) == 10
    for _ in range(40):  # every 3: the next step is at once where 3 have passed
        budget.observe(step_s=0.040)
    assert budget.interval == 3 and next_due(budget, 4) == 5 and next_due(budget, 1) == 3


def test_monitor_asks_a_schedule_only_at_the_steps_it_names(mlp, blobs, recording_probe):
    class Counted(Schedule):
        def __init__(self, n):
            self.n, self.asked = n, []

        def due(self, info):
            self.asked.append(info.step)
            return info.step % self.n == 0

        def next_due(self, step):
            return (step // self.n + 1) * self.n

    class CountedAll(Counted):
        def due(self, info):
            return super().due(info)  # its own due, no next_due of its own: every step

    sparse, dense = Counted(5), CountedAll(4)
    probes = [recording_probe(name="sparse", schedule=sparse), recording_probe(name="dense", schedule=dense)]
    with Monitor(mlp, probes, final_frame=False) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 13)
    assert sparse.asked == [0, 5, 10] and probes[0].steps == [0, 5, 10]
    assert dense.asked == list(range(14)) and probes[1].steps == [0, 4, 8, 12]


def test_monitor_asks_an_adaptive_schedule_again_once_told_steps(mlp):
    # A budget's interval changes as it learns: the Monitor plans its next ask again after
    # telling it steps, so a shorter interval takes effect within a batch of steps.

    class Shrinking(Schedule):  # every 1000 steps until told some steps, then every 3
        def __init__(self):
            self.n, self.asked = 1000, []

        def due(self, info):
            self.asked.append(info.step)
            return info.step % self.n == 0

        def next_due(self, step):
            return (step // self.n + 1) * self.n

        def observe_steps(self, steps):
            self.n = 3

        def state(self):
            return {"interval": self.n}

    schedule = Shrinking()
    with Monitor(mlp, [StepProbe(name="quick", schedule=schedule)], final_frame=False) as monitor:
        for _ in range(20):
            monitor.step()
            monitor.drain(10)
    # Told the first STEP_BATCH steps timed by call STEP_BATCH + 1 (the first call times none),
    # before it counts its step: asked again at the first multiple of 3 after step STEP_BATCH.
    assert schedule.asked == [0, *range((Monitor.STEP_BATCH // 3 + 1) * 3, 21, 3)]
    assert monitor.stats["quick"].run == len(schedule.asked)


def test_every_epoch_fires_at_step_zero_and_at_ends_of_every_nth_epoch():
    s = Schedule.every_epoch(3)
    assert fired(s) == [0]
    assert [e for e in range(10) if s.due_at_epoch_end(e)] == [2, 5, 8]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_every_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        Schedule.every(bad)


def test_monitor_runs_probe_at_exactly_the_scheduled_steps(mlp, blobs, recording_probe):
    probe = recording_probe(schedule=Schedule.every(4) | Schedule.steps([5]))
    with Monitor(mlp, [probe], final_frame=False) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 13)
    assert probe.steps == [0, 4, 5, 8, 12]


def test_epoch_schedule_runs_at_epoch_ends_with_the_epochs_last_step(mlp, blobs, recording_probe):
    probe = recording_probe(schedule=Schedule.every_epoch(2))
    with Monitor(mlp, [probe], final_frame=False) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 30, epoch_every=5)
    # epochs end at steps 5, 10, ..., 30; every second epoch: epochs 1, 3, 5.
    assert probe.steps == [0, 10, 20, 30]


def test_final_frame_is_taken_at_close_unless_already_recorded(mlp, blobs, recording_probe):
    probe = recording_probe(schedule=Schedule.every(5))
    with Monitor(mlp, [probe]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 7)
    assert probe.steps == [0, 5, 7]


def test_final_frame_after_the_last_epoch_carries_that_epoch(mlp, blobs, recording_probe):
    probe = recording_probe(schedule=Schedule.every(100))
    with Monitor(mlp, [probe]) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6, epoch_every=3)
    assert monitor.epoch == 2 and monitor.latest(probe.name).epoch == 1


def test_budget_interval_is_probe_time_over_fraction_of_step_time():
    budget = Schedule.budget(0.05, start=7)
    assert fired(budget, 30) == [0, 7, 14, 21, 28]  # nothing measured yet: the start interval
    budget.observe(probe_s=0.005)  # no step seen beside it: counted as if serial
    for _ in range(4):
        budget.observe(step_s=0.010)
    assert budget.interval == 7  # four idle steps are too few to go by
    budget.observe(step_s=0.010)  # 5 ms of probe per 10 ms step at 5 %: every 10 steps
    assert budget.interval == 10
    assert [s for s in range(29, 80) if budget.due(StepInfo(s, 0))] == [38, 48, 58, 68, 78]
    for _ in range(40):  # the step gets 4x slower: the median follows, the interval falls to 3
        budget.observe(step_s=0.040)
    assert budget.interval == 3
    for _ in range(5):  # a few pauses in training (validation, a checkpoint) are not steps
        budget.observe(step_s=5.0)
    assert budget.interval == 3
    state = budget.state()
    assert state["fraction"] == 0.05 and state["interval"] == 3 and state["changes"][0][1] == 10
    assert budget.describe() == {
        "kind": "budget",
        "fraction": 0.05,
        "start": 7,
        "max_interval": 100_000,
        "own_share": 1.0,
    }
    never_slower = Schedule.budget(0.5, max_interval=4)
    never_slower.observe(probe_s=1.0)
    for _ in range(5):
        never_slower.observe(step_s=0.001)
    assert never_slower.interval == 4


def test_budget_measures_a_frame_beside_training_soon_after_the_cold_first_one():
    # Frame 0 runs beside the first steps, before any idle step is known: it cannot be measured,
    # and its evaluation is the coldest. Counted as serial, it would put the next frame 100
    # steps later (50 ms / 5 % of 10 ms); the next frame comes at the start interval instead.
    budget = Schedule.budget(0.05, start=7)
    assert budget.due(StepInfo(0, 0))
    for _ in range(4):
        budget.observe(step_s=0.010, frame=0)  # beside frame 0: nothing to compare them with
    budget.observe(probe_s=0.050, copy_s=0.0, frame=0)
    for _ in range(5):
        budget.observe(step_s=0.010)
    assert budget.state()["frames_measured"] == 0 and budget.cost_s == pytest.approx(0.050)
    assert budget.interval == 7
    assert [s for s in range(5, 13) if budget.due(StepInfo(s, 0))] == [7]
    for _ in range(5):  # frame 1, measured: 1 ms more per step beside it
        budget.observe(step_s=0.011, frame=1)
    budget.observe(probe_s=0.020, copy_s=0.0, frame=1)
    budget.observe(step_s=0.010)
    assert budget.state()["frames_measured"] == 1 and budget.cost_s == pytest.approx(0.005)
    assert budget.interval == 10  # 5 ms / (5 % of 10 ms), not 100


def test_budget_counts_frames_as_serial_after_trials_that_could_not_be_measured():
    budget = Schedule.budget(0.05, start=7)
    for _ in range(5):
        budget.observe(step_s=0.010)
    for frame in range(Budget.TRIALS):  # frames that end, but none of their steps is ever told
        assert budget.interval == 7
        budget.observe(probe_s=0.050, copy_s=0.0, frame=frame)
        budget.observe(step_s=0.010)
    assert budget.state()["frames_measured"] == 0 and budget.interval == 100  # as if serial


def test_budget_counts_what_a_frame_costs_training_not_the_evaluation_time():
    budget = Schedule.budget(0.05)
    for _ in range(5):
        budget.observe(step_s=0.010)
    budget.observe(step_s=3.0)  # a pause between steps: the median ignores it
    for _ in range(5):  # a 50 ms evaluation beside training: its five steps took 2 ms longer each
        budget.observe(step_s=0.012, frame=1)
    budget.observe(probe_s=0.050, copy_s=0.0001, frame=1)
    assert budget.state()["frames_measured"] == 0  # its last step may not be reported yet
    budget.observe(step_s=0.010)  # a step without it: frame 1 is complete
    assert budget.cost_s == pytest.approx(5 * 0.002 + 0.0001) and budget.interval == 21
    budget.observe(step_s=0.030, frame=2)  # one step waits 20 ms (a lock held): that counts
    budget.observe(probe_s=0.050, copy_s=0.0001, frame=2)
    budget.observe(step_s=0.010, frame=3)  # the next frame's step completes frame 2 as well
    assert budget.state()["frames_measured"] == 2 and budget.cost_s == pytest.approx(0.0151)
    free = Schedule.budget(0.05)
    for _ in range(5):
        free.observe(step_s=0.010)
    for _ in range(5):
        free.observe(step_s=0.009, frame=1)  # no contention: only the snapshot's copy is paid
    free.observe(probe_s=0.050, copy_s=0.0002, frame=1)
    free.observe(step_s=0.010)
    assert free.cost_s == pytest.approx(0.0002) and free.interval == 1


def test_budget_completes_a_frame_whose_steps_are_reported_after_it_ended():
    # On CUDA a step's time is known only once its closing event has completed, a step or two
    # after the host moved on: a short frame has ended before any of its steps is reported.
    budget = Schedule.budget(0.02)
    for _ in range(5):
        budget.observe(step_s=0.0015)
    budget.observe(probe_s=0.0016, copy_s=0.0, frame=7)
    assert budget.state()["frames_measured"] == 0
    budget.observe(step_s=0.0030, frame=7)  # the step it ran in: 1.5 ms longer
    budget.observe(step_s=0.0015)
    assert budget.cost_s == pytest.approx(0.0015)
    assert budget.interval == 50  # 1.5 ms / (2 % of 1.5 ms)


def test_budget_cost_is_the_mean_of_recent_frames_so_rare_expensive_frames_count():
    budget = Schedule.budget(0.1)
    for _ in range(5):
        budget.observe(step_s=0.010)
    for frame, slow in enumerate([0.0, 0.0, 0.0, 0.008], start=1):  # every fourth frame: +8 ms
        budget.observe(step_s=0.010 + slow, frame=frame)
        budget.observe(probe_s=0.001, copy_s=0.0, frame=frame)
        budget.observe(step_s=0.010)
    assert budget.cost_s == pytest.approx(0.002)  # a median would say 0 and take every step


def test_monitor_tells_a_budget_every_step_a_frame_ran_in_even_one_shorter_than_a_step(mlp):
    # A frame that starts and ends inside one step was once told as an idle step (the busy flag
    # was read at the step's end) and cost nothing: a budget on fast frames overshot.
    import threading
    import time

    class Recording(Schedule):
        def __init__(self):
            self.steps, self.ends, self.lock = [], [], threading.Lock()

        def due(self, info):
            return info.step % 3 == 0

        def observe(self, *, step_s=None, probe_s=None, frame=None, copy_s=None, own_s=None):
            with self.lock:
                if probe_s is not None:
                    self.ends.append(frame)
                elif step_s is not None:
                    self.steps.append(frame)

        def state(self):
            return {}  # an adaptive schedule: the Monitor tells it timings

    schedule = Recording()
    with Monitor(mlp, [StepProbe(name="quick", schedule=schedule)], final_frame=False) as monitor:
        for _ in range(12):
            time.sleep(0.005)  # a step much longer than the frame, which ends inside it
            monitor.step()
            monitor._worker.wait_idle(10)
    assert schedule.ends == list(range(1, len(schedule.ends) + 1)) and len(schedule.ends) >= 4
    tagged = [f for f in schedule.steps if f is not None]
    assert sorted(set(tagged)) == [f for f in schedule.ends if f in tagged]
    assert set(schedule.ends) - {schedule.ends[-1]} <= set(tagged)  # the last may end the run
    assert len(tagged) == len(set(tagged))  # each frame's one step, told once
    assert schedule.steps.count(None) >= len(schedule.steps) - len(tagged) > 0


def test_monitor_asks_its_probes_for_frames_only_while_one_may_be_in_flight(mlp, monkeypatch):
    # Most steps run beside no frame: the Monitor then knows the step's frames without asking
    # each probe (a lock per probe at every step), and asks again from the next launch until
    # a step in which nothing ran, nothing is queued and nothing waits for the recorder.
    import threading
    import time

    from probescope import Probe
    from probescope.monitor import _ProbeState

    asked = []
    step_frame = _ProbeState.step_frame

    def counting(self):
        asked.append(monitor.step_count)
        return step_frame(self)

    monkeypatch.setattr(_ProbeState, "step_frame", counting)
    started, gate = threading.Event(), threading.Event()

    class Gated(Probe):  # its frame of step 10 runs until the test lets it end
        def evaluate(self, model, context):
            if context.step == 10:
                started.set()
                gate.wait(10)
            return {"step": context.step}

    class Every10(Schedule):  # adaptive (it has a state): told the steps, a batch at a time
        def __init__(self):
            self.told = []

        def due(self, info):
            return info.step % 10 == 0

        def observe_steps(self, steps):
            self.told.extend(steps)

        def state(self):
            return {}

    schedule = Every10()
    with Monitor(mlp, [Gated(name="gated", schedule=schedule)], final_frame=False) as monitor:
        for i in range(26):  # call i ends step i + 1 (times the step since call i - 1)
            if i == 13:
                gate.set()
                monitor._worker.wait_idle(10)
            time.sleep(0.002)
            monitor.step()
            if i == 9:
                started.wait(10)
            elif not 9 < i < 13:
                monitor._worker.wait_idle(10)
        monitor._tell_steps()
    assert monitor.stats["gated"].run == 3  # frames 1, 2, 3 of steps 0, 10 and 20
    # Frame 1 (launched at start) ends before the first step is timed, frame 2 runs from call
    # 9 to call 13 (the four steps between), frame 3 ends within the step after call 19.
    frames = [t.frame for t in schedule.told]  # the steps timed at calls 1 to 25
    assert frames == [1] + [None] * 8 + [2] * 4 + [None] * 6 + [3] + [None] * 5
    # Asked (step counts at the calls) from each launch to the first step with nothing in
    # flight, never in the quiet stretches between.
    assert asked == [1, 2, 10, 11, 12, 13, 14, 20, 21]


def test_budget_counts_an_inline_sync_frame_in_full(mlp):
    # A "sync" frame runs in the training thread between two timed steps: no step shows its
    # cost, so the whole evaluation is what it costs, measured at once (no trial frames).
    import time

    from probescope import Probe

    class Slow(Probe):
        def evaluate(self, model, context):
            time.sleep(0.004)
            return {"step": context.step}

    probe = Slow(name="slow", schedule=Schedule.budget(0.1, start=3))
    with Monitor(mlp, [probe], snapshot="sync", final_frame=False) as monitor:
        for _ in range(120):
            time.sleep(0.001)
            monitor.step()
    state, run = probe.schedule.state(), monitor.stats["slow"].run
    assert state["frames_measured"] == min(run, Budget.FRAMES) and state["cost_ms"] >= 4.0
    assert state["cost_ms"] == pytest.approx(state["probe_ms"], rel=0.5)
    # Worked out at most ADAPT_EVERY steps ago, from medians that have moved a little since.
    wanted = state["cost_ms"] / (0.1 * state["step_ms"] - state["own_ms"])
    assert abs(state["interval"] - wanted) <= max(1.0, 0.25 * wanted) and state["interval"] >= 10


def test_budget_takes_the_monitors_own_work_per_step_off_the_budget_first():
    budget = Schedule.budget(0.05)
    for _ in range(5):
        budget.observe(step_s=0.010)
    budget.observe(probe_s=0.005)  # counted as if serial: 5 ms per frame
    assert budget.interval == 10  # 5 ms / (5 % of 10 ms)
    # The Monitor spends a median 0.2 ms per step itself (told with the steps, a batch at a
    # time); the interval is worked out again after each batch (and after every frame).
    budget.observe_steps([StepTime(0.010, None, True, 1.0, own) for own in [0.0002, 0.0002, 0.0009] * 2])
    assert budget.own_s == pytest.approx(0.0002) and budget.step_s == pytest.approx(0.010)
    assert budget.interval == 17  # 5 ms / (0.5 ms - 0.2 ms) = 16.7
    assert budget.state()["own_ms"] == pytest.approx(0.2)
    budget.observe_steps([StepTime(0.010, None, True, 1.0, 0.0006)] * 8)  # the Monitor alone spends more
    assert budget.own_s == pytest.approx(0.0006) and budget.interval == budget.max_interval
    budget.observe(own_s=0.0001)  # one step told alone: the same as a batch of one
    assert budget.interval == budget.max_interval


def test_monitor_reports_its_own_work_to_a_budget_on_the_host_clock_path(mlp, blobs):
    from probescope import GridProbe

    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=8, schedule=Schedule.budget(0.05))
    monitor = Monitor(mlp, [probe], final_frame=False).start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 30)
    monitor.close()
    own = probe.schedule.state()["own_ms"]
    assert 0 < own < 50  # measured, in milliseconds: the Monitor's work at a step, not the step


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "2%", True])
def test_budget_rejects_fractions_outside_zero_to_one(bad):
    with pytest.raises(ValueError, match="fraction must be a number in \\(0, 1\\]"):
        Schedule.budget(bad)


def test_monitor_feeds_a_budget_and_records_what_it_chose(mlp, tmp_path):
    import time

    from probescope import Probe, open_run

    class Slow(Probe):
        def evaluate(self, model, context):
            time.sleep(0.012)
            return {"step": context.step}

    probe = Slow(name="slow", schedule=Schedule.budget(0.2, start=5))
    with Monitor(mlp, [probe], run_dir=tmp_path / "run", final_frame=False) as mon:
        for _ in range(200):
            time.sleep(0.0015)
            mon.step()
    state = mon.summary()["probes"]["slow"]["schedule"]
    assert state["probe_ms"] >= 10.0 and state["step_ms"] >= 1.4  # measured, not defaults
    assert state["cost_ms"] is not None and state["frames_measured"] >= 1
    assert 1 <= state["interval"] <= 100_000 and mon.summary()["probes"]["slow"]["frames"] >= 2
    recorded = open_run(tmp_path / "run").meta["summary"]["probes"]["slow"]["schedule"]
    assert recorded["interval"] == state["interval"] and recorded["fraction"] == 0.2


def test_a_frame_queued_behind_another_probes_frame_is_not_told_as_in_flight(mlp):
    """Two probes due at one step share one job; the second waits while the first evaluates,
    and the steps beside the first evaluation are its cost, not the waiting probe's. The step
    in which both ran is shared between them by their evaluation times."""
    import threading
    import time

    from probescope import Probe

    class Told(Schedule):
        def __init__(self):
            self.steps, self.quiet, self.shares = [], [], []

        def due(self, info):
            return info.step == 1

        def observe(self, *, step_s=None, probe_s=None, frame=None, copy_s=None, own_s=None, **told):
            if step_s is not None:
                self.steps.append(frame)
                self.quiet.append(told["quiet"])
                self.shares.append(told["share"])

        def state(self):
            return {}  # adaptive: the Monitor tells it every step

    release, started = threading.Event(), threading.Event()

    class Held(Probe):
        def evaluate(self, model, context):
            if context.step == 1:
                started.set()
                release.wait(10)
            return {"step": context.step}

    first, second = Told(), Told()
    probes = [Held(name="held", schedule=first), Held(name="queued", schedule=second)]
    with Monitor(mlp, probes, final_frame=False) as monitor:
        monitor._worker.wait_idle(10)  # the step-0 frames
        monitor.step()  # step 1: both frames launched, in one job; "held" first
        assert started.wait(10)
        monitor.step()  # step 2: "held" evaluating all along, "queued" waiting
        monitor.step()  # step 3: the same
        time.sleep(0.02)  # "held" takes 20 ms or more, "queued" a fraction of one
        release.set()
        monitor._worker.wait_idle(10)
        monitor.step()  # step 4: "queued" ran (and ended) in it
        monitor.step()
    # Each list: what the step ending at steps 2, 3, 4 and 5 was told (the one ending at step 1
    # is the first step timed: nothing before it).
    assert first.steps[-4:] == [1, 1, 1, None]  # its first frame launched by a step
    assert second.steps[-4:] == [None, None, 1, None]
    # No step was idle for either: each ran beside the other's frame, or its own.
    assert first.quiet[-4:] == second.quiet[-4:] == [False, False, False, True]
    # Step 4 ran both frames: "held" had nearly all of the evaluation time in it.
    shared = first.shares[-2], second.shares[-2]
    assert sum(shared) == pytest.approx(1.0) and shared[0] > 0.9
    assert first.shares[-4:-2] + first.shares[-1:] == second.shares[-4:-2] + second.shares[-1:] == [1.0] * 3


def test_a_step_is_shared_evenly_until_every_probe_in_it_has_an_evaluation_time():
    from probescope.monitor import _ProbeState, _shares
    from probescope.probes.base import Probe

    def state(name, *times):
        st = _ProbeState(Probe(name=name), ring=None)
        for ms in times:
            st.stats.run, st.stats.last_ms = st.stats.run + 1, ms
        return st

    assert _shares([state("a", 3.0), state("b", 9.0, 1.0)]) == {"a": 0.75, "b": 0.25}  # the last time
    assert _shares([state("a", 3.0), state("b"), state("c", 1.0)]) == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    )


def test_budget_charges_a_frame_its_share_of_a_step_other_frames_ran_in():
    budget = Schedule.budget(0.05)
    for _ in range(5):
        budget.observe(step_s=0.010)
    budget.observe(step_s=0.110, frame=1, quiet=False, share=0.01)  # beside a long frame
    budget.observe(probe_s=0.001, copy_s=0.0, frame=1)
    budget.observe(step_s=0.010)
    assert budget.cost_s == pytest.approx(0.001)  # 1 % of the 100 ms the step took longer


def test_with_a_run_directory_a_frame_is_in_flight_until_the_recorder_has_written_it(
    mlp, tmp_path, monkeypatch
):
    """Writing a frame to disk is part of what it costs training: its budget is told the
    frame for the steps until the recorder has written it, not only while it is evaluated."""
    import threading
    import time

    from probescope import open_run
    from probescope.run import RunWriter

    class Told(Schedule):
        def __init__(self):
            self.steps = []

        def due(self, info):
            return info.step == 1

        def observe(self, *, step_s=None, probe_s=None, frame=None, copy_s=None, own_s=None):
            if step_s is not None:
                self.steps.append(frame)

        def state(self):
            return {}

    release, writing = threading.Event(), threading.Event()
    write = RunWriter.write_frame

    def slow_write(self, frame):
        if frame.step == 1:
            writing.set()
            release.wait(10)
        return write(self, frame)

    monkeypatch.setattr(RunWriter, "write_frame", slow_write)
    schedule = Told()
    probe = StepProbe(name="quick", schedule=schedule)
    with Monitor(mlp, [probe], run_dir=tmp_path / "run", final_frame=False) as monitor:
        monitor._worker.wait_idle(10)
        monitor.step()  # step 1: the frame is launched
        assert writing.wait(10)  # evaluated; the recorder is writing it
        monitor._worker.wait_idle(10)
        monitor.step()  # step 2: evaluated and being written
        monitor.step()  # step 3: still being written
        release.set()
        frames, deadline = tmp_path / "run" / "probes" / "quick" / "frames", time.monotonic() + 10
        state = monitor._probes["quick"]
        while time.monotonic() < deadline and not (
            list(frames.glob("*.npz")) and getattr(state, "written_seq", 0) >= 0  # the file, and its mark
        ):
            time.sleep(0.001)
        monitor.step()  # step 4: written during it
        monitor.step()  # step 5: nothing in flight
    assert schedule.steps[-4:] == [1, 1, 1, None]
    assert open_run(tmp_path / "run").probe("quick").steps() == [1]


def test_a_budgets_idle_steps_are_those_beside_no_probes_frame():
    budget = Schedule.budget(0.05)
    for _ in range(5):
        budget.observe(step_s=0.030, quiet=False)  # beside another probe's frames
    assert budget.step_s == pytest.approx(0.030)  # no quiet step known yet: these count
    for _ in range(4):
        budget.observe(step_s=0.010)
    assert budget.step_s == pytest.approx(0.030)  # 4 quiet steps are too few alone: all 9 count
    budget.observe(step_s=0.010)
    assert budget.step_s == pytest.approx(0.010)  # 5 quiet steps: the baseline
    budget.observe(step_s=0.030, frame=1)  # its own frame's step: 20 ms over the quiet baseline
    budget.observe(probe_s=0.008, frame=1)
    budget.observe(step_s=0.010)
    assert budget.cost_s == pytest.approx(0.020)


def test_a_budget_part_takes_its_share_of_the_monitors_own_work():
    from probescope.schedule import Budget

    part = Budget(0.025, own_share=0.5)  # one of two probes sharing a 5 % budget
    for _ in range(5):
        part.observe(step_s=0.010)
    for _ in range(5):
        part.observe(own_s=0.0002)
    part.observe(probe_s=0.005)
    assert part.interval == 34  # 5 ms / (2.5 % of 10 ms - half of 0.2 ms) = 33.3
    assert part.describe()["own_share"] == 0.5 and part.state()["own_ms"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="own_share must be a number in"):
        Budget(0.1, own_share=0)


def test_a_monitor_budget_is_shared_by_every_probe(mlp, recording_probe, tmp_path):
    from probescope import open_run
    from probescope.schedule import Budget

    a, b = recording_probe(name="a", schedule=Schedule.every(1)), recording_probe(name="b")
    mon = Monitor(mlp, [a, b], run_dir=tmp_path / "run", budget=0.04, final_frame=False)
    assert all(isinstance(p.schedule, Budget) for p in (a, b))
    assert {(p.schedule.fraction, p.schedule.own_share) for p in (a, b)} == {(0.02, 0.5)}
    assert a.schedule is not b.schedule
    with mon:
        for _ in range(30):
            mon.step()
    summary = open_run(tmp_path / "run").meta["summary"]
    assert summary["budget"] == 0.04
    assert {summary["probes"][n]["schedule"]["fraction"] for n in "ab"} == {0.02}
    assert Monitor(mlp, [recording_probe(name="c")]).summary().get("budget") is None


@pytest.mark.parametrize("bad", [0, 1.5, "2%", True])
def test_a_monitor_budget_must_be_a_fraction(mlp, recording_probe, bad):
    with pytest.raises(ValueError, match="Monitor: budget must be a number in"):
        Monitor(mlp, [recording_probe()], budget=bad)


def test_a_budget_belongs_to_one_probe(mlp, recording_probe):
    shared = Schedule.budget(0.1)
    with pytest.raises(ValueError, match=r"its own Schedule\.budget"):
        Monitor(mlp, [recording_probe(name="a", schedule=shared), recording_probe(name="b", schedule=shared)])


def test_step_clock_reports_each_step_once_its_closing_event_completed():
    from probescope.streams import StepClock

    made, recorded = [], []  # events created; events in the order they were recorded

    class FakeEvent:
        """An event whose completion the test controls; times in seconds of a fake clock.
        Recording again resets it, as with a CUDA event."""

        def __init__(self):
            self.done, self.t = False, None
            made.append(self)

        def record(self, stream=None):
            self.done, self.t = False, now[0]
            recorded.append(self)

        def query(self):
            return self.done

        def elapsed_time(self, other):
            assert self.done and other.done, "elapsed_time of an unfinished event would raise"
            return (other.t - self.t) * 1000.0

    now = [0.0]
    clock = StepClock(event_factory=FakeEvent)
    assert clock.mark("a") == []
    now[0] = 0.010
    assert clock.mark("b") == []  # the GPU has not reached the step boundary yet
    now[0] = 0.025
    recorded[0].done = recorded[1].done = True
    assert clock.mark("c") == [(pytest.approx(0.010), "b")]
    now[0] = 0.045
    recorded[2].done = True
    assert clock.mark("d") == [(pytest.approx(0.015), "c")]  # the new event is not done yet
    now[0] = 0.050
    recorded[3].done = True
    assert clock.mark("e") == [(pytest.approx(0.020), "d")]
    assert len(made) == 3  # finished events are recorded again, not created per step


@pytest.mark.parametrize("question", ["due", "due_at_epoch_end"])
def test_a_schedule_that_raises_disables_its_probe_and_training_goes_on(mlp, blobs, caplog, question):
    import logging

    from probescope import LossProbe

    class Broken(Schedule):
        def due(self, info):
            if question == "due" and info.step == 2:
                raise RuntimeError("broken schedule")
            return False

        def due_at_epoch_end(self, epoch):
            if question == "due_at_epoch_end":
                raise RuntimeError("broken schedule")
            return False

    broken, fine = LossProbe(name="broken", schedule=Broken()), LossProbe(schedule=Schedule.every(1))
    with (
        caplog.at_level(logging.WARNING, logger="probescope"),
        Monitor(mlp, [broken, fine], final_frame=False) as monitor,
    ):
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 6, epoch_every=3)
        monitor.drain()
    assert monitor.step_count == 6 and monitor.stats["loss"].run == 7  # steps 0-6, every one
    probes = monitor.summary()["probes"]
    assert monitor.stats["broken"].run == 0 and not probes["broken"]["enabled"] and probes["loss"]["enabled"]
    assert "had its schedule raise" in caplog.text and "broken schedule" in caplog.text


def test_the_monitor_tells_budgets_their_steps_a_batch_at_a_time_and_the_rest_at_close(mlp):
    import time

    from probescope import Probe

    class Batches(Schedule):
        def __init__(self):
            self.batches = []

        def due(self, info):
            return info.step % 5 == 0

        def observe_steps(self, steps):
            self.batches.append(list(steps))

        def state(self):
            return {}

    class Quick(Probe):
        def evaluate(self, model, context):
            time.sleep(0.003)  # beside a step or two
            return {"step": context.step}

    schedule = Batches()
    monitor = Monitor(mlp, [Quick(name="quick", schedule=schedule)], final_frame=False).start()
    monitor.drain(10)  # the step-0 frame
    for _ in range(20):
        time.sleep(0.002)
        monitor.step()
    told = [len(b) for b in schedule.batches]
    assert told == [Monitor.STEP_BATCH] * 2  # 19 steps timed (the first has no start), 3 kept back
    monitor.close()
    assert [len(b) for b in schedule.batches] == [*told, 3]
    steps = [s for b in schedule.batches for s in b]
    assert all(isinstance(s, StepTime) and s.step_s > 0 for s in steps)
    assert any(s.frame is not None for s in steps) and any(s.frame is None and s.quiet for s in steps)


def test_a_schedule_whose_observe_raises_is_warned_about_once_and_training_goes_on(mlp, caplog):

    class Broken(Schedule):
        def due(self, info):
            return info.step % 4 == 0

        def observe_steps(self, steps):
            raise RuntimeError("cannot count")

        def observe(self, **times):
            raise RuntimeError("cannot count")

        def state(self):
            return {}

    with Monitor(mlp, [StepProbe(name="quick", schedule=Broken())], final_frame=False) as monitor:
        for _ in range(40):
            monitor.step()
            monitor.drain(10)
    warnings = [r for r in caplog.records if "cannot count" in r.getMessage()]
    assert len(warnings) == 1 and "schedule's" in warnings[0].getMessage()
    assert monitor.ring("quick").written == 11  # steps 0, 4, ..., 40: its frames all came


def test_the_monitors_own_work_includes_the_loss_record_and_the_batch_events_handlers(mlp, blobs):
    """A handler of the batch's events (fastai's order: before_batch ... after_batch) runs in
    the training thread: its time is the Monitor's own work, not the step's."""
    import time

    from probescope import Callback, GridProbe

    class Slow(Callback):
        def after_pred(self, monitor, **kwargs):
            time.sleep(0.003)

    probe = GridProbe(blobs.x_train, blobs.y_train, resolution=8, schedule=Schedule.budget(0.05))
    monitor = Monitor(mlp, [probe], callbacks=[Slow()], final_frame=False).start()
    for _ in range(40):
        monitor.before_batch()
        monitor.after_pred()
        time.sleep(0.001)  # the step itself
        monitor.after_loss(loss=torch.tensor(0.5))
        monitor.after_step()
        monitor.after_batch()
    monitor.close()
    state = probe.schedule.state()
    assert state["own_ms"] >= 3.0  # the handler's sleep, counted as the Monitor's
    assert 1.0 <= state["step_ms"] < 3.0  # and not as the step's
