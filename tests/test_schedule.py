"""Schedules fire at exactly the right steps, alone and inside a Monitor."""

import pytest

from probescope import Monitor, Schedule, StepInfo
from tests.conftest import train_steps


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
    budget.observe(step_s=0.010)
    budget.observe(probe_s=0.005)  # 5 ms of probe per 10 ms step at 5 %: every 10 steps
    assert budget.interval == 10
    assert [s for s in range(29, 80) if budget.due(StepInfo(s, 0))] == [38, 48, 58, 68, 78]
    for _ in range(40):  # the step gets 4x slower: the smoothed interval falls towards 3
        budget.observe(step_s=0.040)
    assert budget.interval == 3
    state = budget.state()
    assert state["fraction"] == 0.05 and state["interval"] == 3 and state["changes"][0][1] == 10
    assert budget.describe() == {"kind": "budget", "fraction": 0.05, "start": 7}
    never_slower = Schedule.budget(0.5, max_interval=4)
    never_slower.observe(step_s=0.001, probe_s=1.0)
    assert never_slower.interval == 4


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "2%", True])
def test_budget_rejects_fractions_outside_zero_to_one(bad):
    with pytest.raises(ValueError, match="0 < fraction <= 1"):
        Schedule.budget(bad)


def test_monitor_adapts_a_budget_to_the_measured_times_and_records_it(mlp, tmp_path):
    """A 12 ms probe, ~1.5 ms steps, a 20 % budget: about one frame in 40 steps."""
    import time

    from probescope import Probe

    class Slow(Probe):
        def evaluate(self, model, context):
            time.sleep(0.012)
            return {"step": context.step}

    probe = Slow(name="slow", schedule=Schedule.budget(0.2, start=5))
    with Monitor(mlp, [probe], run_dir=tmp_path / "run", final_frame=False) as mon:
        for _ in range(400):
            time.sleep(0.0015)
            mon.step()
    summary = mon.summary()["probes"]["slow"]
    state = summary["schedule"]
    assert 15 <= state["interval"] <= 80, state
    assert 0.01 <= state["probe_ms"] / 1e3 <= 0.05 and 0.0015 <= state["step_ms"] / 1e3 <= 0.01
    frames = summary["frames"]
    assert 400 / 80 <= frames <= 400 / 15 + 8, summary  # + the first frames at the start interval
    probe_time = summary["total_ms"]
    assert probe_time / (400 * state["step_ms"]) < 0.2 * 1.6  # within the budget, start-up included
    from probescope import open_run

    assert (
        open_run(tmp_path / "run").meta["summary"]["probes"]["slow"]["schedule"]["interval"]
        == state["interval"]
    )


def test_a_budget_belongs_to_one_probe(mlp, recording_probe):
    shared = Schedule.budget(0.1)
    with pytest.raises(ValueError, match=r"its own Schedule\.budget"):
        Monitor(mlp, [recording_probe(name="a", schedule=shared), recording_probe(name="b", schedule=shared)])
