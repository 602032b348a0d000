"""The run directory: every frame of every probe on disk, append-only, readable at any time.

Layout::

    RUN/run.json                      metadata: probes and their configs, model, status, summary
    RUN/probes/<name>/static.npz      arrays that never change (grid axes, data points)
    RUN/probes/<name>/frames/<seq>_<step>.npz one file per frame: its arrays plus __step__, ...
    RUN/model.pt                      the model's final state_dict
    RUN/probes.json, RUN/probes.npz   the probe spec: what was probed (see probescope.spec)
    RUN/checkpoints/                  a CheckpointProbe's weights and checkpoints.json

Every file is written to a temporary name and renamed into place, so a reader (or a crash)
sees each frame whole or not at all: a killed writer loses at most the frame in flight.
Nothing read back is unpickled: arrays load with ``allow_pickle=False`` and the weights with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probescope.history import Series, display_name
from probescope.npz import write_npz
from probescope.ring import Frame
from probescope.units import bytes_text

log = logging.getLogger("probescope")

FORMAT = "probescope-run"
FORMAT_VERSION = 1
_META_KEYS = ("__seq__", "__step__", "__epoch__", "__time__")


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux): tells it from a later
    process given the same pid. None where /proc is not there or holds no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def writer_identity() -> dict[str, Any]:
    """Who writes a run: host, process id, the process's start and the machine's boot (Linux),
    so that a reader can tell whether it still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "boot": _boot_id()}


def writer_alive(writer: Mapping[str, Any] | None) -> bool | None:
    """Whether the process ``writer`` (``writer_identity()``'s record) still runs; None when
    this machine cannot tell (another host, or a run recorded without it)."""
    if not writer or writer.get("host") != socket.gethostname():
        return None
    if writer.get("boot") and _boot_id() and writer["boot"] != _boot_id():
        return False  # the machine restarted since
    pid = int(writer["pid"])
    start = _process_start(pid)
    if start is not None:
        return writer.get("start") in (None, start)  # else another process got its pid
    if Path("/proc/self/stat").exists():
        return False  # /proc is there and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def frame_name(seq: int, step: int) -> str:
    """A frame's file name: its sequence number (zero-padded: names sort in recording order)
    and its step, so listing a probe's steps reads no file."""
    return f"{seq:07d}_{step}.npz"


def _seq_step(path: Path) -> tuple[int, int | None]:
    """A frame file's sequence number and step (None for a run written before names held it)."""
    seq, _, step = path.stem.partition("_")
    return int(seq), int(step) if step else None


def check_same_probe(run: Path, name: str, recorded_kind: str, static_path: Path, kind: str, static) -> None:
    """A resumed run's probe ``name`` must be the one it recorded: the same kind and the same
    static arrays (data points, grid axes, columns); ValueError otherwise."""
    if recorded_kind != kind:
        raise ValueError(f"{run}: probe {name!r} is a {recorded_kind} probe here, not {kind}")
    with np.load(static_path, allow_pickle=False) as z:
        recorded = {k: z[k] for k in z.files}
    if recorded.keys() != set(static) or not all(
        np.array_equal(recorded[k], np.asarray(v)) for k, v in static.items()
    ):
        raise ValueError(
            f"{run}: probe {name!r} is not the one this run recorded (its data, grid or columns "
            "differ); resume with the same probes, or record into another directory"
        )


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file beside it, so that readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_state(model: torch.nn.Module, path: Path) -> None:
    """The model's state_dict, on the host, written atomically (``torch.load(weights_only=True)``
    reads it back into any copy of the model)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


def _write_json(path: Path, obj: Any) -> None:
    # Keys in the order they were made: the probes' order is the one the user gave, which the
    # viewer, exports and compare show them in.
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


HISTORY = "history.npz"  # every scalar series of a run, whole, written at close
# The series as they grow, appended every second or so while the run goes: what a run whose
# process was killed keeps of them. Per series and write, a JSON line ({"series": name,
# "count": n}) and n records (step, epoch, value); an entry cut short by the kill is left out.
# Removed once history.npz holds them.
JOURNAL = "history.journal"
_JOURNAL_RECORD = np.dtype([("step", "<i8"), ("epoch", "<i8"), ("value", "<f8")])


def journal_entry(name: str, steps, epochs, values) -> bytes:
    """One entry of a journal: ``name``'s values at ``steps`` (and their epochs)."""
    records = np.empty((len(steps), 3), np.int64)  # (the bytes of _JOURNAL_RECORDs, filled faster)
    records[:, 0], records[:, 1] = steps, epochs
    records[:, 2] = np.asarray(values, np.float64).view(np.int64)
    header = json.dumps({"series": name, "count": len(records)}).encode()
    return header + b"\n" + records.astype("<i8", copy=False).tobytes()


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray], write=write_npz) -> None:
    atomic_write(path, lambda f: write(f, arrays))


