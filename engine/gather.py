"""Probes of a sharded model: every rank joins a gather of the whole weights at the steps the
probes are due, and the probing rank evaluates them in an unsharded copy of the model.

A model sharded across ranks (FSDP2's ``fully_shard``, tensor parallelism: any DTensor
parameter) holds a part of each weight on each rank, and its forward gathers the rest from
every rank: a probe cannot run it on one rank alone. Instead, at each step at which a probe
that reads the model is due, every rank takes part in gathering the sharded parameters to
the probing rank: those sharded by rows over all ranks (FSDP2's) in buckets of up to
``BUCKET_BYTES`` of whole parameters, one ``torch.distributed.gather`` each (a rank sends its
packed rows and holds nothing more; a collective per parameter, as ``DTensor.full_tensor()``
or a full state dict takes, costs a latency each: five times the time on benchmarks.sharded's
MLP), and any other placement whole on every rank, one parameter at a time
(``DTensor.full_tensor()``). The probing rank writes the gathered weights (and its own
buffers, which are whole on every rank) into a shadow: an unsharded model built from the one
the user gives (``Monitor(..., unsharded=...)``: the model as defined before sharding, or a
function that builds it; on the meta device it costs no memory, and its shadows are made on
the sharded model's device). Probes then evaluate the shadow off the training path, as with
the ``copy`` snapshot; the other ranks drop what they gathered. With a probe that reads
gradients (a StatsProbe's ``grads``), each gather brings the gradients present too, the same
way, into the shadow's ``.grad``. With ``params="trainable"`` (``Monitor(snapshot_params=)``)
the frozen parameters, which training never changes, are gathered once, into tensors the
shadows share, and every later gather brings only the rest (one unfrozen later is a change of
the model, ``model_change``: the probes that read it stop).

Which steps gather must be the same on every rank, or one rank would wait for a collective
that the others never start: a ``GatherPlan`` asks the probes' schedules on every rank, from
the step and epoch alone (a busy or disabled probe on the probing rank does not change it).
Schedules that adapt to the probing rank's own timings (``Schedule.budget``) cannot be asked
by the other ranks: the probing rank announces their next step (``GatherPlan.announce``).
A gather is a collective in the training thread of every
rank, so a gathering step costs training the time to bring the whole model to the probing
rank (and to the host when the shadows are there), which every rank waits for:
``GatheredPool.describe()`` counts the gathers and their time on the probing rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from probescope.schedule import Schedule, StepInfo, next_due
from probescope.snapshot import (
    TRAINABLE,
    _hint_frozen,
    _host_place,
    _named_state_tensors,
    _unique,
    fill_shadow,
    observer_hooks,
    place_copies,
    shadow_copy,
    stand_for,
)
from probescope.streams import ProbeStreams

log = logging.getLogger("probescope")


class GatherPlan:
    """The steps and epoch ends at which every rank gathers: those at which any of the
    ``schedules`` (name -> schedule, of the probes that read the model) is due, asked from the
    step and epoch alone (``StepInfo.monitor`` is None), the same way on every rank. A schedule
    that raises here is never asked again (on every rank alike), with one warning: its probe
    gets no frames, since the probing rank only evaluates what every rank gathered for.

    Budget schedules (``adaptive``) follow the probing rank's own timings, which the other ranks
    cannot know: every rank gathers at the step a Monitor starts (a budget's first frame), and
    after each gather the probing rank ``announce``s the step at which its budget probes are
    next due (a broadcast, at gathering steps only), at which every rank gathers next. A budget
    that has grown its interval since is not due there (a gather for nothing; the next step is
    announced from it), and one that has shrunk it waits for the step announced."""

    def __init__(self, schedules: Mapping[str, Schedule], adaptive: bool = False):
        self.names = list(schedules)
        self.schedules = list(schedules.values())
        self.adaptive = adaptive
        self.announced: int | None = None  # the step at which the budget probes are due next
        self._next: list[float] = [0] * len(self.schedules)  # inf: never again; -inf: it raised

    @property
    def reads(self) -> bool:
        """Whether any probe reads the model (a final frame gathers)."""
        return bool(self.schedules) or self.adaptive

    def at_step(self, step: int, epoch: int, first: bool = False) -> bool:
        """Whether every rank gathers after step ``step`` (``first``: the step the Monitor
        starts at)."""
        due = (first and self.adaptive) or step == self.announced
        info = StepInfo(step, epoch, None)
        for i, schedule in enumerate(self.schedules):
            if step < self._next[i] or self._next[i] == -math.inf:
                continue
            try:
                due = bool(schedule.due(info)) or due
            except Exception as err:
                self._failed(i, err)
                continue
            following = next_due(schedule, step)
            self._next[i] = math.inf if following is None else following
        return due

    def announce(self, step: int | None, src: int) -> None:
        """Every rank: the step at which the budget probes are next due, as the probing rank
        ``src`` says (None: none will be)."""
        import torch.distributed as dist

        said = [step]
        dist.broadcast_object_list(said, src=src)
        self.announced = said[0]

    def at_epoch_end(self, epoch: int) -> bool:
        due = False
        for i, schedule in enumerate(self.schedules):
            if self._next[i] == -math.inf:
                continue
            try:
                due = bool(schedule.due_at_epoch_end(epoch)) or due
            except Exception as err:
                self._failed(i, err)
        return due

    def _failed(self, i: int, err: Exception) -> None:
        self._next[i] = -math.inf
        log.warning(
            "Monitor: the schedule of %r raised when asked from the step and epoch alone, as "
            "every rank of a sharded model asks it (%s: %s); no rank gathers for it any more, so "
            "it takes no frame. A schedule of a sharded model decides from StepInfo.step and .epoch",
            self.names[i],
            type(err).__name__,
            err,
        )


def build_unsharded(unsharded: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The unsharded template: the module given, or what the function given builds, built on
    the meta device (its shadows are made, whole, where the probes run)."""
    if isinstance(unsharded, nn.Module):
        return unsharded
    if not callable(unsharded):
        raise TypeError(
            "Monitor: unsharded must be the model as defined before sharding (a torch.nn.Module, "
            f"e.g. on the meta device) or a function that builds it, got {type(unsharded).__name__}"
        )
    with torch.device("meta"):
        built = unsharded()
    if not isinstance(built, nn.Module):
        raise TypeError(f"Monitor: unsharded() must return a torch.nn.Module, got {type(built).__name__}")
    return built


class GatheredPool:
    """Shadows of a sharded model, filled by a gather in which every rank takes part.

    Every rank holds one (the same sources, in the same order); the probing rank's has
    ``size`` shadows made from ``template`` (the unsharded model) on the sharded model's
    device (or the template's, if it is not on the meta device), or on the host with ``host``.
    The Monitor arms it at each gathering step (``gathering``): the first ``acquire`` then
    gathers into a free shadow, and if none took it the gather still runs when the step's
    launches end (the other ranks gather whatever the probing rank does). ``acquire`` outside
    a gathering step hands out no shadow: a gather there would hang the job. ``grads``: the
    gradients come too, into each shadow's ``.grad``; ``params="trainable"``: the frozen
    parameters are gathered once, into tensors the shadows share. ``state_dict`` gathers the
    model whole to the host (``model.pt``).
    """

    def __init__(
        self,
        sharded: nn.Module,
        template: nn.Module | None,
        strategy: str = "copy",
        size: int = 2,
        streams: ProbeStreams | None = None,
        defer_wait: bool = False,
        host: bool = False,
        hooks: bool = False,
        probe_rank: int = 0,
        grads: bool = False,
        params: str | None = None,
    ):
        if strategy not in ("copy", "sync"):
            raise ValueError(
                f"Monitor: snapshot={strategy!r} reads the model in place, which a sharded model "
                "cannot give a probe; use 'copy' (the default) or 'sync'"
            )
        self.model, self.strategy, self.streams, self.host = sharded, strategy, streams, host
        # Weights change only at the next optimizer step, but gradients at the next backward.
        self._wait_now = grads or not defer_wait
        named = _named_state_tensors(sharded)
        first_name = {}
        for name, t in named:
            first_name.setdefault(id(t), name)
        self._sources = _unique(t for _, t in named)  # every rank gathers them in this order
        self._names = [first_name[id(t)] for t in self._sources]
        position = {id(t): i for i, t in enumerate(self._sources)}
        self._index = {name: position[id(t)] for name, t in named}  # every name, aliases too
        self.probe_rank = probe_rank
        self._plan = _Gathering(self._sources, probe_rank)
        # params="trainable": the frozen parameters (a LoRA model's base weights, a frozen
        # backbone), which training never changes, are gathered once, at the first gather (on
        # every rank alike), into tensors all shadows share; later gathers bring the rest.
        frozen = {
            i
            for i, t in enumerate(self._sources)
            if params == TRAINABLE and isinstance(t, nn.Parameter) and not t.requires_grad
        }
        self._live = [i for i in range(len(self._sources)) if i not in frozen]
        self._live_plan = _Gathering([self._sources[i] for i in self._live], probe_rank) if frozen else None
        self._frozen: dict[int, torch.Tensor] = dict.fromkeys(sorted(frozen))  # shared targets
        self._frozen_filled = not frozen
        self.gathered_elements = 0  # what the gathers brought, all told
        # With grads: the parameters whose gradients every gather brings too (those present:
        # FSDP gives every rank its shard of each, so a gradient is there on all ranks or none).
        self._grad_params = [i for i, t in enumerate(self._sources) if grads and isinstance(t, nn.Parameter)]
        self._grads: dict[int, list[torch.Tensor]] = {}  # a shadow's buffer per such parameter
        self.size = 0 if template is None else (size if strategy == "copy" else 1)
        self.dropped_hooks = observer_hooks(template) if template is not None and not hooks else []
        self._free: list[nn.Module] = []
        self._targets: dict[int, list[torch.Tensor]] = {}
        self._ready: dict[int, torch.cuda.Event] = {}
        self._lock = threading.Lock()
        self._armed = self._gathered = False
        self.gathers, self.gather_s = 0, 0.0
        self.reference: nn.Module | None = None  # the shadow probes are set up for
        if template is not None:
            self._check_template(template)
            if params is None:
                _hint_frozen(sharded, self.size)
            self._make_shadows(template, hooks)

    # ---- set-up ---------------------------------------------------------------------------
    def _check_template(self, template: nn.Module) -> None:
        """The unsharded model has a tensor of each name, shape and dtype the sharded one has."""
        theirs = {n: t for n, t in _named_state_tensors(template)}
        problems = []
        for name, t in zip(self._names, self._sources, strict=True):
            other = theirs.get(name)
            if other is None:
                problems.append(f"it has no {name!r}")
            elif tuple(other.shape) != tuple(t.shape) or other.dtype != t.dtype:
                problems.append(
                    f"its {name!r} is {tuple(other.shape)} {other.dtype}, the sharded model's "
                    f"{tuple(t.shape)} {t.dtype}"
                )
        ours = {n for n, _ in _named_state_tensors(self.model)}  # every name, aliases too
        problems += [f"the sharded model has no {n!r}" for n in theirs if n not in ours]
        if problems:
            raise ValueError(
                "Monitor: unsharded must be the sharded model as it was defined before sharding "
                f"(the same tensors by name, shape and dtype), but {'; '.join(problems[:4])}"
                f"{' ...' if len(problems) > 4 else ''}"
            )
        self._template_names = theirs

    def _make_shadows(self, template: nn.Module, hooks: bool) -> None:
        device = _source_device(self._sources) if _on_meta(template) else _template_device(template)
        held = [*self._sources, *(self._sources[i] for i in self._grad_params)]  # weights, gradients
        per_copy = sum(t.numel() * t.element_size() for t in held)
        size, host, why = place_copies(per_copy, self.size, device, self.host, whole=True)
        if size == 0:  # before training: a rank that cannot hold the model whole cannot probe it
            raise ValueError(
                f"Monitor: the probing rank has no room for the unsharded model: {why}; probes that "
                "read the model cannot run there"
            )
        if why:
            log.warning("Monitor: the unsharded shadows: %s", why)
        self.size, self.host = size, host
        if self.host:
            place = _host_place
        else:

            def place(t: torch.Tensor) -> torch.Tensor:
                return torch.empty(t.shape, dtype=t.dtype, device=device)

        for k in range(self.size):
            shared = (
                {id(self._template_names[self._names[i]]): t for i, t in self._frozen.items()} if k else {}
            )
            shadow, twin = shadow_copy(template, shared, hooks=hooks, place=place)
            shadow.eval()
            targets = [twin[id(self._template_names[name])] for name in self._names]
            with torch.no_grad():
                for t in targets:
                    t.requires_grad_(False)
                    t.zero_()  # probes set up on it read finite numbers
            stand_for(shadow, self.model)  # (its own parameters require no gradients)
            self._targets[id(shadow)] = targets
            for i in self._frozen:
                self._frozen[i] = targets[i]  # (the first shadow's; the others share them)
            if self._grad_params:
                buffers = [place(targets[i]) for i in self._grad_params]
                self._grads[id(shadow)] = buffers
            self._free.append(shadow)
        self.reference = self._free[0] if self._free else None

    # ---- the pool's interface (probescope.snapshot.SnapshotPool) --------------------------
    @property
    def inline(self) -> bool:
        return self.strategy == "sync"

    @property
    def nbytes(self) -> int:
        held = _unique(t for ts in [*self._targets.values(), *self._grads.values()] for t in ts)
        return sum(t.numel() * t.element_size() for t in held)

    def describe(self) -> dict:
        return {
            "strategy": self.strategy,
            "host": self.host,
            "sharded": True,
            "copied_elements": sum(self._sources[i].numel() for i in self._live),
            "model_elements": sum(t.numel() for t in self._sources),
            "bytes": self.nbytes,
            "dropped_hooks": list(self.dropped_hooks),
            "gathers": self.gathers,
            "gathered_elements": self.gathered_elements,
            "gather_s": round(self.gather_s, 6),
        }

    def model_change(self) -> str | None:
        """A parameter that ``params="trainable"`` gathered once, frozen then, that trains now
        (the shadows hold its first values and share one tensor of it), else None: the gathers
        read the sharded parameters found at construction, which FSDP keeps (updated in place)
        while it registers unsharded ones on the modules during each forward and backward, so
        the modules' parameters, which a probe's thread would compare while training runs, say
        nothing else about a change."""
        thawed = next((i for i in self._frozen if self._sources[i].requires_grad), None)
        if thawed is None:
            return None
        return (
            f"its parameter {self._names[thawed]!r} trains now, frozen when the Monitor started, and "
            "snapshot_params='trainable' gathered it once; without snapshot_params every gather "
            "brings it, or a new Monitor (resume=True) after unfreezing gathers what trains then"
        )

    def acquire(self, fill: bool = True) -> nn.Module | None:
        """A shadow holding this step's gathered weights (the first acquire of a gathering step
        gathers), or None: every shadow in use, the step's gather already taken by another
        shadow, or not a gathering step. ``fill=False``: any free shadow, as it is (warm-up)."""
        with self._lock:
            if not self._free or (fill and (not self._armed or self._gathered)):
                return None
            shadow = self._free.pop()
        if fill:
            fill_shadow(shadow, self._gather, self.streams, self.host, self._wait_now, self._ready)
        return shadow

    def wait_ready(self, shadow: nn.Module) -> None:
        ready = self._ready.pop(id(shadow), None)
        if ready is not None:
            ready.synchronize()

    def release(self, shadow: nn.Module) -> None:
        with self._lock:
            self._free.append(shadow)

    # ---- gathering ------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathering(self, due: bool):
        """Around a step's (or an epoch end's, or close's) launches, on every rank: with ``due``
        the step gathers exactly once, into the shadow the first ``acquire`` takes, or for
        nothing after the launches if none did."""
        if not due:
            yield
            return
        self._armed, self._gathered = True, False
        try:
            yield
        finally:
            if not self._gathered:
                self._gather(None)
            self._armed = False

    def _gather(self, shadow: nn.Module | None) -> None:
        """The weights whole (and with grads, the gradients), into ``shadow`` (the probing
        rank's) or dropped (see ``_Gathering``)."""
        t0 = time.perf_counter()
        self._gathered = True
        with torch.no_grad():
            targets = None if shadow is None else self._targets[id(shadow)]
            if not self._frozen_filled:  # the first gather: every tensor, the frozen ones too
                if targets is None and self._frozen:
                    targets = [self._frozen.get(i) for i in range(len(self._sources))]
                self._run(self._plan, self._sources, targets)
                self._frozen_filled = True
            elif self._live_plan is not None:
                into = None if targets is None else [targets[i] for i in self._live]
                self._run(self._live_plan, [self._sources[i] for i in self._live], into)
            else:
                self._run(self._plan, self._sources, targets)
            if self._grad_params:
                present = [i for i in self._grad_params if self._sources[i].grad is not None]
                into = None
                if shadow is not None:  # (targets is a list without one at a first gather too)
                    held = dict(zip(self._grad_params, self._grads[id(shadow)], strict=True))
                    into = [held[i] for i in present]
                    for i in self._grad_params:
                        targets[i].grad = held[i] if i in present else None
                grads = [self._sources[i].grad for i in present]
                self._run(_Gathering(grads, self.probe_rank), grads, into)
        self.gathers += 1
        self.gather_s += time.perf_counter() - t0

    def state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """The sharded model's state_dict, whole, on the host (``model.pt``): a gather on every
        rank; the tensors on the rank that ``keep``s them (the probing rank), else None."""
        keys = list(self.model.state_dict())
        whole = [torch.empty(t.shape, dtype=t.dtype) for t in self._sources] if keep else None
        t0 = time.perf_counter()
        self._run(self._plan, self._sources, whole)
        self.gathers += 1
        self.gather_s += time.perf_counter() - t0
        if not keep:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # (at close: the copies to the host are done)
        return {key: whole[self._index[key]] for key in keys}

    def _run(self, plan: _Gathering, sources: list[torch.Tensor], into: list | None) -> None:
        plan.run(sources, into, self.host)
        self.gathered_elements += sum(t.numel() for t in sources)


class _Gathering:
    """How a list of tensors comes whole to the probing rank, the same on every rank: those
    sharded by rows over all ranks (FSDP2's) in buckets, one gather to the probing rank each;
    any other DTensor whole on every rank (``DTensor.full_tensor()``); the rest (buffers),
    whole on every rank already, copied."""

    def __init__(self, sources: list[torch.Tensor], probe_rank: int):
        self.buckets, self.each = plan_buckets(sources, probe_rank)
        gathered = {i for b in self.buckets for i, *_ in b.entries} | set(self.each)
        self.local = [i for i in range(len(sources)) if i not in gathered]

    def run(self, sources: list[torch.Tensor], into: list[torch.Tensor] | None, non_blocking: bool) -> None:
        for bucket in self.buckets:
            bucket.gather(sources, into, non_blocking)
        for i in self.each:
            whole = sources[i].full_tensor()
            if into is not None and into[i] is not None:
                into[i].copy_(whole, non_blocking=non_blocking)
        if into is not None:
            for i in self.local:
                if into[i] is not None:
                    into[i].copy_(sources[i], non_blocking=non_blocking)


class _Bucket:
    """Parameters sharded by rows (``Shard(0)``) over one process group that holds every rank,
    gathered to the probing rank in one collective: each rank packs its rows of each into one
    buffer, a slot per parameter as large as the largest rank's rows (``torch.chunk``'s split,
    which DTensor's follows), and the probing rank unpacks every rank's rows into place."""

    def __init__(self, group, dst: int, dtype: torch.dtype, device: torch.device):
        import torch.distributed as dist

        self.group, self.dst, self.dtype, self.device = group, dst, dtype, device  # dst: a global rank
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.receiving = dist.get_rank() == dst
        self.entries: list[tuple[int, int, int, list[int]]] = []  # source, offset, row size, rows
        self.size = 0  # elements of a rank's packed buffer
        self.whole_bytes = 0

    def add(self, index: int, shape: torch.Size) -> None:
        n = shape[0]
        per = math.ceil(n / self.world)
        rows = [max(0, min(per, n - r * per)) for r in range(self.world)]
        row = math.prod(shape[1:])
        self.entries.append((index, self.size, row, rows))
        self.size += per * row
        self.whole_bytes += n * row * torch.empty((), dtype=self.dtype).element_size()

    def gather(
        self, sources: list[torch.Tensor], into: list[torch.Tensor] | None, non_blocking: bool
    ) -> None:
        import torch.distributed as dist

        # Each rank's rows go in its parameter's slot; a slot's tail past a rank's rows (uneven
        # shards) is never read, so the buffer need not be cleared. One foreach copy each way.
        packed = torch.empty(self.size, dtype=self.dtype, device=self.device)
        views, locals_ = [], []
        for index, offset, _, rows in self.entries:
            local = sources[index].to_local()
            if local.shape[0] != rows[self.rank]:
                raise RuntimeError(
                    f"gather: a parameter sharded by rows has {local.shape[0]} rows on rank "
                    f"{self.rank}, not the {rows[self.rank]} of torch.chunk's split"
                )
            if local.numel():
                views.append(packed[offset : offset + local.numel()])
                locals_.append(local.reshape(-1))
        if views:
            torch._foreach_copy_(views, locals_)
        parts = [torch.empty_like(packed) for _ in range(self.world)] if self.receiving else None
        dist.gather(packed, parts, dst=self.dst, group=self.group)
        if into is None or not self.receiving:
            return
        targets, pieces = [], []
        for index, offset, row, rows in self.entries:
            target, start = into[index], 0
            if target is None:  # (not wanted: a shadow's, when none was free)
                continue
            for part, n in zip(parts, rows, strict=True):
                if n:
                    targets.append(target[start : start + n])
                    pieces.append(part[offset : offset + n * row].view(n, *target.shape[1:]))
                start += n
        if targets:
            torch._foreach_copy_(targets, pieces, non_blocking=non_blocking)


BUCKET_BYTES = 256 * 2**20  # the whole parameters a bucket gathers at most (a larger one: alone)


def plan_buckets(sources: list[torch.Tensor], probe_rank: int) -> tuple[list[_Bucket], list[int]]:
    """The buckets of the sources that one gather per bucket brings to ``probe_rank`` (sharded
    by rows over a group of every rank: FSDP2's parameters), and the other sharded sources,
    gathered one by one. The same on every rank: it reads global shapes and placements only."""
    try:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return [], []
    buckets: dict[tuple, _Bucket] = {}
    chosen: list[_Bucket] = []
    each = []
    for i, t in enumerate(sources):
        if not isinstance(t, DTensor):
            continue
        mesh = t.device_mesh
        if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.ndim == 0:
            each.append(i)
            continue
        group = mesh.get_group()
        if dist.get_world_size(group) != dist.get_world_size():
            each.append(i)  # a group without every rank: it may not hold the probing rank
            continue
        key = (id(group), t.dtype, t.device)
        bucket = buckets.get(key)
        if bucket is None or bucket.whole_bytes + t.numel() * t.element_size() > BUCKET_BYTES:
            bucket = buckets[key] = _Bucket(group, probe_rank, t.dtype, t.device)
            chosen.append(bucket)
        bucket.add(i, t.shape)
    return chosen, each


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for _, t in _named_state_tensors(module))


def _template_device(module: nn.Module) -> torch.device:
    for _, t in _named_state_tensors(module):
        return t.device
    return torch.device("cpu")


def _source_device(sources: list[torch.Tensor]) -> torch.device:
    """Where the sharded model's local shards are (a DTensor's device is its local tensor's)."""
    for t in sources:
        return t.device
    return torch.device("cpu")
