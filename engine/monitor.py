"""Monitor: attaches probes to a training run and keeps them off the training path."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.optim.optimizer import register_optimizer_step_pre_hook

from probescope.distributed import Placement, check_sharded, placement, sharding, unwrap, wrapper_names
from probescope.events import EVENTS, Callback
from probescope.gather import GatheredPool, GatherPlan, build_unsharded
from probescope.graphs import ForwardGraphs
from probescope.history import History, display_name
from probescope.probes.base import Probe, ProbeContext, ProbeStats, eval_mode, model_device_dtype
from probescope.probes.views import views_config
from probescope.recorder import Recorder
from probescope.ring import Frame, FrameRing, fit_capacities
from probescope.run import RunWriter, open_run
from probescope.schedule import Budget, StepInfo, StepTime, next_due
from probescope.shutdown import OPEN, Terminated, give_back_ending_signals, take_ending_signals
from probescope.sinks import Sink
from probescope.snapshot import SnapshotPool, device_free_memory, host_free_memory
from probescope.streams import ProbeStreams, StepClock
from probescope.validation import fraction, positive_int
from probescope.worker import ProbeWorker

__all__ = ["Monitor", "Terminated"]  # Terminated: where the README (and earlier code) says it is

log = logging.getLogger("probescope")


def _check_disk_budget(budget):
    """``disk_budget``: None, bytes (an int > 0), or a share of the free disk (a float in (0, 1])."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(
            f"Monitor: disk_budget must be bytes (an int), a share of the free disk or None, got {budget!r}"
        )
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"Monitor: disk_budget must be a positive number of bytes, got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"Monitor: disk_budget as a share of the free disk must be in (0, 1], got {budget}")
    return budget


def _checked_probes(probes: Probe | Iterable[Probe]) -> list[Probe]:
    """The Monitor's probes as a list: Probe instances, of distinct names."""
    probes = [probes] if isinstance(probes, Probe) else list(probes)
    for p in probes:
        if not isinstance(p, Probe):
            raise TypeError(f"Monitor: probes must be Probe instances, got {type(p).__name__}")
        views_config(p)  # how a probe of the user's own kind is drawn: checked before training
    names = [p.name for p in probes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Monitor: probe names must be unique; {duplicates} repeat (give each probe a name=...)"
        )
    return probes


def _share_budget(probes: list[Probe], budget: float | None) -> float | None:
    """``Monitor(budget=...)``: one budget, shared evenly by the probes (each gets an adaptive
    schedule of its share; the Monitor's own work comes off the whole once)."""
    if budget is None:
        return None
    budget = fraction("Monitor: budget", budget)
    for p in probes:
        p.schedule = Budget(budget / len(probes), own_share=1.0 / len(probes))
    return budget


def _ring_capacities(probes: list[Probe], capacity: int, cuda: torch.device | None) -> dict[str, int]:
    """Slots per probe's ring: ``capacity``, or as many as a quarter of the free memory holds
    (the host's; the device's too when frames stay on ``cuda``), with one warning."""
    capacities, why = fit_capacities(
        {p.name: p.frame_nbytes() for p in probes},
        capacity,
        host_free_memory(),
        device_free_memory(cuda) if cuda is not None else None,
    )
    if why:
        log.warning("Monitor: %s", why)
    return capacities


def _check_resume(resume) -> None:
    """``Monitor(resume=...)``: False, True, a step, or a (step, epoch) pair, numbers >= 0."""
    if isinstance(resume, bool):
        return
    pair = isinstance(resume, tuple) and len(resume) == 2
    numbers = resume if pair else (resume,)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise TypeError(
            f"Monitor: resume must be True, False, a step or a (step, epoch) pair, got {resume!r}"
        )
    if any(n < 0 for n in numbers):
        raise ValueError(f"Monitor: resume must be a step >= 0 (and an epoch >= 0), got {resume}")


@dataclass
class _ProbeState:
    probe: Probe
    ring: FrameRing
    stats: ProbeStats = field(default_factory=ProbeStats)
    enabled: bool = True
    busy: bool = False
    last_step: int = -1
    recorded_seq: int = -1
    adaptive: bool = False  # its schedule learns from timings (budget mode)
    launched: int = 0  # frames launched so far; the last one's number
    in_step: int | None = None  # the frame evaluated at some moment of the step in progress
    next_due: float = 0  # the schedule is not asked before this step (Schedule.next_due)
    running: bool = False  # evaluating now (not merely queued behind another probe's frame)
    evaluated: int | None = None  # the frame evaluated last (its ring frame is the newest)
    recording: bool = False  # the recorder writes every frame to the run directory
    written_seq: int = -1  # the ring sequence number of the last frame the recorder wrote
    marks: threading.Lock = field(default_factory=threading.Lock)  # in_step and running, together

    def step_frame(self) -> int | None:
        """At a step boundary (training thread): the frame in flight during the step that just
        ended, and the start of the next step's record (the frame still in flight, if one is).
        A frame is in flight while it is evaluated and, with a run directory, until the
        recorder has written it (writing it is part of its cost). A frame waiting behind
        another probe's in the same job is not: the steps beside that other evaluation are its
        cost, not this one's."""
        with self.marks:
            if self.running:
                now = self.launched
            elif self.recording and self.ring.newest_seq > self.written_seq:
                now = self.evaluated
            else:
                now = None
            frame, self.in_step = self.in_step, now
        return frame

    def evaluating(self, frame: int | None) -> None:
        """On the probe worker: ``frame`` starts its evaluation (None: inline, no step's time)."""
        with self.marks:
            self.evaluated = frame
            if frame is not None:
                self.running, self.in_step = True, frame


