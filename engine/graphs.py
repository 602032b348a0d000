"""CUDA graphs for the repeated forward of a probe's fixed batch.

A probe that runs the model on the same inputs every frame (PredictionProbe, CurveProbe,
a valid set) captures that forward once per shadow model and chunk, and replays it: the
snapshot copy updates the shadow's weights in place, so a replay computes with this step's
weights at the cost of one launch. Capture uses ``thread_local`` error mode, so the training
thread's own CUDA calls can never fail because of it. Anything that cannot be captured (a CPU
model, data-dependent control flow, host syncs inside the forward) turns graphs off for the
probe with one logged reason, and the probe runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger("probescope")


class ForwardGraphs:
    """Captured forwards of one probe, by (model, chunk)."""

    def __init__(self, owner: str):
        self.owner = owner
        self.reason: str | None = None  # why graphs are off, once they are
        self._entries: dict[tuple[int, int], tuple] = {}

    @property
    def active(self) -> bool:
        return self.reason is None

    def forward(self, model: nn.Module, chunk: int, make_input: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``model(make_input())``, replayed from a graph when one could be captured."""
        if self.reason is not None:
            return model(make_input())
        key = (id(model), chunk)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(model, make_input())
            if entry is None:
                return model(make_input())
            self._entries[key] = entry
        graph, _, out = entry
        graph.replay()
        return out

    def _capture(self, model: nn.Module, x: torch.Tensor):
        if x.device.type != "cuda":
            self._off("the model is not on a CUDA device")
            return None
        try:
            current = torch.cuda.current_stream(x.device)
            side = torch.cuda.Stream(x.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation, allocator pools
                    model(x)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = model(x)
            return graph, x, out  # x: the static input the graph reads, kept alive
        except Exception as err:
            self._off(f"{type(err).__name__}: {err}")
            return None

    def _off(self, reason: str) -> None:
        self.reason = reason
        self._entries.clear()
        log.warning("%s: CUDA graphs are off (%s); its forward runs eagerly", self.owner, reason)
