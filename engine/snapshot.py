"""Consistent copies of the weights of one step, for probes to evaluate off the training path.

Strategies:
- ``copy`` (default): the parameters and buffers are copied, at the step boundary, into
  preallocated shadow models (eval mode, no grad). Probes never see a half-updated model.
- ``sync``: no copy; the probe runs inline in the training thread between steps (for tiny
  models, where a copy costs more than the probe).
- ``live``: no copy; the worker reads the live module while training goes on. Racy: a frame
  may mix weights of neighbouring steps. The module runs in whatever mode it is in.

With ``grads=True`` (a probe reads gradients), a ``copy`` snapshot also copies each
parameter's ``.grad`` into a preallocated buffer of the shadow; a parameter with no gradient
at the step boundary has none in the shadow either.

On CUDA (``streams`` given) the copy runs on the probe stream, ordered against training by
events only (see probescope.streams): the training thread enqueues it and goes on.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from probescope.streams import ProbeStreams

STRATEGIES = ("copy", "sync", "live")


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
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"snapshot must be one of {STRATEGIES}, got {strategy!r}")
        self.model, self.strategy = model, strategy
        self.streams = streams
        # Weights change only at the next optimizer step, but gradients at the next backward.
        self._wait_now = grads or not defer_wait
        self._free: list[nn.Module] = []
        self._lock = threading.Lock()
        self._live_tensors: list[torch.Tensor] = []
        self._shadow_tensors: dict[int, list[torch.Tensor]] = {}
        self._live_params: list[nn.Parameter] = []
        self._shadow_grads: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        if strategy == "copy":
            self._live_tensors = _state_tensors(model)
            if grads:
                self._live_params = [p for p in model.parameters() if p.requires_grad]
            for _ in range(size):
                shadow = copy.deepcopy(model).eval().requires_grad_(False)
                self._shadow_tensors[id(shadow)] = _state_tensors(shadow)
                if grads:
                    by_id = {id(p): q for p, q in zip(model.parameters(), shadow.parameters(), strict=True)}
                    self._shadow_grads[id(shadow)] = [
                        (by_id[id(p)], torch.empty_like(p)) for p in self._live_params
                    ]
                self._free.append(shadow)

    @property
    def inline(self) -> bool:
        """Whether probes run in the training thread (``sync``)."""
        return self.strategy == "sync"

    @property
    def nbytes(self) -> int:
        """Memory held by the shadow copies (and their gradient buffers)."""
        weights = sum(t.numel() * t.element_size() for ts in self._shadow_tensors.values() for t in ts)
        grads = sum(g.numel() * g.element_size() for gs in self._shadow_grads.values() for _, g in gs)
        return weights + grads

    def acquire(self) -> nn.Module | None:
        """A model with this step's weights, or None if every shadow is still in use."""
        if self.strategy != "copy":
            return self.model
        with self._lock:
            if not self._free:
                return None
            shadow = self._free.pop()
        if self.streams is None:
            self._copy_into(shadow)
            return shadow
        self.streams.start_snapshot()
        with self.streams.probe_context():
            self._copy_into(shadow)
        self.streams.end_snapshot(wait_now=self._wait_now)
        return shadow

    def _copy_into(self, shadow: nn.Module) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._shadow_tensors[id(shadow)], self._live_tensors)
            if self._live_params:
                self._copy_grads(self._shadow_grads[id(shadow)])

    def _copy_grads(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        sources, targets = [], []
        for live, (param, buffer) in zip(self._live_params, pairs, strict=True):
            if live.grad is None:
                param.grad = None
            else:
                param.grad = buffer
                sources.append(live.grad)
                targets.append(buffer)
        if sources:
            torch._foreach_copy_(targets, sources)

    def release(self, shadow: nn.Module) -> None:
        """Give a shadow back once its probes are done."""
        if self.strategy == "copy":
            with self._lock:
                self._free.append(shadow)


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