class Monitor:
    """Watches ``model`` with ``probes`` while it trains.

    Use it as a context manager around a plain loop and call ``step(loss=...)`` after each
    optimizer step (and ``end_epoch()`` after each epoch), or drive it through the fastai
    event names (``before_fit()``, ``after_loss(loss=...)``, ``after_step()``, ...).
    Probes run on a worker thread on a snapshot of the weights of one step; a probe due while
    its previous evaluation still runs is skipped. A probe that raises is disabled with one
    warning; training goes on. With ``run_dir`` every frame is recorded there, and the run's
    scalar series every ``JOURNAL_SECONDS`` (its journal: what a killed process leaves of them).

    ``snapshot`` is ``"copy"``, ``"sync"`` or ``"live"`` (see probescope.snapshot);
    ``probe_threads`` caps the CPU threads the probe worker uses (training keeps the rest);
    ``final_frame`` takes one last frame of every probe at ``close()``.

    ``budget`` (a fraction of training time, e.g. ``0.02``) puts every probe on one shared
    budget in place of its schedule: each of n probes frames as often as ``budget / n`` of the
    training time allows (``Schedule.budget``), and the Monitor's own per-step work comes off
    the whole budget once. ``Schedule.budget(f)`` on a probe is that probe's own budget.

    On CUDA, probes run on a low-priority probe stream and the snapshot copy is ordered
    against training with events only; the training thread never waits on the host for a
    probe. Given ``optimizer``, training waits (on the GPU) for a snapshot copy only before its
    next optimizer step, so the next forward and backward overlap it.
    ``high_priority_training=True`` creates a high-priority stream for training to run on:
    wrap the loop in ``with monitor.training_stream():``.

    ``snapshot_params`` (glob patterns over parameter and buffer names) copies only part of a model
    too large to copy whole (``"trainable"``: the parameters that require gradients and the
    buffers, sharing the frozen ones); ``snapshot_host=True`` keeps the copy in (pinned) host memory and
    evaluates probes on the CPU (see probescope.snapshot). ``summary()["snapshot_bytes"]`` and
    the run's metadata give the snapshot's memory. The copies run without the model's forward
    and backward hooks (a logger of activations sees training's forwards only), except torch's
    own that compute the forward (weight and spectral norm, pruning); ``snapshot_hooks=True``
    keeps them all.

    ``cuda_graphs=True`` captures each probe's fixed-batch forward (predictions, curve,
    valid set), and GridProbe's whole frame, as a CUDA graph per shadow and replays it: a
    frame then costs the probe thread a few calls from Python, which on a launch-bound loop
    is what it takes from training. Everything is captured in ``start()``, before the first
    step, and nothing while training runs. Work that cannot be captured falls back to eager
    with one logged reason (probescope.graphs).

    Wrapped models (DistributedDataParallel, DataParallel, ``torch.compile``) are probed
    through the module inside the wrappers (``monitor.model``): probes never call a wrapper's
    forward, module names in hook patterns are the inner module's, and ``model.pt`` holds its
    state_dict. Under ``torch.distributed`` only rank ``probe_rank`` (0) probes and records;
    on every other rank the Monitor is inert (no snapshot, thread, run directory, viewer or
    callbacks; a step costs a counter), so run the same script on every rank. Its loss graph
    is that rank's own batch loss. A sharded model (FSDP2's ``fully_shard``, DTensor
    parameters) is probed through ``unsharded`` (the model as defined before sharding, or a
    function that builds it), into which every rank gathers the weights at the steps its
    probes are due (see probescope.gather).

    ``handle_sigterm`` (default True): while the Monitor is open, SIGTERM (a scheduler's time
    limit, ``docker stop``, ``kill``) or SIGHUP (a closed terminal) raises ``Terminated`` (a
    SystemExit) in the main thread, so the loop unwinds and the run closes whole, status
    ``interrupted``, before the process exits with status 143 (129 for SIGHUP); a second
    signal ends it at once. Installed only from the main thread and only for a signal the
    program has no handler of its own for; removed when the last Monitor closes.

    ``sinks`` (e.g. ``[TensorBoardSink("runs/tb")]``, see probescope.sinks) get every frame
    and the run's scalar series on the recorder thread, beside the run directory or without
    one; a sink that raises is dropped with one warning.

    ``viewer=True`` opens the OpenGL viewer's window in a render process of its own (see
    probescope.viewers.window), fed the newest frames at most ``viewer_fps`` times a second
    (default 30); ``"offscreen"``: in this process through EGL, drawn only when asked (tests,
    recordings). In a Jupyter notebook, ``viewer=True`` (or ``"notebook"``) shows the panels
    as an output of the cell instead, drawn in a render process at most ``viewer_fps`` times a
    second (default 2; see probescope.viewers.notebook). A viewer that cannot open or is
    closed costs one warning; training goes on.
    """

    #: Steps the Monitor times before it tells the budgets (``Schedule.observe_steps``).
    STEP_BATCH = 8
    #: Seconds between the recorder's writes of the series to the run's journal (history.journal).
    JOURNAL_SECONDS = 1.0

    def __init__(
        self,
        model: nn.Module,
        probes: Probe | Iterable[Probe] = (),
        *,
        optimizer=None,
        run_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        snapshot: str = "copy",
        ring_capacity: int = 8,
        callbacks: Iterable[Callback] = (),
        final_frame: bool = True,
        close_timeout: float = 60.0,
        probe_threads: int = 1,
        metadata: Mapping[str, Any] | None = None,
        high_priority_training: bool = False,
        viewer: bool | str = False,
        viewer_fps: float | None = None,
        snapshot_params: Sequence[str] | str | None = None,
        snapshot_host: bool = False,
        snapshot_hooks: bool = False,
        cuda_graphs: bool = False,
        probe_rank: int = 0,
        budget: float | None = None,
        handle_sigterm: bool = True,
        sinks: Iterable[Sink] = (),
        resume: bool | int = False,
        unsharded: nn.Module | Callable[[], nn.Module] | None = None,
        disk_budget: float | int | None = 0.25,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if viewer not in (False, True, "offscreen", "notebook"):
            raise ValueError(
                f"Monitor: viewer must be True, False, 'offscreen' or 'notebook', got {viewer!r}"
            )
        if viewer_fps is not None and not viewer_fps > 0:
            raise ValueError(f"Monitor: viewer_fps must be > 0, got {viewer_fps!r}")
        if isinstance(probe_rank, bool) or not isinstance(probe_rank, int) or probe_rank < 0:
            raise ValueError(f"Monitor: probe_rank must be a rank (an int >= 0), got {probe_rank!r}")
        self.placement: Placement = placement()
        if probe_rank >= self.placement.world_size:
            raise ValueError(
                f"Monitor: probe_rank {probe_rank} is not a rank of this job (world size "
                f"{self.placement.world_size})"
            )
        self.wrappers = wrapper_names(model)
        model = unwrap(model)
        #: Why the model is sharded across ranks (None: whole on every rank); see probescope.gather.
        self.sharded: str | None = sharding(model)
        lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)]
        if lazy:
            raise ValueError(
                f"Monitor: the model's {', '.join(lazy[:4])}{' ...' if len(lazy) > 4 else ''} are not "
                "initialized yet (lazy modules take their shapes from their first forward); run one "
                "batch through the model before creating the Monitor, e.g. model(x[:1])"
            )
        # Every rank checks its arguments and attaches its probes (the same errors everywhere);
        # only the probing rank keeps them.
        self.probing = self.placement.rank == probe_rank
        probes = _checked_probes(probes)
        self.budget = _share_budget(probes, budget)
        adaptive = [id(p.schedule) for p in probes if p.schedule.state() is not None]
        if len(adaptive) != len(set(adaptive)):
            raise ValueError("Monitor: each probe needs its own Schedule.budget(...); two probes share one")
        if self.sharded is not None or unsharded is not None:
            check_sharded(self.sharded, self.placement, probes, unsharded, snapshot_params, snapshot)
        positive_int("Monitor: probe_threads", probe_threads)
        positive_int("Monitor: ring_capacity", ring_capacity)
        callbacks = list(callbacks)
        for c in callbacks:
            if not isinstance(c, Callback):
                raise TypeError(f"Monitor: callbacks must be Callback instances, got {type(c).__name__}")
        optimizer = torch_optimizer(optimizer)
        defer_wait = optimizer is not None and hasattr(optimizer, "register_step_pre_hook")
        self._gather_plan: GatherPlan | None = None
        template = None
        if self.sharded is not None:  # probes evaluate unsharded shadows the gathers fill
            self._gather_plan = GatherPlan(
                {p.name: p.schedule for p in probes if p.reads_model and id(p.schedule) not in adaptive},
                adaptive=any(p.reads_model and id(p.schedule) in adaptive for p in probes),
            )
            if self.probing and unsharded is not None:
                template = build_unsharded(unsharded)
            self._pool = GatheredPool(
                model,
                template,
                snapshot,
                size=2,
                defer_wait=defer_wait,
                host=snapshot_host,
                hooks=snapshot_hooks,
                probe_rank=probe_rank,
                grads=any(p.needs_grads for p in probes),
                params=snapshot_params,
            )
        probed = self._pool.reference if template is not None else model
        for p in probes:
            if probed is not model or not (self.sharded and p.reads_model):
                p.attach(probed)
            if cuda_graphs:  # fixed-batch forwards replay CUDA graphs (see probescope.graphs)
                p.graphs = ForwardGraphs(p.name)
                if getattr(p, "valid", None) is not None:
                    p.valid.graphs = ForwardGraphs(f"{p.name} (valid set)")
        self._saves_model = run_dir is not None  # (a sharded model's every rank gathers for it)
        self._probe_rank = probe_rank
        if not self.probing:
            probes, callbacks, run_dir, viewer = [], [], None, False
        self.model, self.optimizer = model, optimizer
        self.history = History(on_nonfinite=_warn_nonfinite)
        device, _ = model_device_dtype(probed)
        self._streams = (
            ProbeStreams(device, high_priority_training)
            if self.probing and device.type == "cuda" and torch.cuda.is_available()
            else None
        )
        if self.sharded is not None:
            self._pool.streams = self._streams
        else:
            self._pool = SnapshotPool(
                model,
                snapshot,
                size=2 if self.probing else 0,  # an inert rank checks the arguments and copies nothing
                grads=any(p.needs_grads for p in probes),
                streams=self._streams,
                defer_wait=defer_wait,
                params=snapshot_params,
                host=snapshot_host,
                hooks=snapshot_hooks,
            )
        if self._pool.dropped_hooks:
            log.info(
                "Monitor: the probes' copies of the model run without its hooks (%s): they observe "
                "training, not probes; snapshot_hooks=True keeps them",
                ", ".join(self._pool.dropped_hooks),
            )
        self._clock = StepClock(device) if self._streams is not None else None
        # The learning rate of each step, read as the optimizer steps: a scheduler may change it
        # before the Monitor's step is taken (a loop's scheduler.step() before monitor.step(),
        # a framework's per-batch scheduler before a deferred step). Both hooks hear every
        # optimizer that steps the model's parameters, not only the one given: a loop may replace
        # it (a new one after unfreezing, another for a second phase), and one whose step waited
        # for nothing would change the weights while the snapshot copy reads them.
        self._param_ids = frozenset(id(p) for p in model.parameters())
        self._step_lr = None
        self._lr_hook = None
        if self.probing and hasattr(optimizer, "_optimizer_step_pre_hooks"):
            self._lr_hook = register_optimizer_step_pre_hook(self._note_lr)
        self._optimizer_hook = None
        if self._streams is not None and not self._pool._wait_now:
            self._optimizer_hook = register_optimizer_step_pre_hook(self._before_weights_change)
        self._wake = threading.Event()
        cuda_frames = device.type == "cuda" and not self._pool.host
        capacities = _ring_capacities(probes, ring_capacity, device if cuda_frames else None)
        self._probes = {
            p.name: _ProbeState(
                p,
                FrameRing(p.name, capacities[p.name], on_commit=self._wake.set),
                adaptive=id(p.schedule) in adaptive,
            )
            for p in probes
        }
        self._states = tuple(self._probes.values())
        self._adaptive = [st for st in self._states if st.adaptive]
        # Whether a frame may be in flight (launched and not yet seen ended at a step boundary):
        # while none is, a step's frames are known without asking each probe (its lock).
        self._in_flight = False
        self._no_frames: tuple[None, ...] = (None,) * len(self._states)
        self._step_times: list[tuple[float, float | None, tuple[int | None, ...]]] = []  # not yet told
        self._host_budgets = bool(self._adaptive) and self._clock is None  # own work timed per event
        self._callbacks = sorted([*probes, *callbacks], key=lambda c: c.order)
        self._run_dir, self._overwrite = run_dir, overwrite
        self._disk_budget = _check_disk_budget(disk_budget)
        _check_resume(resume)
        if resume is not False and not self._saves_model:  # (every rank: run_dir is the prober's)
            raise ValueError("Monitor: resume continues a run directory; give run_dir")
        if resume is not False and overwrite:
            raise ValueError("Monitor: resume and overwrite exclude each other")
        self._resume = resume
        #: The step a resumed run continues from (None: a new run).
        self.resumed_at: int | None = None
        self._wall_before = 0.0  # a resumed run's monitored seconds before this process
        self._final_frame, self._close_timeout = final_frame, close_timeout
        self._handle_sigterm = handle_sigterm
        self._ended_by: BaseException | None = None  # what ended training, if a signal did
        self._metadata = dict(metadata or {})
        self._probe_threads = probe_threads
        self._step = 0
        self._epoch = 0
        self._last_step_epoch = 0
        self._started = self._closed = self._warned_closed = False
        self._worker: ProbeWorker | None = None
        self.writer: RunWriter | None = None
        sinks = list(sinks)
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"Monitor: a sink needs a write(frame) method, got {type(sink).__name__}")
        self._recorder = Recorder(
            self._states,
            self.history,
            sinks,
            self._wake,
            self._streams.training if self._streams is not None else None,
        )
        self._t_start = 0.0
        self._t_end: float | None = None
        self._t_last_step: float | None = None
        self._own_s: float | None = None  # after_step's own time at the last step (host clock)
        self._own_between = 0.0  # the Monitor's own time in the batch's events since (host clock)
        self._failed_callbacks: set[int] = set()
        self._event_handlers: dict[str, list] = {}  # event -> the callbacks that handle it
        self._step_handlers: list = []  # the callbacks that handle after_step (set at start)
        self._next_due: float = 0  # no schedule is asked before this step: the probes' first
        self._viewer_mode, self._viewer_fps = viewer, viewer_fps
        self.viewer = None

    # ---- public state -------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps completed so far (0 before the first)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The current epoch, counted from 0."""
        return self._epoch

    @property
    def probes(self) -> dict[str, Probe]:
        """The probes, by name."""
        return {name: st.probe for name, st in self._probes.items()}

    @property
    def stats(self) -> dict[str, ProbeStats]:
        """Counters per probe: run, skipped, failed, milliseconds per evaluation."""
        return {name: st.stats for name, st in self._probes.items()}

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by weight snapshots."""
        return self._pool.nbytes

    @property
    def snapshot_detail(self) -> dict:
        """The snapshot: strategy, elements copied of the model's, host or device, bytes."""
        return self._pool.describe()

    def ring(self, name: str) -> FrameRing:
        """The frame ring of probe ``name``."""
        return self._probes[name].ring

    def latest(self, name: str) -> Frame | None:
        """The newest frame of probe ``name`` (None before its first, and on a rank that does
        not probe); never blocks."""
        st = self._probes.get(name)
        if st is None:
            if not self.probing:
                return None
            raise KeyError(f"Monitor: no probe named {name!r}; the probes are {sorted(self._probes)}")
        return st.ring.latest()

    def _open_run_dir(self) -> None:
        """Create the run directory (or continue the run in it) and declare every probe."""
        previous = self._previous_run()
        step = None
        if previous is not None:
            step = self._resume_step(previous)
            for st in self._probes.values():  # checked before the run is touched
                if st.probe.name in previous.probes:
                    previous.probe(st.probe.name).check_same(st.probe.kind, st.probe.static())
        self.writer = RunWriter(
            self._run_dir, overwrite=self._overwrite, resume_at=step, disk_budget=self._disk_budget
        )
        if previous is not None:
            for record in previous.probes.values():
                record.refresh()  # the frames of later steps are superseded now
            self._continue(previous, step)
        for st in self._probes.values():
            p = st.probe
            config = {**p.config(), **views_config(p), "schedule": p.schedule.describe()}
            self.writer.add_probe(p.name, p.kind, config, p.static())
        self.writer.save_probes([st.probe for st in self._probes.values()])
        self.writer.update_meta(
            model={**_describe_model(self.model), "wrappers": self.wrappers, "sharded": self.sharded},
            distributed=self.placement.describe(),
            snapshot=self._pool.strategy,
            snapshot_detail=self._pool.describe(),
            metadata=self._metadata,
        )

    def _previous_run(self):
        """The run to resume in ``run_dir`` (None: none there, or not resuming)."""
        if self._resume is False or not (Path(self._run_dir) / "run.json").exists():
            return None
        return open_run(self._run_dir)

    def _resume_step(self, previous) -> int:
        """The step to continue from: the one given, else where the previous process ended."""
        if isinstance(self._resume, tuple):
            return self._resume[0]
        if not isinstance(self._resume, bool):
            return self._resume
        steps = (previous.meta.get("summary") or {}).get("steps")
        if previous.status in ("finished", "interrupted", "failed") and steps is not None:
            return int(steps)  # closed: its summary counts every step
        last = previous.last_step() or 0
        log.warning(
            "Monitor: %s was not closed (status %s); resuming after its last frame, step %d. Give "
            "resume=STEP, the step of the weights you loaded, to continue from another",
            previous.path,
            previous.status,
            last,
        )
        return last

    def _continue(self, run, step: int) -> None:
        """Continue ``run`` (its frames after ``step`` superseded already): the step and epoch
        counters, the scalar series up to ``step`` (``Run.history``: whole if it was closed, else
        as its journal and then its newest LossProbe frame hold them), and each
        probe's own state (``Probe.resume`` with its last frame); a probe with a frame of
        ``step`` already is not asked again at it."""
        last = {name: record.frame(-1) for name, record in run.probes.items() if len(record)}
        summary = run.meta.get("summary") or {}
        if isinstance(self._resume, tuple):
            epoch = self._resume[1]
        elif summary.get("steps") == step and summary.get("epochs") is not None:
            epoch = int(summary["epochs"])
        else:
            epoch = max((f.epoch for f in last.values()), default=0)
        self._step, self._epoch, self._last_step_epoch = step, epoch, epoch
        self.resumed_at = step
        self._wall_before = float(summary.get("wall_seconds") or 0.0)  # unknown for a killed run
        self.history.load(run.history(), step)
        for name, frame in last.items():
            st = self._probes.get(name)
            if st is not None and st.probe.kind == run.probe(name).kind:
                st.probe.resume(frame)
                if frame.step == step:
                    st.last_step, st.next_due = step, step + 1
        log.info("Monitor: %s resumed at step %d, epoch %d", run.path, step, epoch)

    def training_stream(self):
        """A context manager that runs training on the high-priority stream (CUDA, with
        ``high_priority_training=True``); a no-op otherwise."""
        if self._streams is None:
            return contextlib.nullcontext()
        return self._streams.training_context()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> Monitor:
        """Open the run directory, start the worker and take the step-0 frames (idempotent)."""
        if self._closed:
            raise RuntimeError("Monitor: a closed monitor cannot start again; create a new one")
        if self._started:
            return self
        self._started = True
        self._t_start = time.perf_counter()
        self._pid = os.getpid()
        OPEN.add(self)
        if not self.probing:
            log.info(
                "Monitor: rank %d of %d is not the probing rank; it probes and records nothing%s",
                self.placement.rank,
                self.placement.world_size,
                " (it gathers the sharded weights with the others)" if self._gather_plan is not None else "",
            )
            if self._gather_plan is not None:
                if self._resume is not False:
                    self._share_resume()
                self._step_gather(None, first=True)
            return self
        if self._handle_sigterm and not take_ending_signals():
            log.info("Monitor: SIGTERM is the program's own to handle (or not the main thread)")
        if self._run_dir is not None:
            try:
                self._open_run_dir()
            except BaseException as err:  # nothing started yet: this Monitor is done, not open
                OPEN.discard(self)
                give_back_ending_signals()
                self._closed = True
                if self.writer is not None:
                    self.writer.finish(self.summary(), err)
                raise
        self._worker = ProbeWorker(threads=self._probe_threads)
        cores = os.cpu_count() or 1
        evaluating = any(st.probe.reads_model for st in self._probes.values())
        if evaluating and torch.get_num_threads() + self._probe_threads > cores:
            # Training on the CPU: while a probe evaluates, training's threads wait at every
            # parallel region for the one that shares a core with it (a frame then costs training
            # about its whole evaluation). On a GPU the host threads matter little. (Probes of
            # the loop's series alone compute next to nothing.)
            on_cpu = model_device_dtype(self.model)[0].type == "cpu"
            log.log(
                logging.WARNING if on_cpu else logging.INFO,
                "Monitor: training uses %d CPU threads and probes %d on %d cores%s; "
                "torch.set_num_threads(%d) in the training thread avoids oversubscription",
                torch.get_num_threads(),
                self._probe_threads,
                cores,
                ": while a probe evaluates, training waits for a core" if on_cpu else "",
                max(1, cores - self._probe_threads),
            )
        for st in self._probes.values():
            p = st.probe
            config = {**p.config(), **views_config(p)}
            self._recorder.to_sinks("add_probe", p.name, p.kind, config, p.static())
        if self.resumed_at is not None:
            self._recorder.to_sinks("resume", self.resumed_at)
        if self.writer is not None or self._recorder.sinks:  # else nobody reads every frame
            for st in self._probes.values():
                st.recording = True
            self._recorder.start(self.writer, self._probe_threads, self.JOURNAL_SECONDS)
        self._fire("before_fit")
        self._step_handlers = self._handlers("after_step")
        self._warm_up()
        if self._gather_plan is None:
            self._probe_now(self._due_at_step())
        else:
            if self._resume is not False:
                self._share_resume()
            self._step_gather(self._due_at_step(), first=True)
        if self._viewer_mode:
            self._open_viewer()
        return self

    def _share_resume(self) -> None:
        """A sharded model's ranks gather at the same steps, so every rank counts on from the
        step and epoch at which the probing rank resumed its run (a collective)."""
        import torch.distributed as dist

        counters = [self._step, self._epoch]
        dist.broadcast_object_list(counters, src=self._probe_rank)
        self._step, self._epoch = counters
        self._last_step_epoch = self._epoch

    def _warm_up(self) -> None:
        """With CUDA graphs: warm every probe up on every shadow before the first step, so that
        its kernels compile and its graphs are captured now, not during training (a frame's
        work is then the same replay from the first frame on)."""
        states = [st for st in self._probes.values() if st.enabled and st.probe.graphs is not None]
        if not states or self._streams is None or self._pool.inline:
            return
        shadows = []
        while len(shadows) < self._pool.size and (shadow := self._pool.acquire(fill=False)) is not None:
            shadows.append(shadow)
        try:
            with torch.no_grad(), self._streams.probe_context():
                for shadow in shadows:
                    self._pool.wait_ready(shadow)
                    for st in states:
                        if st.enabled:
                            self._warm_up_one(st, shadow)
        finally:
            for shadow in shadows:
                self._pool.release(shadow)
            for st in states:
                st.probe.graphs.seal()
                if getattr(st.probe, "valid", None) is not None and st.probe.valid.graphs is not None:
                    st.probe.valid.graphs.seal()

    def _warm_up_one(self, st: _ProbeState, shadow: nn.Module) -> None:
        try:
            st.probe.warm_up(shadow)
        except Exception as err:
            _disable(st, "failed while warming up", err)

    def _open_viewer(self) -> None:
        try:
            from probescope.viewers.notebook import DEFAULT_FPS, NotebookView, in_notebook
            from probescope.viewers.viewer import MonitorSource, Viewer
            from probescope.viewers.window import WindowView

            mode, fps = self._viewer_mode, self._viewer_fps
            if mode is True and in_notebook():
                mode = "notebook"
            if mode == "notebook":
                if not in_notebook():
                    raise RuntimeError("viewer='notebook' needs a Jupyter kernel, and this is none")
                # Before the first step, as compiling is: the step-0 frames, then the first
                # picture, which compiles the canvas's shaders (seconds on a CPU's llvmpipe).
                self._worker.wait_idle(self._close_timeout)
                self.viewer = NotebookView(MonitorSource(self), fps=fps or DEFAULT_FPS)
                self.viewer.wait_ready(self._close_timeout)
            elif mode is True:  # a window, drawn in a process of its own
                view = WindowView(MonitorSource(self), fps=fps or 30.0)
                view.wait_ready(self._close_timeout)
                if view.error is not None:  # the render process says what it was
                    log.warning("Monitor: the viewer could not open (%s); training goes on", view.error)
                    return
                self.viewer = view
            else:  # offscreen, in this process: drawn only when asked (tests, recordings)
                self.viewer = Viewer(MonitorSource(self), offscreen=True, fps=fps or 30.0)
        except Exception as err:
            log.warning(
                "Monitor: the viewer could not open (%s: %s); training goes on", type(err).__name__, err
            )
            self.viewer = None

    def _pump_viewer(self) -> None:
        try:
            self.viewer.pump()
        except Exception as err:
            log.warning(
                "Monitor: the viewer failed (%s: %s) and is closed; training goes on", type(err).__name__, err
            )
            self.viewer.closed = True
        if self.viewer.closed:
            log.info("Monitor: the viewer was closed; training goes on")
            self.viewer = None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the probe evaluations in flight have finished (training does not need
        to: this is for benchmarks, tests and notebooks); False on timeout."""
        return self._worker is None or self._worker.wait_idle(timeout)

    def close(self, error: BaseException | None = None) -> None:
        """Finish: wait for running probes, take the final frames, flush the run (idempotent).
        ``error``: what ended training early (the ``with`` block's exception); the run's status
        is then ``interrupted`` (KeyboardInterrupt) or ``failed``, with the error in run.json."""
        OPEN.discard(self)
        give_back_ending_signals()
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        error = error if error is not None else self._ended_by
        # A sharded model's ranks gather at close for the final frames and model.pt, unless
        # training ended with an error (a rank that failed may never come).
        gathers = self._gather_plan is not None and error is None
        final_gather = gathers and self._final_frame and self._gather_plan.reads
        if not self.probing:
            if gathers:
                self._gather_only(final_gather)
                if self._saves_model:
                    self._pool.state_dict(keep=False)
            return
        self._t_end = time.perf_counter()
        self._tell_steps()
        if not self._worker.wait_idle(self._close_timeout):
            log.warning(
                "Monitor: a probe still runs after %.0f s; closing without waiting for it",
                self._close_timeout,
            )
        if self._final_frame:
            final = [
                st
                for st in self._probes.values()
                if st.enabled and not st.busy and st.last_step != self._step
            ]
            if self._gather_plan is None:
                self._probe_now(final, inline=True, epoch=self._last_step_epoch)
            elif final_gather:
                self._launch(final, True, inline=True, epoch=self._last_step_epoch)
            else:  # no gather: the final frames of the probes that read nothing of the model
                unread = [st for st in final if not st.probe.reads_model]
                self._probe_now(unread, inline=True, epoch=self._last_step_epoch)
        self._fire("after_fit")
        self._worker.close(timeout=1.0)
        if self._lr_hook is not None:
            self._lr_hook.remove()
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._streams.before_weights_change()
        if self.viewer is not None:
            with contextlib.suppress(Exception):
                self.viewer.refresh()
                self.viewer.close()
        self._recorder.stop()
        self._recorder.to_sinks("close")
        if self.writer is not None:
            self.writer.flush()  # each probe's last frame, whatever the disk budget left out
        series = None
        try:  # every value read once: a series that went NaN is warned about and summarised
            series = self.history.read()
        except Exception as err:
            log.warning("Monitor: the history could not be read at close (%s: %s)", type(err).__name__, err)
        if self.writer is not None:
            if series is not None:
                self.writer.write_history(series)  # whole: values logged after the last frames too
            if self._gather_plan is None:
                self.writer.save_model(self.model)
            elif gathers:
                self.writer.save_state(self._pool.state_dict(keep=True))
            else:
                log.warning(
                    "Monitor: no model.pt: the run ended with an error, and the sharded model's "
                    "weights are gathered with every rank, which may not all come"
                )
            for st in self._probes.values():
                if st.probe.tabular and st.ring.written:
                    self.writer.write_table(st.probe.name)
            self.writer.finish(self.summary(), error)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    # ---- the training loop's calls ------------------------------------------------------
    def step(self, loss=None, **values) -> None:
        """Call after each optimizer step; ``loss`` is the batch's loss (a tensor is fine).
        ``values``: other scalars of this step (``grad_norm=...``), recorded at it, as
        ``log`` does after the step, but before its frames are taken."""
        t_enter = time.perf_counter()
        if loss is not None:
            self._record_loss(loss)
        if values and self.probing and not self._closed:
            for name, value in values.items():
                self.history.append(name, self._step + 1, self._epoch, value)
        self._after_step(t_enter, {})

    def log(self, **values) -> None:
        """Record scalars at the current step, e.g. ``log(valid_loss=0.3, accuracy=0.9)``."""
        if self._closed:
            return self._ignore_after_close("log")
        if not self.probing:
            return
        for name, value in values.items():
            self.history.append(name, self._step, self._epoch, value)

    def end_epoch(self) -> None:
        """Call after each epoch; epoch-based schedules fire here."""
        self.after_epoch()

    def event(self, name: str, **kwargs) -> None:
        """Deliver a training event by its fastai name."""
        if name not in EVENTS:
            raise ValueError(f"Monitor: unknown event {name!r}; events are {EVENTS}")
        getattr(self, name)(**kwargs)

    def before_fit(self, **kwargs) -> None:
        """Start monitoring (same as ``start()``)."""
        self.start()

    def before_epoch(self, **kwargs) -> None:
        self._fire("before_epoch", **kwargs)

    def before_train(self, **kwargs) -> None:
        self._fire("before_train", **kwargs)

    def before_batch(self, **kwargs) -> None:
        self._between("before_batch", kwargs)

    def after_pred(self, **kwargs) -> None:
        self._between("after_pred", kwargs)

    def after_loss(self, loss=None, **kwargs) -> None:
        """Record the batch loss of the step in progress."""
        self._between("after_loss", {"loss": loss, **kwargs}, loss)

    def _between(self, event: str, kwargs: dict, loss=None) -> None:
        """An event of the batch between two optimizer steps (and the loss it records): where
        budgets time steps by the host clock, its time is the Monitor's own work too."""
        timed = self._host_budgets
        t_enter = time.perf_counter() if timed else 0.0
        if loss is not None:
            self._record_loss(loss)
        self._fire(event, **kwargs)
        if timed:
            self._own_between += time.perf_counter() - t_enter

    def before_backward(self, **kwargs) -> None:
        self._between("before_backward", kwargs)

    def after_backward(self, **kwargs) -> None:
        self._between("after_backward", kwargs)

    def after_step(self, **kwargs) -> None:
        """The optimizer stepped: count the step and launch the probes that are due."""
        self._after_step(time.perf_counter(), kwargs)

    def _after_step(self, t_enter: float, kwargs: dict) -> None:
        # The training thread's path at every step: kept short (on a step of half a
        # millisecond, each microsecond here is 0.2 % of training; see benchmarks.budget_accounting).
        if self._closed:
            return self._ignore_after_close("step")
        if not self._started:
            self.start()
        if not self.probing:
            self._step += 1
            if self._gather_plan is not None:
                self._step_gather(None)
            return
        if self._adaptive:
            self._time_step(t_enter)
        step = self._step = self._step + 1
        epoch = self._last_step_epoch = self._epoch
        lr = self._step_lr if self._lr_hook is not None else _learning_rate(self.optimizer)
        if lr is not None:
            self.history.append("lr", step, epoch, lr)
        if self._step_handlers:
            self._fire("after_step", **kwargs)
        due = self._due_at_step() if step >= self._next_due else None
        if self._gather_plan is not None:
            self._step_gather(due)
        elif due:
            self._probe_now(due)
        if self.viewer is not None:
            self._pump_viewer()
        self._t_last_step = time.perf_counter()
        # Host-timed steps: this method's own time is training's too (told with the next step;
        # a launch's snapshot is counted apart).
        self._own_s = self._t_last_step - t_enter if not due else None

    def _time_step(self, t_enter: float) -> None:
        """Note the step that just ended for the budgets: every probe's frame of the step (the
        budgets' idle steps have none), read where the step's time is known (a mark read
        without a time would be lost), and its time. The budgets are told every STEP_BATCH
        steps (a step costs an append here)."""
        between, self._own_between = self._own_between, 0.0
        if self._clock is not None:  # CUDA: the steps' GPU time, no sync
            frames = self._step_frames() if self._in_flight else self._no_frames
            for step_s, step_frames in self._clock.mark(frames):
                self._step_times.append((step_s, None, step_frames))
        elif self._t_last_step is not None:
            # Without the Monitor's own work, told beside it: this method's time at the step
            # before and the batch's events since.
            frames = self._step_frames() if self._in_flight else self._no_frames
            own_s = None if self._own_s is None else self._own_s + between
            self._step_times.append((t_enter - self._t_last_step - between, own_s, frames))
        if len(self._step_times) >= self.STEP_BATCH:
            self._tell_steps()

    def _step_frames(self) -> tuple[int | None, ...]:
        """Each probe's frame of the step that just ended (see ``_ProbeState.step_frame``).
        Once no frame ran in it, none is running or queued and none waits for the recorder,
        nothing is in flight until the next launch (launches happen on this thread)."""
        frames = tuple([st.step_frame() for st in self._states])
        if frames == self._no_frames and not any(st.busy or st.in_step is not None for st in self._states):
            self._in_flight = False
        return frames

    def _tell_steps(self) -> None:
        """Tell each budget the steps timed since it was last told: each step's time, its own
        frame of the step, whether any probe's frame ran in it and, where frames of several
        probes did, its frame's share of the step's excess time."""
        steps, self._step_times = self._step_times, []
        if not self._adaptive:
            return
        states, no_frames = self._states, self._no_frames
        told: dict[int, list[StepTime]] = {id(st): [] for st in self._adaptive}
        lists = list(told.values())
        for step_s, own_s, frames in steps:
            if frames == no_frames:  # most steps: the same words for every budget
                quiet = StepTime(step_s, None, True, 1.0, own_s)
                for lst in lists:
                    lst.append(quiet)
                continue
            running = [st for st, frame in zip(states, frames, strict=True) if frame is not None]
            shares = _shares(running) if len(running) > 1 else {}
            for st, frame in zip(states, frames, strict=True):
                if st.adaptive:
                    share = shares.get(st.probe.name, 1.0)
                    told[id(st)].append(StepTime(step_s, frame, False, share, own_s))
        for st in self._adaptive:
            _observe(st, "observe_steps", told[id(st)])
        for st in self._adaptive:  # their intervals may have changed
            _plan(st, self._step)
            if self._gather_plan is not None and st.probe.reads_model:  # due at announced steps only
                st.next_due = max(st.next_due, self._gather_plan.announced or 0)
        self._next_due = self._earliest_due()

    def after_batch(self, **kwargs) -> None:
        self._between("after_batch", kwargs)

    def after_train(self, **kwargs) -> None:
        self._fire("after_train", **kwargs)

    def before_validate(self, **kwargs) -> None:
        self._fire("before_validate", **kwargs)

    def after_validate(self, **values) -> None:
        """Validation finished: record the given values (``valid_loss=...``, metrics)."""
        self.log(**values)
        self._fire("after_validate", **values)

    def validated_step(self, validation: Mapping[str, Any], loss=None, **values) -> None:
        """``step`` of an optimizer step whose validation ran before the Monitor's step was
        taken (the framework integrations wait for it): ``validation`` and the other
        ``values`` are recorded at the step before its frames, then callbacks hear
        ``after_validate`` with ``validation`` as usual."""
        self.step(loss, **values, **validation)
        if validation and not self._closed:
            self._fire("after_validate", **validation)

    def after_epoch(self, **kwargs) -> None:
        """An epoch ended: fire epoch schedules, then move to the next epoch."""
        if self._closed:
            return self._ignore_after_close("end of epoch")
        if not self._started:
            self.start()
        self._fire("after_epoch", **kwargs)
        due = [
            st
            for st in self._probes.values()
            if st.enabled and st.last_step != self._step and self._ask(st, "due_at_epoch_end", self._epoch)
        ]
        gathers = self._gather_plan is not None and self._gather_plan.at_epoch_end(self._epoch)
        self._launch(self._skip_busy(due), gathers)
        self._epoch += 1

    def after_fit(self, **kwargs) -> None:
        """Stop monitoring (same as ``close()``)."""
        self.close()

    # ---- internals ----------------------------------------------------------------------
    def _ignore_after_close(self, call: str) -> None:
        """A training-loop call after ``close()``: the run is finished (its worker stopped, its
        run directory written), so nothing is recorded or launched; one warning says so."""
        if not self._warned_closed:
            self._warned_closed = True
            log.warning(
                "Monitor: a %s after close() is ignored: the run is finished; create a new Monitor "
                "to probe more training",
                call,
            )

    def _steps_model(self, optimizer) -> bool:
        """Whether ``optimizer`` steps the model's parameters (the first of each of its groups
        tells; another model's optimizer, a GAN's other network's, does not)."""
        return optimizer is self.optimizer or any(
            group["params"] and id(group["params"][0]) in self._param_ids
            for group in getattr(optimizer, "param_groups", ())
        )

    def _note_lr(self, optimizer, args, kwargs) -> None:
        """Before any optimizer's step: the rate of one that steps the model's parameters."""
        if self._steps_model(optimizer):
            self._step_lr = _step_learning_rate(optimizer)

    def _before_weights_change(self, optimizer, args, kwargs) -> None:
        """Before any optimizer's step: one that steps the model's parameters waits, on the GPU,
        for the snapshot copy in flight."""
        if self._steps_model(optimizer):
            self._streams.before_weights_change()

    def _record_loss(self, loss) -> None:
        if self.probing and not self._closed:
            self.history.append(History.BATCH_LOSS, self._step + 1, self._epoch, loss)

    def _handlers(self, event: str) -> list:
        """The callbacks that handle ``event``: a Callback whose class and instance leave the
        hook as Callback's no-op is not called at every step."""
        handlers = self._event_handlers.get(event)
        if handlers is None:
            noop = getattr(Callback, event)
            handlers = self._event_handlers[event] = [
                cb
                for cb in self._callbacks
                if getattr(type(cb), event, None) is not noop or event in getattr(cb, "__dict__", ())
            ]
        return handlers

    def _fire(self, event: str, **kwargs) -> None:
        for cb in self._handlers(event):
            if id(cb) in self._failed_callbacks:
                continue
            try:
                getattr(cb, event)(self, **kwargs)
            except Exception as err:
                self._failed_callbacks.add(id(cb))
                state = self._probes.get(getattr(cb, "name", None))
                if state is not None and state.probe is cb:
                    state.enabled = False
                log.warning(
                    "%s raised in %s and is disabled: %s: %s",
                    type(cb).__name__,
                    event,
                    type(err).__name__,
                    err,
                )

    @staticmethod
    def _ask(st: _ProbeState, question: str, argument) -> bool:
        """``st``'s schedule's answer to ``question`` (a method name); a schedule that raises
        disables its probe."""
        try:
            return bool(getattr(st.probe.schedule, question)(argument))
        except Exception as err:
            _disable(st, "had its schedule raise", err)
            return False

    def _due_at_step(self) -> list[_ProbeState]:
        """The probes due at this step (not busy), each schedule asked only from the step it
        named (``Schedule.next_due``: most can say, as every n steps, a list, a budget's
        interval), and the next step at which any may be due."""
        step = self._step
        info = StepInfo(step, self._epoch, self)
        due = []
        for st in self._states:  # _ask("due") written out: this can run at every step
            if st.enabled and step >= st.next_due:
                try:
                    if st.probe.schedule.due(info):
                        due.append(st)
                except Exception as err:
                    _disable(st, "had its schedule raise", err)
                    continue
                _plan(st, step)
        self._next_due = self._earliest_due()
        return self._skip_busy(due) if due else due

    def _earliest_due(self) -> float:
        """The first step at which any enabled probe's schedule is asked next."""
        return min((st.next_due for st in self._states if st.enabled), default=math.inf)

    @staticmethod
    def _skip_busy(due: list[_ProbeState]) -> list[_ProbeState]:
        free = []
        for st in due:
            if st.busy:
                st.stats.skipped += 1
            else:
                free.append(st)
        return free

    def _launch(self, states: list[_ProbeState] | None, gathers: bool, **how) -> None:
        """``_probe_now(states)``; with a sharded model, at a step at which every rank gathers
        (``gathers``: see probescope.gather), the snapshot is the gather, which runs whether
        or not a probe takes it."""
        if not gathers:
            if states:
                self._probe_now(states, **how)
            return
        with self._pool.gathering(True):
            if states:
                self._probe_now(states, **how)

    def _step_gather(self, due: list[_ProbeState] | None, first: bool = False) -> None:
        """A step of a sharded model, on every rank: gather if the plan says so (launching
        ``due`` on the probing rank), then, with budget probes, announce the step at which
        they are next due (see probescope.gather)."""
        plan = self._gather_plan
        gathers = plan.at_step(self._step, self._epoch, first=first)
        if self.probing:
            self._launch(due, gathers)
        else:
            self._gather_only(gathers)
        if gathers and plan.adaptive:
            steps = [
                st.next_due
                for st in self._adaptive
                if st.enabled and st.probe.reads_model and st.next_due < math.inf
            ]
            plan.announce(int(min(steps)) if steps else None, self._probe_rank)

    def _gather_only(self, gathers: bool) -> None:
        """A rank that does not probe joins the gathers of a sharded model's weights."""
        if gathers:
            with self._pool.gathering(True):
                pass

    def _probe_now(self, states: list[_ProbeState], inline: bool = False, epoch: int | None = None) -> None:
        """Snapshot the weights and evaluate ``states`` on the worker (or here, if inline).
        Probes that read nothing of the model (a LossProbe of the loop's series) take no
        snapshot: a copy of the model for them alone would cost the training thread for nothing
        (and a sharded model's, a gather of every rank)."""
        if not states:
            return
        inline = inline or self._pool.inline
        reads = any(st.probe.reads_model for st in states)
        t0 = time.perf_counter()
        shadow = None
        if reads:
            with _traced("probescope.snapshot"):
                shadow = self._pool.acquire()
        copy_s = (time.perf_counter() - t0) / len(states)  # the snapshot's cost, shared out
        if reads and shadow is None:
            for st in states:
                st.stats.skipped += 1
            return
        frames = []  # what the budget is told; an inline frame is none of the steps' time
        for st in states:
            st.busy, st.last_step = True, self._step
            st.launched += 1
            frames.append(None if inline else st.launched)
        self._in_flight = self._in_flight or not inline
        epoch = self._epoch if epoch is None else epoch
        job = _Job(self, shadow, states, frames, self._step, epoch, self.history.lengths(), copy_s)
        if inline:
            job()
        else:
            self._worker.submit(job)

    def _check_model(self, step: int) -> None:
        """Before a frame (on the probe's thread): if the model changed since the Monitor was
        created (``SnapshotPool.model_change``), the probes that read it were set up for the old
        one and would show stale or misplaced frames: disable them, with one warning."""
        change = self._pool.model_change()
        if change is None:
            return
        stopped = [st for st in self._probes.values() if st.enabled and st.probe.reads_model]
        for st in stopped:
            st.enabled = False
        if stopped:
            log.warning(
                "Monitor: the model changed after the Monitor was created (%s, seen at step %d); "
                "probes are set up for the model as it was, so those that read it stop here (%s); "
                "training goes on. Create the Monitor once the model is final: on its device, in "
                "its dtype, with its layers in place",
                change,
                step,
                ", ".join(f"{type(st.probe).__name__} {st.probe.name!r}" for st in stopped),
            )

    def summary(self) -> dict[str, Any]:
        """What happened so far: steps, epochs, frames, per-probe counters, memory."""
        end = self._t_end if self._t_end is not None else time.perf_counter()  # frozen at close
        elapsed = end - self._t_start if self._started else 0.0
        return {
            "steps": self._step,
            "epochs": self._epoch,
            "rank": self.placement.rank,
            "probing": self.probing,
            "wall_seconds": round(elapsed + self._wall_before, 3),
            "snapshot_bytes": self._pool.nbytes,
            "frames_written": self.writer.frames_written if self.writer else 0,
            **({"budget": self.budget} if self.budget is not None else {}),
            **(
                {
                    "gathers": {
                        "count": self._pool.gathers,
                        "seconds": round(self._pool.gather_s, 6),
                        "elements": self._pool.gathered_elements,
                    }
                }
                if self.sharded is not None
                else {}
            ),
            "nonfinite": {
                display_name(name): {"step": step, "value": str(value)}
                for name, (step, value) in self.history.nonfinite().items()
            },
            "probes": {
                name: {
                    **st.stats.as_dict(),
                    "enabled": st.enabled,
                    "frames": st.ring.written,
                    "dropped": st.ring.dropped,
                    "ring_bytes": st.ring.nbytes,
                    **(
                        {"left_out": self.writer.left_out[name]}
                        if self.writer and self.writer.left_out.get(name)
                        else {}
                    ),
                    **({"schedule": _schedule_state(st)} if st.adaptive else {}),
                }
                for name, st in self._probes.items()
            },
        }


class _Job:
    """One snapshot evaluated by a list of probes, writing into their rings."""

    def __init__(
        self, monitor: Monitor, shadow: nn.Module, states, frames, step: int, epoch: int, cut, copy_s: float
    ):
        self.monitor, self.shadow, self.states, self.frames = monitor, shadow, states, frames
        self.step, self.epoch, self.cut, self.copy_s = step, epoch, cut, copy_s

    def __call__(self) -> None:
        import torch

        pool, shadow = self.monitor._pool, self.shadow
        # sync: the live model, in eval mode for its probes (a copy is in eval mode for good)
        reads = shadow is not None  # else none of the probes reads the model
        modes = eval_mode(shadow) if reads and pool.strategy == "sync" else contextlib.nullcontext()
        streams = self.monitor._streams
        on_stream = streams.probe_context() if streams and not pool.inline else contextlib.nullcontext()
        try:
            if reads:
                pool.wait_ready(shadow)
                self.monitor._check_model(self.step)
            with modes, torch.no_grad(), on_stream:
                history, cut = self.monitor.history, self.cut
                context = ProbeContext(self.step, self.epoch, read=lambda: history.read(cut))
                for st, frame in zip(self.states, self.frames, strict=True):
                    if st.enabled:
                        context.claim = st.ring.claim  # its kernels write into its ring
                        self._evaluate(st, frame, context)
        finally:
            for st in self.states:
                st.busy = st.running = False
            if reads:
                pool.release(shadow)

    def _evaluate(self, st: _ProbeState, frame: int | None, context: ProbeContext) -> None:
        st.evaluating(frame)
        t0 = time.perf_counter()
        try:
            # A probe that reads nothing of the model is handed the live one, unread.
            model = self.shadow if self.shadow is not None else self.monitor.model
            with _traced(f"probescope.frame:{st.probe.name}"):
                data = st.probe.evaluate(model, context)
                st.ring.write(data, self.step, self.epoch)
        except Exception as err:
            st.stats.failed += 1
            st.enabled = False
            log.warning(
                "%s %r failed at step %d and is disabled; training goes on. %s: %s",
                type(st.probe).__name__,
                st.probe.name,
                self.step,
                type(err).__name__,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return
        finally:
            st.busy = st.running = False
        ms = (time.perf_counter() - t0) * 1000.0
        st.stats.run += 1
        st.stats.total_ms += ms
        st.stats.last_ms = ms
        if st.adaptive:
            _observe(st, "observe", probe_s=ms / 1000.0 + self.copy_s, copy_s=self.copy_s, frame=frame)


def _traced(name: str):
    """A range called ``name`` in the trace of a running torch profiler (the snapshot, each
    frame), so that a user's own profile shows where probescope worked; nothing otherwise (a
    range costs microseconds even with no profiler). The flag read is the profiler module's,
    set for every thread, not the calling thread's profiler state."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _disable(st: _ProbeState, happened: str, err: Exception) -> None:
    st.enabled = False
    log.warning(
        "%s %r %s and is disabled; training goes on. %s: %s",
        type(st.probe).__name__,
        st.probe.name,
        happened,
        type(err).__name__,
        err,
    )


def _warn_nonfinite(name: str, step: int, value: float) -> None:
    log.warning(
        "Monitor: %s is %s at step %d, its first value that is not a finite number; training goes "
        "on as the loop decides, and run.json lists it (summary.nonfinite)",
        display_name(name),
        value,
        step,
    )


def _schedule_state(st: _ProbeState) -> dict | None:
    try:
        return st.probe.schedule.state()
    except Exception:
        return None


def _observe(st: _ProbeState, method: str, *args, **kwargs) -> None:
    """Feed timings to the probe's schedule (budget mode) through ``method`` (``observe`` or
    ``observe_steps``); a schedule that raises is ignored, with one warning."""
    try:
        getattr(st.probe.schedule, method)(*args, **kwargs)
    except Exception as err:
        st.probe.warn_once("observe", f"its schedule's {method}() raised ({type(err).__name__}: {err})")


def _shares(running: list[_ProbeState]) -> dict[str, float]:
    """How a step in which these probes' frames all ran is shared between them: in proportion to
    their last evaluation times (evenly while one of them has none)."""
    weights = [st.stats.last_ms if st.stats.run else 0.0 for st in running]
    if min(weights) <= 0.0:
        weights = [1.0] * len(running)
    total = sum(weights)
    return {st.probe.name: w / total for st, w in zip(running, weights, strict=True)}


def _plan(st: _ProbeState, step: int) -> None:
    """The next step after ``step`` at which ``st``'s schedule is asked."""
    first = next_due(st.probe.schedule, step)
    st.next_due = math.inf if first is None else first


def torch_optimizer(optimizer):
    """The torch optimizer a framework's wrapper holds (accelerate's ``AcceleratedOptimizer``,
    which Hugging Face's Trainer hands its callbacks), or ``optimizer`` itself. Such a wrapper
    subclasses ``torch.optim.Optimizer`` without running its ``__init__``: a step hook
    registered on it fails, and its ``step`` would not call one; the one it holds steps."""
    while (
        isinstance(optimizer, torch.optim.Optimizer)
        and not hasattr(optimizer, "_optimizer_step_pre_hooks")
        and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    return optimizer


def _step_learning_rate(optimizer):
    """The learning rate a step is about to use (a tensor one copied: schedulers write it in place)."""
    lr = _learning_rate(optimizer)
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr


def _learning_rate(optimizer):
    """The first parameter group's learning rate (a float or a 0-d tensor), or None."""
    try:
        lr = optimizer.param_groups[0].get("lr")
    except (AttributeError, IndexError, TypeError):
        return None
    return lr if isinstance(lr, (int, float, torch.Tensor)) else None


def _describe_model(model: nn.Module) -> dict[str, Any]:
    params = list(model.parameters())
    text = repr(model)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in params),
        "device": str(params[0].device) if params else "cpu",
        "dtype": str(params[0].dtype).replace("torch.", "") if params else "float32",
        "repr": text if len(text) < 4000 else text[:4000] + " ...",
    }
