"""Latent states of training: a Gaussian hidden Markov model over metric time series.

After Hu et al., "Latent State Models of Training Dynamics" (TMLR 2023): metrics recorded
over training (StatsProbe's table) are z-scored across every run, a Gaussian HMM (diagonal
covariances by default; full, tied or spherical on request) is fitted jointly to all runs
(one sequence per run; hmmlearn), with several random restarts per candidate number of
states, and the number of states is chosen by BIC. Held-out log-likelihood is reported
beside it: each candidate is fitted on the training part (all runs but the held-out ones, or
each run's first 80 % when there are fewer than three) and scored on the rest, per
observation; the chosen one is then refitted on every run, starting from its best training
fit. States are numbered in order of their mean position in training, so state 0 is where
runs start.

Each change of state the runs go through (``LatentStates.transitions``) comes with the
metrics that drive it, after the paper's feature importance: the gradient, with respect to
the observation at the first step in the new state, of the forward lattice's log odds of the
new state over the old one, log P(z_t = j | x_1..t) - log P(z_t = i | x_1..t). The forward
terms up to t - 1 do not depend on x_t, so the gradient is exact and closed-form (the
difference of the two states' emission gradients) and, unlike the posterior itself, does
not vanish where the filter is already sure. Averaged over every occurrence; in z-score
units, so a positive value means a rise of that metric by one standard deviation makes the
new state more likely by that many nats.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("probescope")

COVARIANCE_TYPES = ("diag", "full", "tied", "spherical")


@dataclass
class RunSeries:
    """One run's metric series: ``values`` (steps, metrics) at ``steps``."""

    label: str
    steps: np.ndarray
    values: np.ndarray
    metrics: list[str] | None = None  # column names (default m0, m1, ...)


@dataclass
class Transition:
    """One change of state the runs go through: from ``source`` to ``target``."""

    source: int
    target: int
    count: int  # how often, over every run
    steps: dict[str, list[int]]  # per run: the first step in the new state, each time
    importance: np.ndarray  # (metrics,) mean d log-odds(target : source) / d metric, per z-score

    def drivers(self, metrics: Sequence[str], count: int = 5) -> list[tuple[str, float]]:
        """The ``count`` metrics that push hardest towards the new state, (name, gradient),
        by the gradient's magnitude (sign: which way the metric moves the odds)."""
        from probescope.analysis.online import top_drivers

        return top_drivers(metrics, self.importance, count)


@dataclass
class LatentStates:
    """What ``latent_states`` found; ``summary()`` says it in words."""

    n_states: int
    metrics: list[str]
    runs: list[str]
    steps: list[np.ndarray]
    states: list[np.ndarray]  # per run: the most likely state at each step (Viterbi)
    means: np.ndarray  # (n_states, metrics), z-scores
    means_raw: np.ndarray  # (n_states, metrics), the metrics' own units
    transmat: np.ndarray  # (n_states, n_states)
    startprob: np.ndarray
    occupancy: np.ndarray  # fraction of all steps spent in each state
    selection: list[dict]  # per candidate: n_states, bic, train and held-out log-likelihood
    distinguishing: list[list[tuple[str, float]]]  # per state: (metric, z-score) that set it apart
    dropped_metrics: list[str] = field(default_factory=list)
    model: object = None  # the fitted hmmlearn GaussianHMM (z-scored inputs, states renumbered)
    zscore: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std) per metric
    series: list[np.ndarray] = field(default_factory=list)  # per run: (steps, metrics) z-scores
    transitions: list[Transition] = field(default_factory=list)  # most frequent first

    def boundaries(self, run: int = 0) -> list[int]:
        """Steps of run ``run`` where its state changes (the first step in the new state)."""
        s = self.states[run]
        return [int(self.steps[run][i]) for i in np.flatnonzero(s[1:] != s[:-1]) + 1]

    def state_model(self):
        """What decoding a new run needs, online (probescope.analysis.online.StateModel)."""
        from probescope.analysis.online import StateModel

        return StateModel.from_states(self)

    def leave_probabilities(self) -> np.ndarray:
        """P(next state j | leaving state i): the transition matrix without its diagonal,
        rows renormalised (zero rows stay zero)."""
        off = self.transmat * (1.0 - np.eye(self.n_states))
        total = off.sum(axis=1, keepdims=True)
        return np.divide(off, total, out=np.zeros_like(off), where=total > 0)

    def summary(self) -> str:
        lines = [
            f"{self.n_states} latent states over {len(self.runs)} run(s), {len(self.metrics)} metrics "
            f"({sum(len(s) for s in self.states)} steps)",
            "  states  BIC            AIC            log-lik/obs (train)  (held-out, restarts)",
        ]
        for row in self.selection:
            mark = " *" if row["n_states"] == self.n_states else ""
            lines.append(
                f"  {row['n_states']:>6}  {row['bic']:>13.1f}  {row['aic']:>13.1f}  "
                f"{row['train_loglik']:>19.3f}  {row['heldout_loglik']:>10.3f} "
                f"({row['heldout_loglik_mean']:.3f} ± {row['heldout_loglik_std']:.3f}){mark}"
            )
        for k in range(self.n_states):
            top = ", ".join(f"{m} {z:+.2f}" for m, z in self.distinguishing[k][:3])
            lines.append(f"  state {k}: {self.occupancy[k]:5.1%} of steps; {top}")
        if self.transitions:
            lines.append("  state changes and what drives them (d log-odds / d z-score):")
        for tr in self.transitions:
            top = ", ".join(f"{m} {g:+.2f}" for m, g in tr.drivers(self.metrics, 3))
            times = "once" if tr.count == 1 else f"{tr.count} times"
            lines.append(f"  {tr.source} -> {tr.target} ({times}): {top}")
        for i, label in enumerate(self.runs):
            lines.append(f"  {label}: state changes at steps {self.boundaries(i)}")
        return "\n".join(lines)