class RunWriter:
    """Writes a run directory. Disk errors are logged once and stop recording, never training."""

    # How a frame's arrays become its .npz (``probescope.npz.write_npz``: what np.savez writes,
    # with less Python); the contention benchmark swaps in np.savez to compare.
    write_arrays = staticmethod(write_npz)

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume_at: int | None = None,
        disk_budget: float | int | None = None,
    ):
        """``resume_at``: continue the run already in ``path`` (if there is one) after that step:
        its frames of later steps move to ``probes/<name>/superseded/`` (kept, not shown), new
        frames are numbered after every frame it holds, and run.json lists the resumption
        (``resumes``). Refused while the process that writes it still runs.

        ``disk_budget``: the bytes of frames this writer may write (an int), or that share of
        the disk's free space as it starts (a float in (0, 1]); None: no limit. Once half of it
        is written, every other frame of each probe is left out, every 3 of 4 from three
        quarters, and so on: the frames thin out as the run goes on instead of stopping, and
        pass the budget only by a frame larger than what it had left (none is written after
        it) and by each probe's newest frame, which ``flush`` writes whatever the budget (the
        run ends on its final frames)."""
        self.path = Path(path)
        self._seq_base: dict[str, int] = {}  # added to a probe's ring numbers (a resumed run)
        self.frames_written = 0
        self.failed = False
        self._budget_arg = disk_budget
        self.disk_budget: int | None = None  # bytes, once the directory exists
        self.bytes_written = 0  # of frames
        self.stride = 1  # a probe's frames: every ``stride``-th is written
        self.thinned_from: int | None = None  # the step of the first frame left out
        self.spent = False  # a frame took the budget whole: none more but the last ones
        self._offered: dict[str, int] = {}  # frames offered per probe
        self.left_out: dict[str, int] = {}  # frames left out per probe
        self._pending: dict[str, Frame] = {}  # each probe's newest frame left out, for flush
        self._journaled: dict[str, int] | None = None  # entries of each series in the journal
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"the run directory {self.path} is a file; choose another run_dir")
        if resume_at is not None and (self.path / "run.json").exists():
            self._reopen(resume_at)
            return
        if (self.path / "run.json").exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.path} already holds a run; pass overwrite=True, resume it (Monitor(resume=True)) "
                    "or choose another directory"
                )
            for folder in ("probes", "checkpoints"):
                shutil.rmtree(self.path / folder, ignore_errors=True)
            for name in ("run.json", "model.pt", "probes.json", "probes.npz", HISTORY, JOURNAL):
                (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "writer": writer_identity(),
            "probes": {},
        }
        self._guard(lambda: _write_json(self.path / "run.json", self.meta))
        self._set_budget()

    def _set_budget(self) -> None:
        budget = self._budget_arg
        if budget is None:
            return
        if isinstance(budget, float):
            budget = int(budget * shutil.disk_usage(self.path).free)
        self.disk_budget = budget

    def _reopen(self, step: int) -> None:
        previous = Run(self.path)
        writer = previous.meta.get("writer") or {}
        if previous.status == "running":
            where = f"process {writer.get('pid')} on {writer.get('host')}"
            if previous.writer_alive():
                raise RuntimeError(
                    f"{self.path}: the run is still being written ({where}); stop it first, or "
                    "record into another directory"
                )
            log.warning(
                "RunWriter %s: resuming a run marked running whose writer (%s) cannot be checked "
                "from this machine; two processes writing one run would mix their frames",
                self.path,
                where,
            )
        moved = 0
        for name, record in previous.probes.items():
            moved += record.supersede_after(step)
            self._seq_base[name] = record.next_seq()
        self.meta = previous.meta
        end = {k: self.meta.pop(k) for k in ("finished", "error") if k in self.meta}
        self.meta.setdefault("resumes", []).append(
            {
                "step": step,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "previous_status": previous.status,
                **({"previous_error": end["error"]} if "error" in end else {}),
                "superseded_frames": moved,
            }
        )
        self.meta.update(status="running", writer=writer_identity())
        self._guard(lambda: _write_json(self.path / "run.json", self.meta))
        log.info("RunWriter %s: resumed at step %d (%d later frame(s) superseded)", self.path, step, moved)
        self._set_budget()

    def _guard(self, action) -> bool:
        if self.failed:
            return False
        try:
            action()
            return True
        except OSError as err:
            self.failed = True
            log.warning("RunWriter %s: cannot write (%s); recording stops, training goes on", self.path, err)
            return False

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into run.json."""
        self.meta.update(fields)
        self._guard(lambda: _write_json(self.path / "run.json", self.meta))

    def add_probe(self, name: str, kind: str, config: dict, static: Mapping[str, np.ndarray]) -> None:
        """Declare a probe: its folder, its config and its static arrays."""
        folder = self.path / "probes" / name
        known = self.meta["probes"].get(name)
        if known is not None and (folder / "static.npz").exists():  # resuming: the same probe
            check_same_probe(self.path, name, known["kind"], folder / "static.npz", kind, static)

        def write() -> None:
            (folder / "frames").mkdir(parents=True, exist_ok=True)
            _write_npz(folder / "static.npz", static)

        self._guard(write)
        self.meta["probes"][name] = {"kind": kind, "config": config}
        self.update_meta()

    def save_probes(self, probes) -> None:
        """Write the probe spec (probes.json and probes.npz, see probescope.spec): what was probed,
        to be loaded again with ``probescope.load_probes(run_dir)``. What it cannot write down
        (a lambda) is listed in run.json and logged at info level: the run itself lacks nothing."""
        from probescope.spec import describe_missing, write_spec

        def write() -> None:
            _, missing = write_spec(probes, self.path / "probes.json")
            gaps = [f"{m.probe}.{m.argument}" for m in missing]
            self.meta["spec"] = {"file": "probes.json", "missing": gaps}
            if missing:  # the run is fine; only building its probes again will need them
                log.info(
                    "RunWriter %s: the probe spec lacks %s; load_probes(..., overrides=...) supplies it",
                    self.path,
                    describe_missing(missing),
                )

        try:
            written = self._guard(write)
        except Exception as err:  # an argument whose own to_json fails: no spec, the run goes on
            log.warning(
                "RunWriter %s: the probe spec is not written (%s: %s)", self.path, type(err).__name__, err
            )
            return
        if written:
            self.update_meta()

    def write_frame(self, frame: Frame) -> bool:
        """Append one frame (or, past half of the disk budget, leave it out as the budget's
        stride says); False if it could not be written or was left out."""
        offered = self._offered.get(frame.probe, 0)
        self._offered[frame.probe] = offered + 1
        if self.spent or offered % self.stride:
            self.left_out[frame.probe] = self.left_out.get(frame.probe, 0) + 1
            self._pending[frame.probe] = frame
            return False
        self._pending.pop(frame.probe, None)
        return self._write(frame)

    def flush(self) -> None:
        """Write each probe's newest frame if the budget left it out: a run ends on its final
        frames."""
        for name, frame in list(self._pending.items()):
            if self._write(frame):
                self.left_out[name] -= 1
        self._pending.clear()

    def _write(self, frame: Frame) -> bool:
        arrays = dict(frame.data)
        seq = frame.seq + self._seq_base.get(frame.probe, 0)
        arrays.update(
            __seq__=np.int64(seq),
            __step__=np.int64(frame.step),
            __epoch__=np.int64(frame.epoch),
            __time__=np.float64(frame.time),
        )
        path = self.path / "probes" / frame.probe / "frames" / frame_name(seq, frame.step)
        ok = self._guard(lambda: _write_npz(path, arrays, self.write_arrays))
        self.frames_written += ok
        if ok:  # what the file takes on the disk: its size in whole blocks of 4 KiB
            self.bytes_written += -(-path.stat().st_size // 4096) * 4096
            self._thin(frame.step)
        return ok

    def _thin(self, step: int) -> None:
        """Past ``1 - 1 / (2 * stride)`` of the budget, double the stride: half of the budget
        at stride 1, a quarter at 2, ... (the frames never pass it)."""
        if self.disk_budget is None or self.spent:
            return
        if self.bytes_written >= self.disk_budget:  # (a frame larger than what was left)
            self.spent = True
            log.warning(
                "RunWriter %s: the disk budget (disk_budget=%s) is spent; no more frames are written "
                "but each probe's last, at the end",
                self.path,
                bytes_text(self.disk_budget),
            )
            return
        while self.bytes_written >= self.disk_budget * (1.0 - 0.5 / self.stride):
            self.stride *= 2
            if self.thinned_from is None:
                self.thinned_from = step
            log.warning(
                "RunWriter %s: %s of frames written, %s of the disk budget (disk_budget=%s); from "
                "now on it keeps every %s frame of each probe (the viewer, the sinks and the "
                "rings still get them all, and each probe's last is written at the end)",
                self.path,
                bytes_text(self.bytes_written),
                f"{self.bytes_written / self.disk_budget:.0%}",
                bytes_text(self.disk_budget),
                "other" if self.stride == 2 else f"{self.stride}th",
            )

    def disk_detail(self) -> dict[str, Any]:
        """What the frames took and what the disk budget left out (run.json's ``disk``)."""
        return {
            "budget_bytes": self.disk_budget,
            "frames_bytes": self.bytes_written,
            "stride": self.stride,
            "thinned_from_step": self.thinned_from,
            "spent": self.spent,
            "left_out": {name: n for name, n in self.left_out.items() if n},
        }

    def write_history(self, series: Mapping[str, Series]) -> None:
        """Store every scalar series of the run, whole, as history.npz (``<name>/steps``,
        ``<name>/epochs``, ``<name>/values``; the batch losses under ``train_loss``); the
        journal goes once it is written."""
        arrays = {}
        for name, one in series.items():
            key = display_name(name)
            arrays[f"{key}/steps"] = np.asarray(one.steps, np.int64)
            arrays[f"{key}/epochs"] = np.asarray(one.epochs, np.int64)
            arrays[f"{key}/values"] = np.asarray(one.values, np.float64)
        if self._guard(lambda: _write_npz(self.path / HISTORY, arrays)):
            self._guard(lambda: (self.path / JOURNAL).unlink(missing_ok=True))

    def journal_history(self, series: Mapping[str, Series]) -> None:
        """Append to the journal (history.journal) what ``series`` (every series so far, as
        ``History.read`` gives them) holds beyond the previous call. The first call writes the
        journal anew (a resumed run's series, loaded from the one before, come with it)."""
        first = self._journaled is None
        done = {} if first else self._journaled
        entries = []
        for name, one in series.items():
            start, end = done.get(name, 0), len(one.values)
            if end > start:
                entries.append(
                    journal_entry(
                        display_name(name), one.steps[start:end], one.epochs[start:end], one.values[start:end]
                    )
                )
        if not entries and not first:
            return
        data = b"".join(entries)

        def write() -> None:
            if first:
                atomic_write(self.path / JOURNAL, lambda f: f.write(data))
            else:
                with open(self.path / JOURNAL, "ab") as f:
                    f.write(data)

        if self._guard(write):
            self._journaled = {name: len(one.values) for name, one in series.items()}

    def save_model(self, model: torch.nn.Module) -> None:
        """Save the model's state_dict as model.pt."""
        self._guard(lambda: save_state(model, self.path / "model.pt"))

    def save_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Save a state_dict made already (a sharded model's, gathered whole) as model.pt."""
        self._guard(lambda: atomic_write(self.path / "model.pt", lambda f: torch.save(dict(state), f)))

    def write_table(self, name: str) -> None:
        """Store a tabular probe's frames as ``probes/<name>/table.parquet`` (needs pandas, pyarrow)."""
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            log.info("RunWriter: pandas or pyarrow is missing; %s's table stays in its frames", name)
            return
        table = Run(self.path).probe(name).table()
        path = self.path / "probes" / name / "table.parquet"
        self._guard(lambda: atomic_write(path, lambda f: table.to_parquet(f, index=False)))

    def finish(self, summary: dict, error: BaseException | None = None) -> None:
        """Store the run's summary and how it ended: ``finished``, or with the ``error`` that
        ended training, ``interrupted`` (Ctrl-C, SIGTERM, ``sys.exit``) or ``failed`` (the
        error in ``error``)."""
        status = "finished"
        if error is not None:
            status = "interrupted" if isinstance(error, KeyboardInterrupt | SystemExit) else "failed"
            self.meta["error"] = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.update_meta(
            status=status,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            summary=summary,
            disk=self.disk_detail(),
        )


class ProbeRecord:
    """The recorded frames of one probe; re-lists its folder on ``refresh()`` while a run grows."""

    def __init__(self, run: Run, name: str, info: dict):
        self.run, self.name = run, name
        self.kind: str = info["kind"]
        self.config: dict = info.get("config", {})
        self.folder = run.path / "probes" / name
        self._static: dict[str, np.ndarray] | None = None
        self.paths: list[Path] = []
        self.refresh()

    def refresh(self) -> int:
        """Pick up frames written since the last look; returns the frame count."""
        self.paths = sorted(p for p in (self.folder / "frames").glob("*.npz") if not p.name.startswith("."))
        return len(self.paths)

    @property
    def static(self) -> dict[str, np.ndarray]:
        """The probe's arrays that never change."""
        if self._static is None:
            with np.load(self.folder / "static.npz", allow_pickle=False) as z:
                self._static = {k: z[k] for k in z.files}
        return self._static

    def __len__(self) -> int:
        return len(self.paths)

    def frame(self, index: int) -> Frame:
        """Frame number ``index`` in recording order (negative counts from the end)."""
        with np.load(self.paths[index], allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if k not in _META_KEYS}
            return Frame(
                probe=self.name,
                seq=int(z["__seq__"]),
                step=int(z["__step__"]),
                epoch=int(z["__epoch__"]),
                time=float(z["__time__"]),
                data=data,
            )

    def supersede_after(self, step: int) -> int:
        """Move the frames of steps after ``step`` into ``superseded/`` (a run resumed from
        ``step`` records them again); returns how many moved."""
        moved = 0
        target = self.folder / "superseded"
        while self.paths and self._step_of(-1) > step:  # steps grow with the sequence
            path = self.paths.pop()
            target.mkdir(exist_ok=True)
            os.replace(path, target / path.name)
            moved += 1
        return moved

    def check_same(self, kind: str, static: Mapping[str, np.ndarray]) -> None:
        """ValueError unless a probe of ``kind`` with ``static`` is the one recorded here."""
        check_same_probe(self.run.path, self.name, self.kind, self.folder / "static.npz", kind, static)

    def next_seq(self) -> int:
        """A sequence number after every frame the probe ever recorded, superseded ones too."""
        paths = (*self.paths, *(self.folder / "superseded").glob("*.npz"))
        return max((_seq_step(p)[0] for p in paths), default=-1) + 1

    def frames(self) -> Iterator[Frame]:
        """Every recorded frame, oldest first."""
        for i in range(len(self.paths)):
            yield self.frame(i)

    def steps(self) -> list[int]:
        """The step of every recorded frame (from the file names: no file is read)."""
        return [self._step_of(i) for i in range(len(self.paths))]

    def _step_of(self, index: int) -> int:
        step = _seq_step(self.paths[index])[1]
        return step if step is not None else self.frame(index).step

    def table(self):
        """A tabular probe's frames (e.g. StatsProbe's) as a pandas DataFrame: one row per frame,
        columns ``step``, ``epoch``, ``time`` and one per metric. Reads ``table.parquet`` when
        the run has ended (written at its close), else the frames recorded so far."""
        import pandas as pd

        parquet = self.folder / "table.parquet"
        if parquet.exists() and self.run.meta.get("status") != "running":  # written at close
            return pd.read_parquet(parquet)
        if "columns" not in self.static:
            raise ValueError(f"probe {self.name!r} ({self.kind}) does not record a table")
        columns = [str(c) for c in self.static["columns"]]
        rows = []
        for frame in self.frames():
            row = {"step": frame.step, "epoch": frame.epoch, "time": frame.time}
            row.update(zip(columns, frame.data["values"].tolist(), strict=True))
            row.update({k: float(v) for k, v in frame.data.items() if k != "values" and v.ndim == 0})
            rows.append(row)
        return pd.DataFrame(rows, columns=["step", "epoch", "time", *columns] if not rows else None)


class Run:
    """A run directory opened for reading (also while it is still being written)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "run.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a probescope run (no run.json)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a probescope run file")
        self.probes = {name: ProbeRecord(self, name, info) for name, info in self.meta["probes"].items()}

    @property
    def status(self) -> str:
        """How the run stands: ``running``, ``finished``, ``interrupted``, ``failed`` (run.json's
        status), or ``stopped``: run.json says running but its writer's process is gone
        (killed, crashed, the machine restarted) without closing it. A run written on another
        machine is taken at its word."""
        return _status(self.meta)

    def writer_alive(self) -> bool | None:
        """Whether the process that writes the run still runs (None: this machine cannot tell)."""
        return writer_alive(self.meta.get("writer"))

    def last_written(self) -> float:
        """When anything in the run was last written (seconds since the epoch): run.json or
        the newest frame of each probe."""
        paths = [self.path / "run.json", *(p.paths[-1] for p in self.probes.values() if p.paths)]
        return max(p.stat().st_mtime for p in paths if p.exists())

    def last_step(self) -> int | None:
        """The step of the newest recorded frame of any probe (None before the first)."""
        steps = [p._step_of(-1) for p in self.probes.values() if len(p)]
        return max(steps) if steps else None

    def probe(self, name: str) -> ProbeRecord:
        """One probe's record, by name."""
        if name not in self.probes:
            raise KeyError(f"no probe {name!r} in {self.path}; it has {sorted(self.probes)}")
        return self.probes[name]

    def history(self) -> dict[str, Series]:
        """Every scalar series of the run: name -> ``Series(steps, epochs, values)``, the batch
        losses as ``train_loss``. A closed run's are whole (history.npz). A run not closed (that
        trains, or whose process was killed) has them as the journal the Monitor appends every
        second (``Monitor.JOURNAL_SECONDS``) last held them, then, for the steps after, as its
        newest LossProbe frame holds them (cut to the probe's ``max_points``)."""
        path = self.path / HISTORY
        journal = self.path / JOURNAL
        if journal.exists():  # (removed once history.npz is whole)
            return self._after_journal(read_journal(journal))
        if not path.exists():
            return self._after_journal({})
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
        names = dict.fromkeys(key.rpartition("/")[0] for key in arrays)
        return {n: Series(arrays[f"{n}/steps"], arrays[f"{n}/epochs"], arrays[f"{n}/values"]) for n in names}

    def _after_journal(self, series: dict[str, Series]) -> dict[str, Series]:
        """``series`` and, after each one's last step, the points of the newest LossProbe frame."""
        from probescope.probes.loss import frame_history

        newest = [
            (record, record.frame(-1))
            for record in self.probes.values()
            if record.kind == "loss" and len(record)
        ]
        if not newest:
            return series
        record, frame = max(newest, key=lambda pair: pair[1].step)
        for name, points in frame_history(frame, record.config).items():
            known = series.get(name)
            after = int(known.steps[-1]) if known is not None and len(known.steps) else -1
            keep = points.steps > after
            if not keep.any():
                continue
            fields = [(points.steps, "steps"), (points.epochs, "epochs"), (points.values, "values")]
            series[name] = Series(
                *(
                    array[keep] if known is None else np.concatenate([getattr(known, field), array[keep]])
                    for array, field in fields
                )
            )
        return series

    def model_state(self) -> dict[str, torch.Tensor]:
        """The final weights (model.pt), loaded without unpickling arbitrary objects."""
        return torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)

    def wait_for_frames(self, timeout: float) -> None:
        """Sleep until new frames appear in any probe or ``timeout`` passes (for following a run)."""
        counts = {n: len(p) for n, p in self.probes.items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.refresh() != counts[n] for n, p in self.probes.items()):
                return
            time.sleep(0.1)


def read_journal(path: Path) -> dict[str, Series]:
    """The series a journal (history.journal) holds, each in the order it was appended; an
    entry the writer had not finished (the process killed while it wrote) is left out."""
    blob = path.read_bytes()
    parts: dict[str, list[np.ndarray]] = {}
    pos = 0
    while pos < len(blob):
        end = blob.find(b"\n", pos)
        if end < 0:
            break
        try:
            header = json.loads(blob[pos:end])
            name, count = header["series"], int(header["count"])
        except (ValueError, KeyError, TypeError):
            break  # a header cut short
        start = end + 1
        if start + count * _JOURNAL_RECORD.itemsize > len(blob):
            break  # records cut short
        parts.setdefault(name, []).append(np.frombuffer(blob, _JOURNAL_RECORD, count, start))
        pos = start + count * _JOURNAL_RECORD.itemsize
    series = {}
    for name, chunks in parts.items():
        records = np.concatenate(chunks)
        series[name] = Series(records["step"].copy(), records["epoch"].copy(), records["value"].copy())
    return series


def open_run(path: str | os.PathLike) -> Run:
    """Open a run directory for reading."""
    return Run(path)


def run_status(path: str | os.PathLike) -> str:
    """:attr:`Run.status` from run.json alone (no listing of frames): for a follower's polls."""
    return _status(json.loads((Path(path) / "run.json").read_text()))


def _status(meta: dict) -> str:
    status = meta.get("status", "unknown")
    if status == "running" and writer_alive(meta.get("writer")) is False:
        return "stopped"
    return status


def started(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run whose Monitor has declared all its probes (a viewer that
    opens it then sees every one), or one that ended."""
    meta_path = Path(path) / "run.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())  # whole: written through a rename
    return "model" in meta or meta.get("status") != "running"


def wait_for_run(path: str | os.PathLike, timeout: float | None = None, poll: float = 0.2) -> Run:
    """Open the run at ``path`` once it has started (``started``), waiting for it as long as
    ``timeout`` seconds (None: as long as it takes): a viewer started before the training job.
    TimeoutError when it has not started by then."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not started(path):
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{path}: no run started there within {timeout:g} s")
        time.sleep(poll)
    return Run(path)
