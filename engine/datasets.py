"""Built-in generated data sets for the demo and the tests (nothing is downloaded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DATASETS = ("blobs7", "spirals", "moons", "wave", "peaks")
REGRESSION = ("wave", "peaks")


@dataclass(frozen=True)
class Dataset:
    """Train and valid splits of a generated task."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    task: str  # "classification" or "regression"
    num_classes: int = 0

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.task == "classification" else 1


def blobs7(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seven Gaussian blobs: one at the centre, six on a circle of radius 4 (std 0.75)."""
    angles = torch.arange(6, dtype=torch.float32) * (2 * math.pi / 6)
    centres = torch.cat([torch.zeros(1, 2), 4.0 * torch.stack([angles.cos(), angles.sin()], 1)])
    y = torch.arange(n) % 7
    x = centres[y] + 0.75 * torch.randn(n, 2, generator=generator)
    return x, y


def moons(n: int, generator: torch.Generator, noise: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles."""
    y = torch.arange(n) % 2
    t = torch.rand(n, generator=generator) * math.pi
    x = torch.stack([t.cos(), t.sin()], 1)
    x[y == 1] = torch.stack([1.0 - t[y == 1].cos(), 0.5 - t[y == 1].sin()], 1)
    return x + noise * torch.randn(n, 2, generator=generator), y


def spirals(n: int, generator: torch.Generator, noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals of one and a half turns."""
    y = torch.arange(n) % 2
    r = torch.rand(n, generator=generator).sqrt()
    theta = r * 3 * math.pi + y * math.pi
    x = torch.stack([r * theta.cos(), r * theta.sin()], 1)
    return x + noise * torch.randn(n, 2, generator=generator), y


def wave(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D heteroscedastic regression: a damped wave whose noise grows with |x|."""
    x = torch.rand(n, 1, generator=generator) * 6.0 - 3.0
    clean = torch.sin(1.8 * x) + 0.35 * x
    noise_scale = 0.05 + 0.12 * x.abs()
    return x, (clean + noise_scale * torch.randn(n, 1, generator=generator))[:, 0]


def peaks_surface(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``peaks`` at the points ``x`` (N, 2), scaled by 1/4: two peaks, a pit and a
    saddle over [-3, 3]², values about -1.6 to 2."""
    a, b = x[:, 0], x[:, 1]
    surface = (
        3 * (1 - a) ** 2 * torch.exp(-(a**2) - (b + 1) ** 2)
        - 10 * (a / 5 - a**3 - b**5) * torch.exp(-(a**2) - b**2)
        - torch.exp(-((a + 1) ** 2) - b**2) / 3
    )
    return surface / 4


def peaks(n: int, generator: torch.Generator, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D regression: ``peaks_surface`` at points uniform over [-3, 3]², plus Gaussian noise."""
    x = torch.rand(n, 2, generator=generator) * 6.0 - 3.0
    return x, peaks_surface(x) + noise * torch.randn(n, generator=generator)


_MAKERS = {
    "blobs7": (blobs7, 3500),
    "spirals": (spirals, 3000),
    "moons": (moons, 2000),
    "wave": (wave, 2500),
    "peaks": (peaks, 4000),
}


def make_dataset(name: str, seed: int = 0, n: int | None = None) -> Dataset:
    """Generate data set ``name`` (one of DATASETS), 80 % train and 20 % valid."""
    if name not in _MAKERS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    make, default_n = _MAKERS[name]
    generator = torch.Generator().manual_seed(seed)
    x, y = make(n or default_n, generator)
    order = torch.randperm(x.shape[0], generator=generator)
    x, y = x[order], y[order]
    cut = int(0.8 * x.shape[0])
    task = "regression" if name in REGRESSION else "classification"
    classes = int(y.max()) + 1 if task == "classification" else 0
    return Dataset(name, x[:cut], y[:cut], x[cut:], y[cut:], task, classes)
