"""The analysis suite: latent states of 8 runs x 5,000 steps x 40 metrics (the issue's size).

The series are sampled from a known 4-state Gaussian HMM, so the row also says whether the
states were recovered (agreement up to relabelling). Ours: candidates fitted in parallel
processes (one per core); the naive way: the same fits one after another.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def synthetic_runs(runs: int, steps: int, metrics: int, states: int = 4, seed: int = 0):
    from hmmlearn.hmm import GaussianHMM

    from probescope.analysis import RunSeries

    rng = np.random.default_rng(seed)
    true = GaussianHMM(states, covariance_type="diag", random_state=seed)
    true.startprob_ = np.eye(states)[0]
    stay = 1.0 - 4.0 / steps * states  # a few visits per state per run
    true.transmat_ = stay * np.eye(states) + (1 - stay) * np.roll(np.eye(states), 1, axis=1)
    true.means_ = rng.normal(size=(states, metrics))
    true.covars_ = np.full((states, metrics), 0.6)
    out, truth = [], []
    for r in range(runs):
        x, s = true.sample(steps, random_state=seed + r)
        out.append(RunSeries(f"run{r}", np.arange(steps), x, [f"m{j}" for j in range(metrics)]))
        truth.append(s)
    return out, truth


def agreement(found, truth) -> float:
    from scipy.optimize import linear_sum_assignment

    f, t = np.concatenate(found), np.concatenate(truth)
    counts = np.zeros((f.max() + 1, t.max() + 1))
    np.add.at(counts, (f, t), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(t))


def run(device: torch.device, quick: bool, peaks: dict):
    from probescope.analysis import latent_states

    runs, steps, metrics = (4, 2000, 20) if quick else (8, 5000, 40)
    series, truth = synthetic_runs(runs, steps, metrics)
    row = {"op": "latent_states", "case": f"{runs} runs x {steps} steps x {metrics} metrics", "results": {}}
    for provider, jobs in (("parallel", None), ("one process", 1)):
        t0 = time.perf_counter()
        result = latent_states(series, n_jobs=jobs)
        seconds = time.perf_counter() - t0
        row["results"][provider] = {
            "median_s": seconds,
            "repeats": 1,
            "rate": f"{runs * steps / seconds / 1e3:.1f} k steps/s, {result.n_states} states, "
            f"agreement {agreement(result.states, truth):.1%}",
        }
    row["ours"] = "parallel"
    yield row


def count(device: torch.device, quick: bool) -> int:
    return 1
