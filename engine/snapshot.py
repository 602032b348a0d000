"""Consistent copies of the weights of one step, for probes to evaluate off the training path.

Strategies:
- ``copy`` (default): the parameters and buffers are copied, at the step boundary, into
  preallocated shadow models (eval mode, no grad). Probes never see a half-updated model.
- ``sync``: no copy; the probe runs inline in the training thread between steps (for tiny
  models, where a copy costs more than the probe).
- ``live``: no copy; the worker reads the live module while training goes on. Racy: a frame
  may mix weights of neighbouring steps. The module runs in whatever mode it is in, so in
  train mode its batch norms update their statistics and its dropouts draw from the global
  generator (a warning at construction names them).

With ``grads=True`` (a probe reads gradients), a ``copy`` snapshot also copies each
parameter's ``.grad`` into a preallocated buffer of the shadow (made at its first gradient for
one frozen when the snapshot was set up: training may unfreeze it); a parameter with no
gradient at the step boundary has none in the shadow either. A shadow says which of its
parameters train through the model it stands for (``trained_parameters``).

On CUDA (``streams`` given) the copy runs on the probe stream, ordered against training by
events only (see probescope.streams): the training thread enqueues it and goes on.

For models too large to copy whole: ``params`` (glob patterns over parameter and buffer names, e.g.
``["head.*", "blocks.11.*"]``) copies only the matching tensors; the shadow shares every other
tensor with the live model, so probes read those live (racy, like ``live``). ``params=
"trainable"`` copies the parameters that require gradients and every buffer, and shares the
frozen parameters, which the optimizer never changes (a fine-tune's frozen backbone, a LoRA
model's base weights: exact, unless something else writes them in place, as an EMA teacher's
update does; one unfrozen later stays shared, read live). A copy of the whole model whose
frozen parameters are most of it and more than ``FROZEN_HINT_BYTES`` gets one warning that
says so. ``host=True``
keeps the shadow in host memory (pinned when CUDA is present, made there; the copy is
non-blocking on the probe stream and the probe waits for its event), and probes evaluate it
on the CPU. Copies on a CUDA device may take half of its free memory; past that the pool
keeps one, else goes to the host, and copies that run out of memory as they are made go to
the host (a part of a model: ``sync``), each with one warning (``plan_copies``). Copies in
host memory (a model on the CPU, ``host``, or moved there) may take half of what the host
has available (``host_free_memory``: Linux's MemAvailable, or a cgroup's room); past that
one, else none (``sync``): memory taken past what the host has gets the process killed.
``nbytes`` is what the snapshot holds.

A ``copy`` shadow runs without the model's forward and backward hooks, except torch's own that
compute the forward (weight and spectral norm, pruning): hooks observe training (a user's
activation logger, a library's), and a probe's forward on the worker thread is not theirs
to see. ``hooks=True`` keeps every hook (deep-copied with the model). ``sync`` and ``live``
run the live model, hooks and all.

A snapshot is set up for the model as it is when the Monitor is created. ``model_change``
says what has changed since (a parameter replaced, or moved to another device or dtype),
which would leave a ``copy`` snapshot copying tensors training no longer updates.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from probescope.kernels.mlp import is_keras_model
from probescope.streams import ProbeStreams
from probescope.units import bytes_text

log = logging.getLogger("probescope")

STRATEGIES = ("copy", "sync", "live")
TRAINABLE = "trainable"  # params=: what the optimizer changes, and the buffers
FROZEN_HINT_BYTES = 256 * 2**20  # frozen parameters worth a warning when a snapshot copies them


class SnapshotPool:
    """Hands out shadow models holding the weights of the current step."""

    def __init__(
        self,
        model: nn.Module,
        strategy: str = "copy",
        size: int = 2,
        grads: bool = False,
        streams: ProbeStreams | None = None,
        defer_wait: bool = False,
        params: Sequence[str] | None = None,
        host: bool = False,
        hooks: bool = False,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"snapshot must be one of {STRATEGIES}, got {strategy!r}")
        if (params is not None or host) and strategy != "copy":
            raise ValueError("snapshot_params and snapshot_host apply to the 'copy' snapshot only")
        if params is not None and host:
            raise ValueError("a host snapshot copies the whole model; snapshot_params keeps part of it live")
        self.model, self.strategy = model, strategy
        self.size = size if strategy == "copy" else 1  # distinct models acquire() hands out
        self.streams = streams
        # Weights change only at the next optimizer step, but gradients at the next backward.
        self._wait_now = grads or not defer_wait
        self._free: list[nn.Module] = []
        self._lock = threading.Lock()
        self._live_tensors: list[torch.Tensor] = []
        self._shadow_tensors: dict[int, list[torch.Tensor]] = {}
        self._live_params: list[nn.Parameter] = []
        self._shadow_grads: dict[int, list[list]] = {}  # [shadow's parameter, its gradient buffer]
        self._ready: dict[int, torch.cuda.Event] = {}
        self.host = host
        self.dropped_hooks: list[str] = []  # "module: kind" of each hook the shadows run without
        self._params = [(p, p.device, p.dtype) for p in _parameters(model)]
        changing = train_mode_effects(model) if strategy == "live" else []
        if changing:
            log.warning(
                "snapshot='live': probes run the live model in its own mode, and in train mode %s "
                "update running statistics or draw from the global random generator, which changes "
                "training; snapshot='copy' (the default) evaluates copies in eval mode",
                ", ".join(changing),
            )
        if strategy == "copy":
            named = _named_state_tensors(model)
            chosen = _trainable(model) if params == TRAINABLE else _select(named, params)
            if params is None:
                _hint_frozen(model, size)
            self._live_tensors = _unique(t for n, t in named if n in chosen)
            copied = {id(t) for t in self._live_tensors}
            if grads:  # (a frozen one's buffers are made when it first has a gradient: unfrozen)
                self._live_params = [p for p in model.parameters() if id(p) in copied]
            shared = {id(t): t for _, t in named if id(t) not in copied}
            if not hooks:
                self.dropped_hooks = observer_hooks(model)
            self._make_copies(model, shared, hooks, whole=not shared)

    def _make_copies(
        self, model: nn.Module, shared: dict[int, torch.Tensor], hooks: bool, whole: bool
    ) -> None:
        """The shadows, as many as fit (``plan_copies``): where they would take more than half of
        the free memory (training still allocates: optimizer state at its first step,
        activations), one copy, else from a CUDA device the host (a whole copy), else no copy
        at all (``sync``), each with one warning; a copy that runs out of device memory as it is
        made goes the same way."""
        per_copy = sum(t.numel() * t.element_size() for t in self._live_tensors)
        per_copy += sum(p.numel() * p.element_size() for p in self._live_params if p.requires_grad)
        device = self._params[0][1] if self._params else torch.device("cpu")
        size, host, why = place_copies(per_copy, self.size, device, self.host, whole)
        if why:
            log.warning(
                "snapshot: %s%s", why, "" if size else ": probes run between steps instead (snapshot='sync')"
            )
        while size > 0:
            try:
                for _ in range(size):
                    self._add_shadow(model, shared, hooks, host)
                break
            except torch.cuda.OutOfMemoryError as err:
                self._free, self._shadow_tensors, self._shadow_grads = [], {}, {}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                failed = str(err).splitlines()[0]
                if host or not whole:
                    log.warning(
                        "snapshot: its copies do not fit in memory (%s); probes run between steps "
                        "instead (snapshot='sync')",
                        failed,
                    )
                    size = 0
                    break
                size, _, why = plan_copies(per_copy, self.size, host_free_memory(), whole, on_host=True)
                log.warning(
                    "snapshot: its copies do not fit in %s's memory (%s); %s",
                    device,
                    failed,
                    "they are kept in host memory instead (snapshot_host=True) and probes evaluate "
                    "them on the CPU" + (f" ({why})" if why else "")
                    if size
                    else f"{why}: probes run between steps instead (snapshot='sync')",
                )
                host = True
        if size == 0:  # not even one copy fits: probes read the model itself, between steps
            self.strategy, host = "sync", False
        self.size, self.host = (size if self.strategy == "copy" else 1), host
        if self.strategy == "sync":
            self._live_tensors, self._live_params = [], []

    def _add_shadow(self, model: nn.Module, shared: dict[int, torch.Tensor], hooks: bool, host: bool) -> None:
        place = _host_place if host else None  # a host copy never passes through the device
        shadow, twin = shadow_copy(model, shared, hooks=hooks, place=place)
        shadow.eval()
        own = [twin[id(t)] for t in self._live_tensors]
        for t in own:
            t.requires_grad_(False)
        if host:
            _to_host(own)  # (a Keras model's clone: made on its device)
        self._shadow_tensors[id(shadow)] = own
        if self._live_params:
            self._shadow_grads[id(shadow)] = [
                [twin[id(p)], _grad_buffer(p, host) if p.requires_grad else None] for p in self._live_params
            ]
        stand_for(shadow, model)  # (its copies require no gradients)
        self._free.append(shadow)

    def model_change(self) -> str | None:
        """What has changed in the live model since the snapshot was set up (None: nothing
        that matters). For ``copy``: a parameter replaced, added or removed (the shadows would
        go on copying the old ones) or moved to another device or dtype. For ``sync`` and
        ``live``, which read the live model, only a parameter on a device or in a dtype the
        probes were not set up for (they placed their inputs for the old ones). Buffers are
        not compared: a module may replace its own (a cache) in its forward, and the shadow's
        forward does the same. A walk over the parameters, for the probe's thread."""
        now = list(_parameters(self.model))
        if self.strategy == "copy":
            if len(now) != len(self._params):
                return f"its parameters went from {len(self._params)} to {len(now)}"
            for (old, device, dtype), p in zip(self._params, now, strict=True):
                if p is not old:
                    return f"its parameter {self._name(p)!r} was replaced by another"
                if (p.device, p.dtype) != (device, dtype):
                    was, now_at = _placed(device, dtype), _placed(p.device, p.dtype)
                    return f"its parameter {self._name(p)!r} went from {was} to {now_at}"
            return None
        placed = {(device, dtype) for _, device, dtype in self._params}
        moved = next((p for p in now if (p.device, p.dtype) not in placed), None)
        if moved is None:
            return None
        was = " or ".join(sorted(_placed(*pair) for pair in placed))
        return f"its parameter {self._name(moved)!r} is {_placed(moved.device, moved.dtype)}, not {was}"

    def _name(self, param: torch.Tensor) -> str:
        return next((n for n, q in self.model.named_parameters(remove_duplicate=False) if q is param), "?")

    def describe(self) -> dict:
        """Strategy, what is copied, where, and the memory held (for the run's metadata)."""
        copied = sum(t.numel() for t in self._live_tensors)
        total = sum(t.numel() for t in _unique(t for _, t in _named_state_tensors(self.model)))
        return {
            "strategy": self.strategy,
            "host": self.host,
            "copied_elements": copied if self.strategy == "copy" else 0,
            "model_elements": total,
            "bytes": self.nbytes,
            "dropped_hooks": list(self.dropped_hooks),
        }

    @property
    def inline(self) -> bool:
        """Whether probes run in the training thread (``sync``)."""
        return self.strategy == "sync"

    @property
    def nbytes(self) -> int:
        """Memory held by the shadow copies (and their gradient buffers)."""
        weights = sum(t.numel() * t.element_size() for ts in self._shadow_tensors.values() for t in ts)
        grads = sum(
            g.numel() * g.element_size() for gs in self._shadow_grads.values() for _, g in gs if g is not None
        )
        return weights + grads

    def acquire(self, fill: bool = True) -> nn.Module | None:
        """A model with this step's weights, or None if every shadow is still in use.
        ``fill=False``: a free shadow as it is (to warm probes up on)."""
        if self.strategy != "copy":
            if fill and self.strategy == "live" and self.streams is not None:
                self.streams.start_snapshot()  # the probe stream still waits for this step's work
            return self.model
        with self._lock:
            if not self._free:
                return None
            shadow = self._free.pop()
        if fill:
            fill_shadow(shadow, self._copy_into, self.streams, self.host, self._wait_now, self._ready)
        return shadow

    def wait_ready(self, shadow: nn.Module) -> None:
        """On the probe's thread: wait for a host snapshot's non-blocking copy (an event wait)."""
        ready = self._ready.pop(id(shadow), None)
        if ready is not None:
            ready.synchronize()

    def _copy_into(self, shadow: nn.Module) -> None:
        with torch.no_grad():
            # Non-blocking into a pinned host copy: the probe waits for its event (wait_ready).
            torch._foreach_copy_(self._shadow_tensors[id(shadow)], self._live_tensors, non_blocking=self.host)
            if self._live_params:
                self._copy_grads(self._shadow_grads[id(shadow)])

    def _copy_grads(self, pairs: list[list]) -> None:
        """Each parameter's gradient into its buffer, made at its first gradient for one frozen
        when the snapshot was set up (unfrozen since); none where the parameter has none."""
        sources, targets = [], []
        for live, pair in zip(self._live_params, pairs, strict=True):
            param, buffer = pair
            if live.grad is None:
                param.grad = None
            else:
                if buffer is None:
                    buffer = pair[1] = _grad_buffer(live, self.host)
                param.grad = buffer
                sources.append(live.grad)
                targets.append(buffer)
        if sources:
            torch._foreach_copy_(targets, sources, non_blocking=self.host)

    def release(self, shadow: nn.Module) -> None:
        """Give a shadow back once its probes are done."""
        if self.strategy == "copy":
            with self._lock:
                self._free.append(shadow)


