"""The run directory: append-only, readable while written and after a kill, no pickle."""

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch

from probescope import GridProbe, LossProbe, Monitor, Schedule, open_run
from probescope.compare import compare_runs
from probescope.run import JOURNAL, RunWriter, read_journal
from tests.conftest import train_steps


def test_every_frame_lands_with_its_step_epoch_and_config(tmp_path, mlp, blobs):
    probes = [GridProbe(blobs.x_train, blobs.y_train, resolution=12, schedule=Schedule.every(3)), LossProbe()]
    with Monitor(mlp, probes, run_dir=tmp_path, metadata={"note": "hi"}) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 10, epoch_every=5)
    run = open_run(tmp_path)
    assert run.meta["status"] == "finished" and run.meta["metadata"] == {"note": "hi"}
    grid = run.probe("grid")
    assert grid.steps() == [0, 3, 6, 9, 10]
    assert [f.epoch for f in grid.frames()] == [0, 0, 1, 1, 1]  # the final frame: epoch of step 10
    assert grid.config["resolution"] == [12, 12] and grid.config["schedule"] == {"kind": "every", "n": 3}
    np.testing.assert_array_equal(grid.frame(-1).data["rgba"], monitor.latest("grid").data["rgba"])
    assert grid.static["points_label"].shape[0] == blobs.x_train.shape[0]
    assert run.probe("loss").steps() == [0, 5, 10]
    assert run.meta["summary"]["probes"]["grid"]["run"] == 5


@pytest.mark.parametrize(
    ("error", "status"),
    [(KeyboardInterrupt(), "interrupted"), (FloatingPointError("loss is nan"), "failed")],
    ids=["ctrl-c", "error"],
)
def test_a_run_ended_by_an_error_says_so_and_keeps_its_frames(tmp_path, mlp, blobs, capsys, error, status):
    from probescope.cli import main

    with pytest.raises(type(error)), Monitor(mlp, [LossProbe(schedule=Schedule.every(1))], run_dir=tmp_path):
        raise error
    run = open_run(tmp_path)
    assert run.meta["status"] == status and run.probe("loss").steps() == [0]
    message = "KeyboardInterrupt" if status == "interrupted" else "FloatingPointError: loss is nan"
    assert run.meta["error"] == message
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"status    {status}" in out and f"error     {message}" in out


LEFT_OPEN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from probescope import LossProbe, Monitor, Schedule
    model = nn.Linear(2, 2)
    monitor = Monitor(model, [LossProbe(schedule=Schedule.every(100))], run_dir=sys.argv[1]).start()
    for step in range(3):
        monitor.step(loss=float(step))
    if sys.argv[2] == "raise":
        raise RuntimeError("the data ran out")
