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