def fill_shadow(
    shadow: nn.Module,
    fill: Callable[[nn.Module], None],
    streams: ProbeStreams | None,
    host: bool,
    wait_now: bool,
    ready: dict[int, torch.cuda.Event],
) -> None:
    """``fill(shadow)`` at the step boundary: here (CPU), or enqueued on the probe stream after
    the training stream's work so far, training waiting for it on the GPU now or before its
    next optimizer step (``wait_now``); a host shadow's event goes in ``ready``
    (``wait_ready`` on the probe's thread)."""
    if streams is None:
        fill(shadow)
        return
    streams.start_snapshot()
    with streams.probe_context():
        fill(shadow)
        if host:
            ready[id(shadow)] = event = torch.cuda.Event()
            event.record()
    streams.end_snapshot(wait_now=wait_now)


def plan_copies(
    per_copy: int,
    size: int,
    free: int | None,
    whole: bool,
    on_host: bool = False,
    host_free: int | None = None,
) -> tuple[int, bool, str | None]:
    """How to hold ``size`` copies of ``per_copy`` bytes: ``(copies, moved to the host, why)``.

    ``free``: the bytes free where they go (a CUDA device's; the host's available memory with
    ``on_host``: a model on the CPU, or ``snapshot_host``; None: no limit known). The copies may
    take half of it; past that, one copy; past that, from a CUDA device, a whole copy goes to
    the host (``host_free``, by the same rule; a part shares the rest with the model on its
    device, so it keeps one there), and where not even one fits, none (0; the snapshot then
    runs probes between steps, ``sync``). Host memory a process takes past what the host has
    is not an error it could catch: the system kills the process, training and all."""
    if free is None or size * per_copy <= free // 2:
        return size, False, None
    where = "the host's" if on_host else "the device's"
    need = f"{size} copies of {bytes_text(per_copy)} would take over half of {where} {bytes_text(free)} free"
    if per_copy <= free // 2:
        return 1, False, f"{need}; it keeps one (a frame is skipped while the one before still runs)"
    if not on_host and not whole:
        return 1, False, f"{need}, and it copies part of the model; it keeps one, which may not fit"
    if not on_host:
        copies, _, why = plan_copies(per_copy, size, host_free, whole, on_host=True)
        if copies:
            held = "they are" if copies > 1 else "one is"
            moved = f"{held} kept in host memory (snapshot_host=True), probes evaluate them on the CPU"
            return copies, True, f"{need}; {moved}" + (f" ({why})" if why else "")
        return 0, False, f"{need}, and {why}"
    return 0, False, f"{need}; not one copy fits"