def load_series(
    runs, metrics: Sequence[str] | None = None, probe: str | None = None
) -> tuple[list[RunSeries], list[str]]:
    """Runs (directories, ``Run`` objects, pandas DataFrames with a ``step`` column, or
    ``RunSeries``) as metric series with common columns."""
    import pandas as pd

    from probescope.run import Run, open_run

    tables: list[tuple[str, pd.DataFrame]] = []
    for i, r in enumerate(runs):
        if isinstance(r, RunSeries):
            frame = pd.DataFrame(r.values, columns=r.metrics or [f"m{j}" for j in range(r.values.shape[1])])
            frame.insert(0, "step", r.steps)
            tables.append((r.label, frame))
        elif isinstance(r, pd.DataFrame):
            if "step" not in r.columns:
                raise ValueError(f"run {i}: a DataFrame needs a 'step' column")
            tables.append((str(r.attrs.get("label", f"run{i}")), r))
        else:
            run = r if isinstance(r, Run) else open_run(r)
            tabular = [n for n, rec in run.probes.items() if rec.kind == "stats"]
            name = probe or (tabular[0] if tabular else None)
            if name is None:
                raise ValueError(f"{run.path} has no stats probe to analyse (add a StatsProbe)")
            tables.append((run.path.name, run.probe(name).table()))
    if not tables:
        raise ValueError("latent_states needs at least one run")
    reserved = {"step", "epoch", "time", "state"}  # "state": decoded online, not a metric
    common = [c for c in tables[0][1].columns if c not in reserved and all(c in t.columns for _, t in tables)]
    if metrics is not None:
        missing = [m for m in metrics if m not in common]
        if missing:
            raise ValueError(f"metrics {missing} are not in every run; available: {common[:20]} ...")
        common = list(metrics)
    if not common:
        raise ValueError("the runs share no metric")
    return [
        RunSeries(label, t["step"].to_numpy(np.int64), t[common].to_numpy(np.float64)) for label, t in tables
    ], common