""")


@pytest.mark.parametrize("ending", ["exit", "raise"])
def test_a_monitor_a_script_left_open_is_closed_at_exit(tmp_path, ending):
    done = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN, str(tmp_path), ending], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == (0 if ending == "exit" else 1), done.stderr[-2000:]
    assert "Monitor: closed at exit" in done.stderr
    run = open_run(tmp_path)
    assert run.probe("loss").steps() == [0, 3]  # the final frame, taken by the close at exit
    assert run.model_state()["weight"].shape == (2, 2)
    if ending == "exit":
        assert run.meta["status"] == "finished" and "error" not in run.meta
    else:
        assert run.meta["status"] == "failed" and run.meta["error"] == "RuntimeError: the data ran out"


def test_final_weights_are_a_state_dict_that_loads_without_pickle(tmp_path, mlp, blobs):
    with Monitor(mlp, [GridProbe(blobs.x_train, resolution=4)], run_dir=tmp_path) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)
    state = open_run(tmp_path).model_state()  # torch.load(weights_only=True)
    for key, value in mlp.state_dict().items():
        assert torch.equal(state[key], value)


def test_frames_are_plain_npy_arrays_without_pickled_objects(tmp_path, mlp, blobs):
    with Monitor(mlp, [GridProbe(blobs.x_train, resolution=4), LossProbe()], run_dir=tmp_path) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    for path in (tmp_path / "probes").rglob("*.npz"):
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                assert z[key].dtype != object
        assert all(name.endswith(".npy") for name in zipfile.ZipFile(path).namelist())


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path, mlp, blobs):
    Monitor(mlp, [], run_dir=tmp_path).start().close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Monitor(mlp, [], run_dir=tmp_path).start()
    Monitor(mlp, [], run_dir=tmp_path, overwrite=True).start().close()


def test_a_run_directory_that_is_a_file_is_refused_by_name(tmp_path, mlp):
    (tmp_path / "run").write_text("not a run")
    with pytest.raises(NotADirectoryError, match=r"run directory .*run is a file; choose another run_dir"):
        Monitor(mlp, [], run_dir=tmp_path / "run").start()
    assert (tmp_path / "run").read_text() == "not a run"


def test_a_full_disk_stops_recording_with_one_warning_and_training_goes_on(
    tmp_path, mlp, blobs, caplog, monkeypatch
):
    import probescope.run as run_module

    monitor = Monitor(
        mlp, [GridProbe(blobs.x_train, resolution=4, schedule=Schedule.every(1))], run_dir=tmp_path
    ).start()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "_write_npz", full)
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 5)
    monitor.close()
    assert monitor.step_count == 5 and monitor.stats["grid"].run == 6
    warnings = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on" in warnings[0].getMessage()


def test_a_frame_the_writer_cannot_store_is_left_out_and_the_next_ones_are_written(
    tmp_path, mlp, blobs, caplog, monkeypatch
):
    # Anything else than a disk error (which stops recording, above) costs that frame only:
    # the recorder thread once died of it and recorded nothing more, with no warning of ours.
    import probescope.run as run_module

    write, calls = run_module._write_npz, []

    def fails_once(path, arrays, *args):
        if path.parent.name == "frames":
            calls.append(path.name)
            if len(calls) == 2:
                raise ValueError("cannot store this frame")
        write(path, arrays, *args)

    monkeypatch.setattr(run_module, "_write_npz", fails_once)
    probe = GridProbe(blobs.x_train, resolution=4, schedule=Schedule.every(1))
    monitor = Monitor(mlp, [probe], run_dir=tmp_path, final_frame=False).start()
    with caplog.at_level(logging.WARNING, logger="probescope"):
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 5)
        monitor.close()
    assert monitor.stats["grid"].run == 6 and len(calls) == 6
    assert sorted(p.name for p in (tmp_path / "probes" / "grid" / "frames").iterdir()) == sorted(
        calls[:1] + calls[2:]
    )
    warnings = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(warnings) == 1 and "ValueError: cannot store this frame" in warnings[0]


WRITER = textwrap.dedent("""
    import pathlib, sys, torch
    from torch import nn
    from probescope import GridProbe, LossProbe, Monitor, Schedule
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [GridProbe(x, y, resolution=64, schedule=Schedule.every(1)), LossProbe()]
    Monitor.JOURNAL_SECONDS = 0.1  # the series into the journal ten times a second
    monitor = Monitor(model, probes, run_dir=sys.argv[1])

    def train():
        while True:  # until the process is told to stop
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            monitor.step(loss=loss.detach())

    try:
        if sys.argv[2] == "with":
            with monitor:
                train()
        else:  # started, never closed: the interpreter's exit closes it
            monitor.start()
            train()
    finally:
        pathlib.Path(sys.argv[1], "unwound").write_text("the loop's finally ran")