def place_copies(
    per_copy: int, size: int, device: torch.device, host: bool, whole: bool
) -> tuple[int, bool, str | None]:
    """``plan_copies`` for copies of tensors on ``device`` (``host``: kept in host memory, as
    ``snapshot_host`` asks), against the memory free now: ``(copies, in host memory, why)``."""
    on_host = host or device.type != "cuda"
    free = host_free_memory() if host else device_free_memory(device)
    copies, moved, why = plan_copies(
        per_copy, size, free, whole, on_host, None if on_host else host_free_memory()
    )
    return copies, host or moved, why


def device_free_memory(device: torch.device) -> int | None:
    """Bytes free for copies of tensors on ``device``: a CUDA device's free memory, the host's
    available memory for any other (``host_free_memory``)."""
    if device.type != "cuda":
        return host_free_memory()
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def host_free_memory() -> int | None:
    """Bytes the host can still give this process without swapping: Linux's ``MemAvailable``,
    or less where the process's control group (a container's or a job's memory limit) leaves
    less room; None where neither can be read (another system)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


# Where a control group's limit, usage and reclaimable page cache are read (cgroup v2, v1).
_CGROUPS = (
    (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory.current",
        "/sys/fs/cgroup/memory.stat",
        "inactive_file",
    ),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)


def _cgroup_room() -> int | None:
    """The bytes this process's memory control group still allows (its limit, less what it
    uses, plus the page cache it could give back), or None: no limit, or none readable."""
    for limit_path, usage_path, stat_path, inactive_key in _CGROUPS:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # no limit set
            return None
        inactive = 0
        try:
            with open(stat_path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
                        break
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - usage + inactive)
    return None


def _host_place(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised host tensor like ``t``, pinned when CUDA is present."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())


def shadow_copy(
    model: nn.Module,
    shared: dict[int, torch.Tensor],
    hooks: bool = False,
    place: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of ``model`` that shares the tensors in ``shared`` (by id) and owns the rest, and
    for each state tensor of ``model`` its counterpart in the copy (by the original's id).
    Unless ``hooks``, the copy keeps only the hooks that compute its forward (``observer_hooks``
    names the others); they are left out before copying, so nothing they hold is copied.

    ``place``: where each state tensor the copy owns is made, uninitialised, instead of a copy
    on the model's device (a host snapshot; the pool fills it before every frame).

    Counterparts come from ``copy.deepcopy``'s memo, so they hold whatever the copy renames
    or reorders. A Keras model (Keras 3 on its torch backend) copies through its saving format
    instead; it is cloned layer by layer and its variables are paired in order
    (probescope.integrations.keras)."""
    if is_keras_model(model):
        if shared:
            raise ValueError(
                "snapshot_params: a Keras model is copied whole (its variables cannot be shared)"
            )
        from probescope.integrations.keras import clone_for_probes

        return clone_for_probes(model)
    memo: dict[int, object] = {**shared, **_copy_memo(model, hooks)}
    if place is not None:
        for _, t in _named_state_tensors(model):
            if id(t) in memo:
                continue
            if type(t) is nn.Parameter:
                memo[id(t)] = nn.Parameter(place(t), requires_grad=t.requires_grad)
            elif type(t) is torch.Tensor:
                memo[id(t)] = place(t)
    try:
        shadow = copy.deepcopy(model, memo)
    except Exception as err:  # an attribute that cannot be copied: a lock, a file, a connection
        raise ValueError(
            f"the 'copy' snapshot cannot copy a {type(model).__name__} ({type(err).__name__}: {err}); "
            "give the object that fails a __deepcopy__, keep it off the model, or use snapshot='sync' "
            "(probes between steps) or 'live'"
        ) from err
    named = _named_state_tensors(model)
    twin = {id(t): memo[id(t)] for _, t in named if id(t) in memo}
    missing = [n for n, t in named if id(t) not in twin]
    if missing:
        raise ValueError(
            f"copy.deepcopy of a {type(model).__name__} does not copy its tensors one by one "
            f"({missing[:3]} have no counterpart); use snapshot='sync' or 'live'"
        )
    return shadow, twin


