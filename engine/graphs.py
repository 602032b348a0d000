"""CUDA graphs for the repeated work of a probe: a fixed batch's forward, or a whole frame.

A probe that runs the model on the same inputs every frame (PredictionProbe, CurveProbe,
a valid set) captures that forward once per shadow model and chunk, and replays it: the
snapshot copy updates the shadow's weights in place, so a replay computes with this step's
weights at the cost of one launch. GridProbe captures its whole frame (the fused grid kernel,
smoothing, colouring) the same way, so that a frame costs the probe thread one call from
Python instead of a dozen kernel launches: on a launch-bound training loop that host time,
not the GPU's, is what a frame takes from training.

Capture runs on a private stream in ``thread_local`` error mode, so the training thread's own
CUDA calls can never fail because of it, and without the device-wide synchronisation of
``torch.cuda.graph``. Anything that cannot be captured (a CPU model, data-dependent control
flow, host syncs) turns graphs off for the probe with one logged reason, and the probe runs
eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger("probescope")

T = TypeVar("T")
_WARM = object()  # a key whose work ran eagerly once: compiled, caches filled, ready to capture


class ForwardGraphs:
    """Captured work of one probe, by key (a shadow model and a chunk, or a frame)."""

    def __init__(self, owner: str):
        self.owner = owner
        self.reason: str | None = None  # why graphs are off, once they are
        self._entries: dict[object, object] = {}
        self._stream: torch.cuda.Stream | None = None
        self._sealed = False
        self.replays = 0

    @property
    def active(self) -> bool:
        return self.reason is None

    def seal(self) -> None:
        """Capture nothing new from now on (the Monitor seals after its warm-up, before the
        first step): work not captured by then runs eagerly. A capture while training runs
        could make the training thread's random ops fail (torch marks its CUDA generators as
        capturing, for every thread)."""
        self._sealed = True

    def forward(self, model: nn.Module, chunk: int, make_input: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``model(make_input())``, replayed from a graph when one could be captured."""
        if self.reason is not None:
            return model(make_input())
        key = (id(model), chunk)
        entry = self._entries.get(key)
        if entry is None and self._sealed:
            return model(make_input())
        if entry is None:
            x = make_input()
            if x.device.type != "cuda":
                self._off("the model is not on a CUDA device")
                return model(x)
            for _ in range(2):  # warm-up: lazy initialisation, allocator pools
                model(x)
            entry = self._capture(lambda: model(x), keep=x)  # x: the static input the graph reads
            if entry is None:
                return model(make_input())
            self._entries[key] = entry
        return self._replay(entry)

    def run(self, key: object, device: torch.device, work: Callable[[], T]) -> T:
        """``work()``, which must do the same thing to the same tensors at every call (a frame
        from one shadow model): the first call runs it eagerly (compiling kernels, filling
        caches), the second captures it, and every call from then on replays the graph and
        returns the same output tensors, rewritten."""
        if self.reason is not None:
            return work()
        entry = self._entries.get(key)
        if entry is None:
            if device.type != "cuda":
                self._off("the model is not on a CUDA device")
            elif not self._sealed:
                self._entries[key] = _WARM
            return work()
        if entry is _WARM:
            if self._sealed:
                return work()
            entry = self._capture(work)
            if entry is None:
                return work()
            self._entries[key] = entry
        return self._replay(entry)

    def _replay(self, entry):
        graph, out, _ = entry
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, work: Callable[[], T], keep: object = None):
        current = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream(current.device)
        graph = torch.cuda.CUDAGraph()
        try:
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = work()
                except Exception:
                    with contextlib.suppress(Exception):  # the work's error is the reason to give
                        graph.capture_end()
                    raise
                graph.capture_end()
            current.wait_stream(self._stream)
        except Exception as err:
            _reset_capture_state(self._stream)
            self._off(f"{type(err).__name__}: {err}")
            return None
        return graph, out, keep

    def _off(self, reason: str) -> None:
        self.reason = reason
        self._entries.clear()
        log.warning("%s: CUDA graphs are off (%s); it runs eagerly", self.owner, reason)


def _reset_capture_state(stream: torch.cuda.Stream) -> None:
    """After a failed capture: capture something trivial to the end. A capture that fails
    never reaches the end of ``capture_end``, which leaves torch's CUDA generators marked as
    capturing, and every later random op on the device would raise ("Offset increment outside
    graph capture"), the training loop's dropout included. A capture that completes resets them."""
    try:
        scratch = torch.zeros(1, device=stream.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph.capture_begin(capture_error_mode="thread_local")
            scratch.add_(1.0)
            graph.capture_end()
    except Exception as err:
        log.warning("CUDA graphs: could not reset capture state after a failed capture (%s)", err)