""")


def _journaled_losses(run_dir) -> np.ndarray:
    losses = read_journal(run_dir / JOURNAL).get("train_loss") if (run_dir / JOURNAL).exists() else None
    return np.empty(0) if losses is None else losses.steps


def test_a_writer_killed_mid_run_leaves_a_readable_run(tmp_path, capsys):
    from probescope.cli import main

    run_dir = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "exit"])
    try:
        frames = run_dir / "probes" / "grid" / "frames"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(frames.glob("*.npz"))) < 20:
            time.sleep(0.05)
        assert len(list(frames.glob("*.npz"))) >= 20, "the writer did not record frames in time"
        while time.monotonic() < deadline and len(_journaled_losses(run_dir)) < 10:
            time.sleep(0.05)
        live = open_run(run_dir)
        assert live.status == "running" and live.writer_alive() is True
        assert live.meta["writer"]["pid"] == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = open_run(run_dir)
    assert run.meta["status"] == "running"  # as the writer left it; the reader knows better:
    assert run.status == "stopped" and run.writer_alive() is False
    assert not (run_dir / "unwound").exists()  # SIGKILL: nothing ran after it
    grid = run.probe("grid")
    assert len(grid) >= 20
    steps = [frame.step for frame in grid.frames()]  # every file loads whole
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert grid.frame(-1).data["probs"].shape == (64, 64, 2)
    assert run.last_step() == steps[-1]
    row = compare_runs([run_dir]).iloc[0]
    assert row["status"] == "stopped" and row["last_step"] == steps[-1] and row.isna()["steps"]
    # Its batch losses as the journal last had them: every one from the first step, in order.
    losses = run.history()["train_loss"]
    assert losses.steps.tolist() == list(range(1, len(losses.steps) + 1)) and len(losses.steps) >= 10
    assert np.isfinite(losses.values).all() and not (run_dir / "history.npz").exists()
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "history   history.journal as last written, then the newest LossProbe frame: train_loss" in out
    assert "status    stopped" in out
    assert f"process {proc.pid} on {socket.gethostname()} is gone: the run ended without closing" in out
    assert f"no summary (written when the Monitor closes); the last frame is of step {steps[-1]}" in out


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    RunWriter(tmp_path / "run")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line (``probescope info RUN | head -0``)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "probescope.cli", "info", str(tmp_path / "run")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_whether_a_writer_runs_is_told_only_where_it_can_be(tmp_path, monkeypatch):
    import probescope.run as run_module

    me = run_module.writer_identity()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    assert run_module.writer_alive(me) is True
    assert run_module.writer_alive({**me, "host": me["host"] + "-other"}) is None  # not checked
    assert run_module.writer_alive(None) is None  # a run.json without the record
    if me["start"] is not None:  # Linux: a later process given the same pid is not the writer
        assert run_module.writer_alive({**me, "start": me["start"] + 1}) is False
    if me["boot"] is not None:  # the machine restarted since
        assert run_module.writer_alive({**me, "boot": "another-boot"}) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    assert run_module.writer_alive({**me, "pid": child.pid, "start": None}) is False
    # Without /proc (macOS): a signal 0 tells whether the pid is there.
    monkeypatch.setattr(run_module, "_process_start", lambda pid: None)
    monkeypatch.setattr(run_module, "_boot_id", lambda: None)
    monkeypatch.setattr(run_module.Path, "exists", lambda self: False)
    assert run_module.writer_alive({**me, "boot": None}) is True
    assert run_module.writer_alive({**me, "pid": child.pid, "boot": None}) is False


def test_a_reader_follows_a_run_while_it_is_written(tmp_path, mlp, blobs):
    monitor = Monitor(
        mlp, [GridProbe(blobs.x_train, resolution=4, schedule=Schedule.every(1))], run_dir=tmp_path
    ).start()
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 2)
    run = open_run(tmp_path)
    grid = run.probe("grid")

    def recorded(count):
        deadline = time.monotonic() + 10
        while grid.refresh() < count and time.monotonic() < deadline:
            run.wait_for_frames(timeout=0.5)
        return len(grid)

    assert recorded(3) == 3  # steps 0, 1, 2
    train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 3)
    assert recorded(6) == 6
    assert grid.steps() == [0, 1, 2, 3, 4, 5]
    monitor.close()


@pytest.mark.parametrize(
    ("closed_by", "signum"), [("with", signal.SIGTERM), ("exit", signal.SIGTERM), ("with", signal.SIGHUP)]
)
def test_sigterm_closes_the_run_whole_and_exits_143(tmp_path, closed_by, signum):
    run_dir, script = tmp_path / "run", tmp_path / "train.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), closed_by], stderr=subprocess.PIPE, text=True
    )
    try:
        frames = run_dir / "probes" / "grid" / "frames"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(frames.glob("*.npz"))) < 6:
            time.sleep(0.05)  # (frames of steps 0 to 5: 5 steps at least)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr  # 143 for SIGTERM, 129 for SIGHUP
    run = open_run(run_dir)
    assert run.status == "interrupted" and run.meta["error"] == f"Terminated: the process got {name}"
    assert run.meta["summary"]["steps"] >= 5 and (run_dir / "model.pt").exists()
    assert len(run.probe("loss")) >= 1  # the final frames were taken
    assert (run_dir / "unwound").exists()
    assert stderr.count(f"{name}: closing the run") == 1 and "closed at exit" not in stderr
    assert "Traceback" not in stderr


def test_sigterm_handling_is_the_monitors_only_while_one_is_open_and_never_the_programs(tmp_path, mlp):
    import probescope.shutdown as shutdown

    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    first, second = Monitor(mlp, []).start(), Monitor(mlp, []).start()
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGHUP) is shutdown._on_sigterm
    first.close()
    assert signal.getsignal(signal.SIGTERM) is shutdown._on_sigterm  # the second is open
    second.close()
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    with Monitor(mlp, [], handle_sigterm=False):
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def programs_own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, programs_own)
    try:
        with Monitor(mlp, []):
            assert signal.getsignal(signal.SIGTERM) is programs_own
            assert signal.getsignal(signal.SIGHUP) is shutdown._on_sigterm  # none of its own
        assert signal.getsignal(signal.SIGTERM) is programs_own
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_forked_child_dies_of_sigterm_as_it_would_without_a_monitor(mlp):
    with Monitor(mlp, []):
        child = os.fork()  # a data loader's worker, say: a copy of this thread, not of the Monitor's
        if child == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            os._exit(7)  # reached only if SIGTERM did not end it
        _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_run_has_started_once_its_monitor_declared_its_probes(tmp_path, mlp):
    from probescope.run import started, wait_for_run

    path = tmp_path / "run"
    assert not started(path)
    with pytest.raises(TimeoutError, match=r"no run started there within 0\.3 s"):
        wait_for_run(path, timeout=0.3, poll=0.05)
    writer = RunWriter(path)
    writer.add_probe("loss", "loss", {}, {})
    assert not started(path)  # probes may still be coming
    writer.update_meta(model={"class": "Linear"})  # what Monitor.start writes once they are all in
    assert started(path) and wait_for_run(path, timeout=0).probes.keys() == {"loss"}
    other = RunWriter(tmp_path / "plain")
    other.finish({})  # a run that ended, however it was written
    assert started(tmp_path / "plain")


def test_a_probes_steps_are_listed_from_its_file_names(tmp_path, mlp, blobs, monkeypatch):
    probe = GridProbe(blobs.x_train, resolution=4, schedule=Schedule.every(3))
    with Monitor(mlp, [probe], run_dir=tmp_path) as monitor:
        train_steps(monitor, mlp, blobs.x_train, blobs.y_train, 9)
    grid = open_run(tmp_path).probe("grid")
    want = [frame.step for frame in grid.frames()]
    assert want == [0, 3, 6, 9]
    # A run written before names held the step: its frames are read for it.
    old = grid.paths[1]
    old.rename(old.with_name(old.name.split("_")[0] + ".npz"))
    grid = open_run(tmp_path).probe("grid")
    read = []
    original = grid.frame
    monkeypatch.setattr(grid, "frame", lambda index: read.append(index) or original(index))
    assert grid.steps() == want and read == [1]  # the one old name only
    assert open_run(tmp_path).last_step() == 9


def _frame(probe: str, seq: int, kib: int = 12):
    """A frame of ``kib`` KiB of data (16 KiB on the disk with the .npz's headers, in 4 KiB blocks)."""
    from probescope.ring import Frame

    return Frame(probe, seq, seq, 0, 0.0, {"v": np.full(kib * 256, seq, np.float32)})


def test_a_disk_budget_thins_the_frames_written_so_that_they_never_pass_it(tmp_path, caplog):
    budget = 16 * 2**10 * 16  # sixteen frames of 16 KiB
    writer = RunWriter(tmp_path / "run", disk_budget=budget)
    writer.add_probe("a", "mine", {}, {})
    with caplog.at_level(logging.WARNING, logger="probescope"):
        written = [seq for seq in range(200) if writer.write_frame(_frame("a", seq))]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "run" / "probes" / "a" / "frames").iterdir())
    assert writer.bytes_written <= budget and on_disk <= budget
    # Half the budget at every frame (8), a quarter at every 2nd (4), an eighth at every 4th (2), ...
    assert written[:8] == list(range(8)) and written[8:12] == [8, 10, 12, 14]
    assert written[12:14] == [16, 20]
    assert all(b - a >= 8 for a, b in itertools.pairwise(written[14:]))  # then sparser
    assert writer.thinned_from == 7 and writer.left_out["a"] == 200 - len(written)
    assert "keeps every other frame of each probe" in caplog.text and "keeps every 4th frame" in caplog.text
    writer.flush()  # the last frame, which the stride left out, is written at the end
    run = open_run(tmp_path / "run")
    assert run.probe("a").steps()[-1] == 199 and writer.left_out["a"] == 199 - len(written)
    detail = writer.disk_detail()
    assert detail["budget_bytes"] == budget and detail["stride"] == writer.stride >= 16
    assert detail["left_out"] == {"a": 199 - len(written)} and detail["thinned_from_step"] == 7