def train_mode_effects(model: nn.Module) -> list[str]:
    """``"name (Class)"`` of each module in train mode whose forward changes something outside
    its output: batch or instance norm with running statistics, dropout."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if m.training
        and (
            (isinstance(m, _NormBase) and m.track_running_stats)
            or (isinstance(m, _DropoutNd) and m.p > 0)
            or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
        )
    ]


# A module's hooks by handle id, and the sets of those ids that change how a hook is called.
_HOOK_DICTS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}
_HOOK_ID_SETS = (
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def computes_forward(hook) -> bool:
    """Whether ``hook`` is part of what its module computes: torch's weight norm, spectral norm
    and pruning recompute a weight in a forward pre-hook. (They keep no state of their own, so
    a shadow shares them with the model.)"""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def observer_hooks(model: nn.Module) -> list[str]:
    """``"module: kind"`` for each hook of ``model`` that a shadow runs without."""
    return [
        f"{name or type(model).__name__}: {kind}"
        for name, module in model.named_modules()
        for attr, kind in _HOOK_DICTS.items()
        for hook in (getattr(module, attr, None) or {}).values()
        if not computes_forward(hook)
    ]


def _copy_memo(model: nn.Module, hooks: bool) -> dict[int, object]:
    """``copy.deepcopy`` memo entries for the shadow of ``model``: each module's copy keeps only
    the hooks that compute (all, with ``hooks``), and a tensor attribute computed from
    parameters (weight norm's ``weight``, which deepcopy refuses: it is no graph leaf) is
    copied detached; its hook computes it again at every forward."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        if hooks:
            continue
        kept: set[int] = set()
        for attr in _HOOK_DICTS:
            table: Mapping | None = getattr(module, attr, None)
            if table:
                memo[id(table)] = type(table)((k, h) for k, h in table.items() if computes_forward(h))
                kept.update(memo[id(table)])
        for attr in _HOOK_ID_SETS:
            ids: Mapping | None = getattr(module, attr, None)
            if ids:
                memo[id(ids)] = type(ids)((k, v) for k, v in ids.items() if k in kept)
    return memo


def _parameters(model: nn.Module):
    """Every parameter of ``model``, module by module, a shared one each time it is held."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                yield p


def _placed(device: torch.device, dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} on {device}"


def _unique(tensors) -> list[torch.Tensor]:
    """``tensors`` without repeats (a tied weight is in a state_dict under each of its names)."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _named_state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` by name (its state_dict's names), under each
    name it has; the buffers a state_dict leaves out (``persistent=False``) too: training may
    change them (a temperature, a mask), and a shadow must follow."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


# Shadows (whose own parameters require no gradients) by the model each stands for: the live
# model of a copy snapshot, the sharded model of a gathered one (see probescope.gather).
_STANDS_FOR: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def stand_for(shadow: nn.Module, model: nn.Module) -> None:
    """Say that ``shadow`` holds the tensors of ``model`` under the same names: which of its
    parameters train is what ``model``'s say, now (``trained_parameters``)."""
    _STANDS_FOR[shadow] = model


def trained_parameters(model: nn.Module) -> set[str]:
    """The names (every alias) of the parameters of ``model`` that train now: those that
    require gradients, or, for a shadow (``stand_for``), those that do in the model it stands
    for (training may freeze and unfreeze them as it goes)."""
    model = _STANDS_FOR.get(model, model)
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def _trainable(model: nn.Module) -> set[str]:
    """The names of the parameters that require gradients and of every buffer."""
    chosen = trained_parameters(model)
    if not chosen:
        raise ValueError("snapshot_params='trainable': no parameter of the model requires gradients")
    return chosen | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _hint_frozen(model: nn.Module, copies: int) -> None:
    """One warning when most of what a whole-model copy holds are frozen parameters."""
    params = _unique(model.parameters())
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in params)
    if frozen >= FROZEN_HINT_BYTES and 2 * frozen > total:
        log.warning(
            "snapshot: %s of the model's %s of parameters do not train (requires_grad=False) "
            "and are copied into each of the snapshot's %d copies at every frame; "
            "snapshot_params='trainable' copies the trainable ones and the buffers and shares "
            "the frozen ones",
            bytes_text(frozen),
            bytes_text(total),
            copies,
        )


def _select(named: list[tuple[str, torch.Tensor]], patterns: Sequence[str] | None) -> set[str]:
    """The parameter and buffer names to copy: all, or those matching any of ``patterns``."""
    names = [n for n, _ in named]
    if patterns is None:
        return set(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        raise ValueError(
            f"snapshot_params {list(patterns)} match no tensor of the model (names: {names[:6]} ...)"
        )
    return chosen


def _grad_buffer(param: torch.Tensor, host: bool) -> torch.Tensor:
    if not host:
        return torch.empty_like(param)
    return torch.empty(param.shape, dtype=param.dtype, pin_memory=torch.cuda.is_available())


def _to_host(tensors: list[torch.Tensor]) -> None:
    """Move a shadow's own tensors to host memory, pinned when CUDA is present (those there
    already stay as they are)."""
    pin = torch.cuda.is_available()
    for t in tensors:
        if t.device.type == "cpu" and (t.is_pinned() or not pin):
            continue
        t.data = t.data.to("cpu").pin_memory() if pin else t.data.to("cpu")
