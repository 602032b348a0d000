"""Latent states while training runs: a fitted state model, decoded one frame at a time.

``latent_states`` fits a Gaussian HMM to finished runs. ``StateModel`` keeps what decoding
needs (the metrics it was fitted on, their z-scoring, the start and transition
probabilities, each state's mean and variance) and reads and writes it as JSON (the
``states.json`` that ``write_report`` writes). ``StateTracker`` filters a new run as it
trains: after each observation, P(state now | everything seen so far), by the forward
recursion of the HMM, in numpy; no hmmlearn needed while training. A metric missing from an
observation (NaN) carries its last value forward, as the offline fit does; one never seen
yet is left out of the likelihood (each state's Gaussian marginalised over it). Diagonal and
spherical covariances keep one variance per state and metric; full and tied ones keep each
state's covariance matrix.

Give one to a StatsProbe (``StatsProbe(..., states="analysis/states.json")``) and every frame
carries the current state; a change of state is logged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "probescope-states"


@dataclass(frozen=True)
class StateModel:
    """A Gaussian HMM over z-scored metrics: diagonal covariances (``variances``), or full
    ones (``covariances``, with their diagonals in ``variances``)."""

    metrics: list[str]
    startprob: np.ndarray  # (K,)
    transmat: np.ndarray  # (K, K)
    means: np.ndarray  # (K, M), z-scores
    variances: np.ndarray  # (K, M), of the z-scores
    center: np.ndarray  # (M,) the metrics' means ...
    scale: np.ndarray  # (M,) ... and standard deviations, over the runs it was fitted on
    covariances: np.ndarray | None = None  # (K, M, M) of the z-scores; None: diagonal

    def __post_init__(self):
        k, m = self.means.shape
        shapes = {
            "startprob": (self.startprob.shape, (k,)),
            "transmat": (self.transmat.shape, (k, k)),
            "variances": (self.variances.shape, (k, m)),
            "center": (self.center.shape, (m,)),
            "scale": (self.scale.shape, (m,)),
        }
        if self.covariances is not None:
            shapes["covariances"] = (self.covariances.shape, (k, m, m))
        bad = {name: got for name, (got, want) in shapes.items() if got != want}
        if bad or len(self.metrics) != m:
            raise ValueError(f"StateModel: inconsistent shapes for {k} states and {m} metrics: {bad}")
        if not (np.all(self.variances > 0) and np.all(self.scale > 0)):
            raise ValueError("StateModel: variances and scales must be positive")
        if self.covariances is not None:
            try:
                np.linalg.cholesky(self.covariances)
            except np.linalg.LinAlgError:
                raise ValueError("StateModel: covariances must be symmetric positive definite") from None
            if not np.allclose(np.diagonal(self.covariances, axis1=1, axis2=2), self.variances):
                raise ValueError("StateModel: variances must be the covariances' diagonals")

    @property
    def n_states(self) -> int:
        return int(self.means.shape[0])

    @classmethod
    def from_states(cls, result) -> StateModel:
        """The model behind a ``LatentStates`` (what ``latent_states`` returned)."""
        if result.model is None or result.zscore is None:
            raise ValueError("StateModel: this LatentStates carries no fitted model")
        from probescope.analysis.states import full_covariances

        full = full_covariances(result.model)
        diagonal = result.model.covariance_type in ("diag", "spherical")
        center, scale = result.zscore
        return cls(
            list(result.metrics),
            np.asarray(result.startprob, np.float64),
            np.asarray(result.transmat, np.float64),
            np.asarray(result.means, np.float64),
            np.diagonal(full, axis1=1, axis2=2).copy(),
            np.asarray(center, np.float64),
            np.asarray(scale, np.float64),
            None if diagonal else full,
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "metrics": self.metrics,
            "startprob": self.startprob.tolist(),
            "transmat": self.transmat.tolist(),
            "means_z": self.means.tolist(),
            "variances_z": self.variances.tolist(),
            "zscore": {"mean": self.center.tolist(), "std": self.scale.tolist()},
            **({"covariances_z": self.covariances.tolist()} if self.covariances is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> StateModel:
        missing = [
            k
            for k in ("metrics", "startprob", "transmat", "means_z", "variances_z", "zscore")
            if k not in data
        ]
        if missing:
            raise ValueError(
                f"StateModel: the states file lacks {missing} (written by an older probescope? "
                "run the analysis again)"
            )
        array = lambda key: np.asarray(data[key], np.float64)  # noqa: E731
        return cls(
            [str(m) for m in data["metrics"]],
            array("startprob"),
            array("transmat"),
            array("means_z"),
            array("variances_z"),
            np.asarray(data["zscore"]["mean"], np.float64),
            np.asarray(data["zscore"]["std"], np.float64),
            array("covariances_z") if "covariances_z" in data else None,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> StateModel:
        """Read ``states.json`` (or the analysis directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "states.json"
        if not path.exists():
            raise FileNotFoundError(f"StateModel: no states file at {path} (write_report writes states.json)")
        return cls.from_json(json.loads(path.read_text()))

    def tracker(self) -> StateTracker:
        return StateTracker(self)


def odds_gradient(z: np.ndarray, means: np.ndarray, precisions: np.ndarray, source: int, target: int):
    """d/dz [log P(target | ..., z) - log P(source | ..., z)] for Gaussian emissions: the
    forward terms before z cancel out of the gradient, which is the difference of the two
    states' emission gradients, P_source (z - mu_source) - P_target (z - mu_target).
    ``precisions``: (K, M) for diagonal covariances (inverse variances), or (K, M, M)."""
    d_source, d_target = z - means[source], z - means[target]
    if precisions.ndim == 2:
        return precisions[source] * d_source - precisions[target] * d_target
    return precisions[source] @ d_source - precisions[target] @ d_target


def top_drivers(metrics, gradient: np.ndarray, count: int) -> list[tuple[str, float]]:
    """The ``count`` (metric, gradient) pairs with the largest gradient magnitude."""
    ranked = np.argsort(-np.abs(gradient), kind="stable")[:count]
    return [(metrics[j], float(gradient[j])) for j in ranked]


class StateTracker:
    """Forward filtering of one run: ``update(values)`` for each new observation (the
    metrics in ``model.metrics`` order, in their own units) returns P(state | all so far)."""

    def __init__(self, model: StateModel):
        self.model = model
        self._log_alpha: np.ndarray | None = None  # normalised log-posterior after the last step
        self.steps = 0  # observations seen so far
        self._last = np.full(len(model.metrics), np.nan)  # carried forward for gaps
        self._log_trans = np.log(np.where(model.transmat > 0, model.transmat, 1e-300))
        self._log_norm = -0.5 * np.log(2.0 * np.pi * model.variances)  # (K, M)
        self._gaussians: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # full: per set of seen metrics
        self._z = np.full(len(model.metrics), np.nan)  # the last observation's z-scores (NaN: not seen)

    def update(self, values) -> np.ndarray:
        x = np.asarray(values, np.float64).reshape(-1)
        if x.shape != self._last.shape:
            raise ValueError(f"StateTracker: expected {self._last.shape[0]} metrics, got {x.shape[0]}")
        x = np.where(np.isfinite(x), x, self._last)  # gaps carry the last value forward
        self._last = x
        seen = np.isfinite(x)
        z = (x - self.model.center) / self.model.scale
        d = np.where(seen, z, 0.0)[None, :] - self.model.means
        if self.model.covariances is None:
            terms = self._log_norm - 0.5 * d * d / self.model.variances
            log_b = np.where(seen[None, :], terms, 0.0).sum(axis=1)  # a metric never seen is left out
        else:
            precision, log_norm = self._marginal(seen)
            d = d[:, seen]
            log_b = log_norm - 0.5 * np.einsum("km,kmn,kn->k", d, precision, d)
        if self._log_alpha is None:
            prior = np.log(np.where(self.model.startprob > 0, self.model.startprob, 1e-300))
        else:
            prior = _logsumexp(self._log_alpha[:, None] + self._log_trans, axis=0)
        log_alpha = prior + log_b
        self._log_alpha = log_alpha - _logsumexp(log_alpha, axis=0)
        self.steps += 1
        self._z = np.where(seen, z, np.nan)
        return np.exp(self._log_alpha)

    def drivers(self, source: int, target: int, count: int = 3) -> list[tuple[str, float]]:
        """What pushed the filter from ``source`` towards ``target`` at the last observation:
        the ``count`` metrics with the largest gradient of the log odds of ``target`` over
        ``source`` (per z-score; see ``latent_states``' transitions), metrics not seen yet
        left out."""
        if self.steps == 0:
            return []
        seen = np.isfinite(self._z)
        z, means = self._z[seen], self.model.means[:, seen]
        if self.model.covariances is None:
            precisions = 1.0 / self.model.variances[:, seen]
        else:
            precisions = self._marginal(seen)[0]
        names = [m for m, ok in zip(self.model.metrics, seen, strict=True) if ok]
        return top_drivers(names, odds_gradient(z, means, precisions, source, target), count)

    def _marginal(self, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each state's Gaussian over the metrics seen so far: precision matrices and the log
        normalisers (cached: the set of seen metrics only grows, so there are few)."""
        key = np.packbits(seen).tobytes()
        if key not in self._gaussians:
            cov = self.model.covariances[:, seen][:, :, seen]
            _, logdet = np.linalg.slogdet(2.0 * np.pi * cov)
            self._gaussians[key] = (np.linalg.inv(cov), -0.5 * logdet)
        return self._gaussians[key]


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))