def latent_states(
    runs: Iterable,
    metrics: Sequence[str] | None = None,
    n_states: int | str = "auto",
    *,
    max_states: int = 8,
    restarts: int = 3,
    n_iter: int = 100,
    probe: str | None = None,
    covariance_type: str = "diag",
    random_state: int = 0,
    n_jobs: int | None = None,
    progress: bool = False,
) -> LatentStates:
    """Fit a Gaussian HMM jointly to the metric series of ``runs`` and return the latent states.

    ``runs``: run directories, ``Run`` objects, DataFrames (a ``step`` column plus metrics) or
    ``RunSeries``; ``metrics``: the columns to use (default: every column all runs share);
    ``n_states``: a number, or ``"auto"`` to choose 1..``max_states`` by BIC. Each candidate's
    row in ``selection`` holds its BIC and AIC, the train and held-out log-likelihood per
    observation of its best restart, and the held-out mean and standard deviation over its
    ``restarts`` (how much the fit depends on the seed). ``covariance_type``: each state's
    Gaussian, hmmlearn's ``"diag"`` (the default, and the paper's), ``"full"`` (metrics that
    move together; needs many more steps than metrics), ``"tied"`` (one full covariance shared
    by the states) or ``"spherical"``. Metrics that
    are constant or not finite everywhere are dropped (listed in ``dropped_metrics``); gaps
    (NaN) are carried forward. ``n_jobs`` fits candidates in parallel processes (default: one
    per core).
    """
    from hmmlearn.hmm import GaussianHMM  # noqa: F401  (fail early with ImportError)

    series, names = load_series(list(runs), metrics, probe)
    if isinstance(n_states, str):
        if n_states != "auto":
            raise ValueError(f"n_states must be a positive integer or 'auto', got {n_states!r}")
        candidates = list(range(1, max_states + 1))
    else:
        if isinstance(n_states, bool) or not isinstance(n_states, int) or n_states < 1:
            raise ValueError(f"n_states must be a positive integer or 'auto', got {n_states!r}")
        candidates = [n_states]
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")

    _warn_diverged(series, names)
    data = [_fill_gaps(s.values) for s in series]
    stacked = np.concatenate(data)
    keep = np.isfinite(stacked).all(axis=0) & (
        np.nanstd(stacked, axis=0) > 1e-12 * (1 + np.abs(stacked).max(0))
    )
    dropped = [n for n, k in zip(names, keep, strict=True) if not k]
    if not keep.any():
        raise ValueError("every metric is constant or non-finite; nothing to analyse")
    names = [n for n, k in zip(names, keep, strict=True) if k]
    mean, std = stacked[:, keep].mean(0), stacked[:, keep].std(0)
    z = [(d[:, keep] - mean) / std for d in data]
    lengths = [len(x) for x in z]
    if min(lengths) < 2:
        raise ValueError("every run needs at least two recorded steps")

    train, held = _split(z)
    observations = sum(len(x) for x in train)
    most = max(1, observations // 2)  # two steps a state at least: fewer, each step is a state
    if n_states == "auto" and max(candidates) > most:
        candidates = [k for k in candidates if k <= most]
        log.warning(
            "latent states: %d recorded steps to fit (after the held-out split) allow at most %d "
            "state(s); record StatsProbe frames more often for more",
            observations,
            most,
        )
    jobs = [(k, random_state + r) for k in candidates for r in range(restarts)]
    fitted = _run_jobs(
        [(train, k, seed, n_iter, covariance_type) for k, seed in jobs],
        n_jobs,
        progress,
        "fitting candidates",
    )
    x_train, l_train = _xl(train)
    x_held, l_held = _xl(held)
    selection, best_fit = [], {}
    for k in candidates:
        fits = [f for (kk, _), f in zip(jobs, fitted, strict=True) if kk == k and f is not None]
        if not fits:
            continue
        scores = [m.score(x_train, l_train) for m in fits]
        best_fit[k] = best = fits[int(np.argmax(scores))]
        held_scores = np.array([m.score(x_held, l_held) / len(x_held) for m in fits]) if len(x_held) else None
        selection.append(
            {
                "n_states": k,
                "bic": float(best.bic(x_train, l_train)),
                "aic": float(best.aic(x_train, l_train)),
                "train_loglik": float(max(scores) / len(x_train)),
                "heldout_loglik": float(held_scores[int(np.argmax(scores))])
                if held_scores is not None
                else math.nan,
                "heldout_loglik_mean": float(held_scores.mean()) if held_scores is not None else math.nan,
                "heldout_loglik_std": float(held_scores.std()) if held_scores is not None else math.nan,
                "restarts": len(fits),
            }
        )
    if not selection:
        raise RuntimeError("no hidden Markov model could be fitted to these series")
    chosen = min(selection, key=lambda row: row["bic"])["n_states"]
    # The chosen candidate, refitted on every run from its best training-split fit.
    best = best_fit[chosen]
    parameters = sum(best._get_n_fit_scalars_per_param().values())
    if chosen > 1 and parameters > observations * len(names):
        log.warning(
            "latent states: %d states of %d metrics have %d parameters, more than the %d values of "
            "%d recorded steps; the states are not well determined (record more steps, or pass "
            "fewer metrics)",
            chosen,
            len(names),
            parameters,
            observations * len(names),
            observations,
        )
    model = _refit(best, z, n_iter)
    return _describe(model, series, z, names, dropped, selection, (mean, std))


def _warn_diverged(series: list[RunSeries], metrics: list[str]) -> None:
    """One warning per run whose metrics end not finite (a run that diverged: weights gone to
    NaN), from the step where they stopped being finite: the analysis carries their last finite
    values forward over that stretch, as it does over any gap."""
    for s in series:
        finite = np.isfinite(s.values)
        if not len(finite):
            continue
        ending = ~finite[-1] & finite.any(axis=0)  # finite before, not at the end
        if not ending.any():
            continue
        start = int(np.flatnonzero(finite[:, ending].any(axis=1))[-1]) + 1
        names = [metrics[j] for j in np.flatnonzero(ending)]
        log.warning(
            "latent states: run %s: %d metric(s) (%s%s) are not finite from step %d to its end (the "
            "run diverged?); their last finite values are carried forward, which may give that "
            "stretch a state of its own; leave the run out to analyse the others without it",
            s.label,
            len(names),
            ", ".join(names[:3]),
            ", ..." if len(names) > 3 else "",
            s.steps[start],
        )


def _fill_gaps(values: np.ndarray) -> np.ndarray:
    """Carry the last finite value forward (and the first one backward) per column."""
    v = values.astype(np.float64, copy=True)
    for j in range(v.shape[1]):
        col = v[:, j]
        ok = np.isfinite(col)
        if ok.all() or not ok.any():
            continue
        idx = np.where(ok, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        first = np.argmax(ok)
        idx[:first] = first
        v[:, j] = col[idx]
    return v


def _split(z: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(z) >= 3:
        n_held = max(1, len(z) // 5)
        return z[:-n_held], z[-n_held:]
    train, held = [], []
    for x in z:
        cut = max(2, round(len(x) * 0.8))
        train.append(x[:cut])
        if len(x) - cut >= 1:
            held.append(x[cut:])
    return train, held


def _xl(parts: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    if not parts:
        return np.zeros((0, 1)), []
    return np.concatenate(parts), [len(p) for p in parts]


def _fit(args):
    parts, k, seed, n_iter, covariance_type = args
    from hmmlearn.hmm import GaussianHMM

    x, lengths = _xl(parts)
    if k > len(x):
        return None
    model = GaussianHMM(k, covariance_type=covariance_type, n_iter=n_iter, tol=_tolerance(len(x)),
                        random_state=seed, min_covar=1e-3)  # fmt: skip
    return _quiet_fit(model, x, lengths, f"HMM with {k} states, seed {seed}")


def _refit(model, parts: list[np.ndarray], n_iter: int):
    """``model`` refitted on ``parts``, starting from its parameters (itself if that fails)."""
    import copy

    x, lengths = _xl(parts)
    refit = copy.deepcopy(model)
    refit.init_params = ""
    refit.n_iter, refit.tol = n_iter, _tolerance(len(x))
    return _quiet_fit(refit, x, lengths, "the refit on every run") or model


def _quiet_fit(model, x: np.ndarray, lengths: list[int], what: str):
    """Fit without hmmlearn's convergence chatter; None if it fails or degenerates (a state
    no step is in has no mean).

    A state the runs are in only at their last step (a run that blew up as it ended) is never
    left, so EM leaves its row of the transition matrix all zeros, which hmmlearn's own
    scoring then refuses: such a state is made absorbing (what the data shows of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("hmmlearn").setLevel(logging.ERROR)
        try:
            model.fit(x, lengths)
        except (ValueError, np.linalg.LinAlgError) as err:
            log.debug("%s failed: %s", what, err)
            return None
    fitted = (model.transmat_, model.means_, model._covars_)
    if not all(np.all(np.isfinite(a)) for a in fitted):  # e.g. a state no step is in
        return None
    never_left = model.transmat_.sum(axis=1) == 0
    model.transmat_[never_left] = np.eye(model.n_components)[never_left]
    return model


def _tolerance(n_observations: int) -> float:
    """EM stops when the log-likelihood gains less than 1e-4 per observation."""
    return 1e-4 * max(n_observations, 1)


def _run_jobs(jobs: list, n_jobs: int | None, progress: bool, desc: str) -> list:
    workers = min(len(jobs), n_jobs or os.cpu_count() or 1)
    if workers <= 1:
        from tqdm.auto import tqdm

        return [_fit(j) for j in tqdm(jobs, desc=desc, disable=not progress, unit="fit")]
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers, return_as="generator")(delayed(_fit)(j) for j in jobs)
    from tqdm.auto import tqdm

    return list(tqdm(results, total=len(jobs), desc=desc, disable=not progress, unit="fit"))


def _describe(model, series, z, names, dropped, selection, zscore) -> LatentStates:
    k = model.n_components
    raw_states = [model.predict(x) for x in z]
    # Number states by where they sit in training on average (fraction of the run's length).
    position = np.full(k, np.inf)
    for s in range(k):
        where = [np.flatnonzero(st == s) / max(len(st) - 1, 1) for st in raw_states]
        where = np.concatenate(where)
        if len(where):
            position[s] = where.mean()
    order = np.argsort(position, kind="stable")
    relabel = np.empty(k, np.int64)
    relabel[order] = np.arange(k)
    states = [relabel[s] for s in raw_states]
    covars = model._covars_ if model.covariance_type == "tied" else model._covars_[order]
    model.startprob_ = startprob = model.startprob_[order]
    model.transmat_ = transmat = model.transmat_[np.ix_(order, order)]
    model.means_ = means = model.means_[order]
    model.covars_ = covars
    counts = np.bincount(np.concatenate(states), minlength=k).astype(np.float64)
    occupancy = counts / counts.sum()
    distinguishing = []
    for s in range(k):
        ranked = np.argsort(-np.abs(means[s]), kind="stable")[:8]
        distinguishing.append([(names[j], float(means[s, j])) for j in ranked])
    mean, std = zscore
    transitions = _transitions(model, series, z, states)
    return LatentStates(
        n_states=k,
        metrics=names,
        runs=[s.label for s in series],
        steps=[s.steps for s in series],
        states=states,
        means=means,
        means_raw=means * std + mean,
        transmat=transmat,
        startprob=startprob,
        occupancy=occupancy,
        selection=selection,
        distinguishing=distinguishing,
        dropped_metrics=dropped,
        model=model,
        zscore=zscore,
        series=z,
        transitions=transitions,
    )


def full_covariances(model) -> np.ndarray:
    """Each state's covariance matrix, (K, M, M), for any of hmmlearn's covariance types
    (its own ``covars_`` mis-expands a spherical model whose variances are stored per metric)."""
    k, m = model.means_.shape
    c = np.asarray(model._covars_, np.float64)
    if model.covariance_type == "spherical":
        return c.reshape(k, -1)[:, :1, None] * np.eye(m)
    if model.covariance_type == "diag":
        return c[:, :, None] * np.eye(m)
    if model.covariance_type == "tied":
        return np.broadcast_to(c, (k, m, m)).copy()
    return c.copy()


def _transitions(model, series, z, states) -> list[Transition]:
    """Every change of state in the Viterbi paths, with the gradient of the forward log odds
    of the new state over the old at the first step in the new one (see the module's text)."""
    from probescope.analysis.online import odds_gradient

    precision = np.linalg.inv(full_covariances(model))
    means = np.asarray(model.means_, np.float64)
    found: dict[tuple[int, int], dict] = {}
    for run, path, x in zip(series, states, z, strict=True):
        for t in np.flatnonzero(path[1:] != path[:-1]) + 1:
            i, j = int(path[t - 1]), int(path[t])
            grad = odds_gradient(x[t], means, precision, i, j)
            entry = found.setdefault((i, j), {"steps": {}, "grads": []})
            entry["steps"].setdefault(run.label, []).append(int(run.steps[t]))
            entry["grads"].append(grad)
    out = [
        Transition(i, j, len(e["grads"]), e["steps"], np.mean(e["grads"], axis=0))
        for (i, j), e in found.items()
    ]
    return sorted(out, key=lambda tr: (-tr.count, tr.source, tr.target))