def test_a_disk_budget_given_as_a_share_is_of_the_free_space_at_the_start(tmp_path):
    import shutil

    writer = RunWriter(tmp_path / "run", disk_budget=0.25)
    free = shutil.disk_usage(tmp_path).free
    assert abs(writer.disk_budget - free / 4) < 0.01 * free  # (other processes write meanwhile)
    assert RunWriter(tmp_path / "other").disk_budget is None  # no budget: every frame


def test_a_monitor_on_a_disk_budget_ends_its_run_on_its_final_frames(tmp_path, capsys):
    from probescope.cli import main

    model = torch.nn.Linear(2, 3)
    grid = GridProbe(torch.randn(30, 2), resolution=64, schedule=Schedule.every(1))  # 64 KiB a frame
    frame = 68 * 2**10  # on the disk
    with Monitor(model, [grid], run_dir=tmp_path / "run", snapshot="sync", disk_budget=8 * frame) as monitor:
        for _ in range(40):
            monitor.step()
            time.sleep(0.02)  # the recorder keeps up: the ring loses none
    run = open_run(tmp_path / "run")
    steps = run.probe("grid").steps()
    assert run.meta["summary"]["probes"]["grid"]["dropped"] == 0
    assert steps[:4] == [0, 1, 2, 3] and steps[-1] == 40 and len(steps) < 12
    disk = run.meta["disk"]
    assert disk["frames_bytes"] <= 9 * frame  # the budget, and the final frame written whatever it is
    left = 41 - len(steps)
    assert disk["left_out"] == {"grid": left} and run.meta["summary"]["probes"]["grid"]["left_out"] == left
    assert main(["info", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert f"{left} left out (disk budget)" in text and f"kept at the end, {left} left out" in text


@pytest.mark.parametrize(
    ("budget", "error"),
    [(0, ValueError), (1.5, ValueError), (-3, ValueError), ("1G", TypeError), (True, TypeError)],
)
def test_a_disk_budget_must_be_bytes_or_a_share_of_the_free_disk(budget, error):
    with pytest.raises(error, match="disk_budget"):
        Monitor(torch.nn.Linear(2, 2), [], disk_budget=budget)
