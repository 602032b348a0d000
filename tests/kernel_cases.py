"""What the kernel tests share: which implementations run here, on which device, and poison."""

from __future__ import annotations

import pytest
import torch

from probescope.kernels.backend import numba_installed, triton_installed, triton_interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _impl_param(name: str):
    reason = None
    if name == "triton" and not triton_installed():
        reason = "triton is not installed"
    elif name == "triton" and DEVICE.type != "cuda" and not triton_interpreting():
        reason = "no GPU and TRITON_INTERPRET is not set"
    elif name == "numba" and not numba_installed():
        reason = "numba is not installed"
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


# Each implementation runs on the device it is for: Triton on CUDA (or interpreted on the CPU),
# Numba on the CPU, torch on whichever device the suite runs on.
IMPLS = [_impl_param("torch"), _impl_param("numba"), _impl_param("triton")]


def device_for(impl: str) -> torch.device:
    return torch.device("cpu") if impl == "numba" else DEVICE


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like during the test comes back full of NaN (floats) or of
    -1 bytes (integers), so an element a kernel forgot to write can never pass as correct."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel():
            t.fill_(-1 if t.dtype.is_signed else 255)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
