"""The training map: latent states as a transition graph and as colour behind the metrics.

``write_report(result, out)`` writes

- ``training_map.png``: the state-transition graph (nodes sized by occupancy, edges by the
  probability of going there when leaving a state and labelled with the metric that drives
  that change most; networkx lays it out) beside line charts
  of the most telling metrics over training, one row per run, the background coloured by
  latent state;
- ``report.html``: the same, interactive (plotly: hover, zoom, toggle metrics), in one
  self-contained file with plotly.js inlined, so it opens offline;
- ``states.csv``: run, step and state of every recorded step; ``states.json``: the model
  (state means, transition matrix, occupancy, model selection, distinguishing metrics).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from probescope.analysis.states import LatentStates

STATE_COLOURS = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
]  # fmt: skip
EDGE_MIN = 0.02  # leave-probabilities below this are not drawn


def state_colour(k: int) -> str:
    return STATE_COLOURS[k % len(STATE_COLOURS)]


def transition_graph(result: LatentStates):
    """A networkx DiGraph: nodes are states (``occupancy``, ``stay``), edges carry ``leave``,
    the probability of moving there when leaving, and ``p``, the raw transition probability."""
    import networkx as nx

    graph = nx.DiGraph()
    leave = result.leave_probabilities()
    for k in range(result.n_states):
        graph.add_node(k, occupancy=float(result.occupancy[k]), stay=float(result.transmat[k, k]))
    for i in range(result.n_states):
        for j in range(result.n_states):
            if i != j and leave[i, j] >= EDGE_MIN:
                graph.add_edge(i, j, leave=float(leave[i, j]), p=float(result.transmat[i, j]))
    return graph


def layout(graph) -> dict[int, np.ndarray]:
    """Node positions: Kamada-Kawai on the transition graph (deterministic), a line for one or two."""
    import networkx as nx

    n = graph.number_of_nodes()
    if n <= 2:
        return {k: np.array([float(k), 0.0]) for k in graph.nodes}
    undirected = nx.Graph()
    undirected.add_nodes_from(graph.nodes)
    for i, j, d in graph.edges(data=True):
        w = max(d["leave"], undirected.get_edge_data(i, j, {"w": 0.0})["w"])
        undirected.add_edge(i, j, w=w, distance=1.0 / (0.25 + w))
    if not nx.is_connected(undirected):  # keep unconnected states on the page
        return {k: np.asarray(v) for k, v in nx.circular_layout(undirected).items()}
    return {k: np.asarray(v) for k, v in nx.kamada_kawai_layout(undirected, weight="distance").items()}


def telling_metrics(result: LatentStates, count: int = 4) -> list[int]:
    """Indices of the metrics to draw: up to two losses or metrics (``loss/...``, what a user
    reads first), then the rest by how much of their variance the states explain (the
    occupancy-weighted variance of their state means; the metrics are z-scored), so a state
    that lasts a few steps cannot promote its outliers."""
    explained = (result.occupancy[:, None] * result.means**2).sum(axis=0)
    ranked = list(np.argsort(-explained, kind="stable"))
    losses = [j for j in ranked if result.metrics[j].startswith("loss/")][:2]
    rest = [j for j in ranked if j not in losses]
    return (losses + rest)[: min(count, len(result.metrics))]


def display_range(values: np.ndarray) -> tuple[float, float]:
    """The y-range that shows the bulk of a chart: 1st to 99th percentile, padded; early
    transients that run far off it are cut rather than flattening everything else."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    pad = 0.15 * max(hi - lo, 1e-6)
    return float(lo - pad), float(hi + pad)


def segments(states: np.ndarray, steps: np.ndarray) -> list[tuple[float, float, int]]:
    """(start, end, state) runs of equal state; each spans half-way to its neighbours."""
    cuts = np.flatnonzero(states[1:] != states[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(states)]])
    mid = (steps[1:] + steps[:-1]) / 2.0 if len(steps) > 1 else np.zeros(0)
    edges = np.concatenate([[steps[0]], mid, [steps[-1]]])
    return [(float(edges[a]), float(edges[b]), int(states[a])) for a, b in zip(starts, ends, strict=True)]


# ---- static figure -------------------------------------------------------------------------
def training_map_figure(result: LatentStates, metrics: int = 4):
    """A matplotlib Figure: the transition graph and the per-run charts."""
    from matplotlib.figure import Figure

    n_runs = len(result.runs)
    fig = Figure(figsize=(13, max(4.0, 1.9 * n_runs + 0.8)), layout="constrained")
    grid = fig.add_gridspec(n_runs, 2, width_ratios=[1, 2.2])
    ax_graph = fig.add_subplot(grid[:, 0])
    _draw_graph(ax_graph, result)
    chosen = telling_metrics(result, metrics)
    for r in range(n_runs):
        ax = fig.add_subplot(grid[r, 1])
        steps = result.steps[r]
        for start, end, k in segments(result.states[r], steps):
            ax.axvspan(start, end, color=state_colour(k), alpha=0.22, lw=0)
        for j in chosen:
            ax.plot(steps, result.series[r][:, j], lw=1.1, label=result.metrics[j])
        ax.set_ylim(*display_range(result.series[r][:, chosen]))
        ax.set_ylabel(f"{result.runs[r]}\nz-score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(x=0)
        if r == 0:
            ax.legend(fontsize=7, loc="upper right", ncols=2)
            ax.set_title("metrics over training, background: latent state", fontsize=10)
        if r == n_runs - 1:
            ax.set_xlabel("step")
    return fig


def _draw_graph(ax, result: LatentStates) -> None:
    from matplotlib.patches import FancyArrowPatch

    graph = transition_graph(result)
    radius = {k: 0.05 + 0.2 * np.sqrt(result.occupancy[k]) for k in graph.nodes}
    pos = _spread(layout(graph), 2.4 * max(radius.values()))
    leader = edge_drivers(result)
    for i, j, d in graph.edges(data=True):
        direction = (pos[j] - pos[i]) / max(np.linalg.norm(pos[j] - pos[i]), 1e-9)
        start, end = pos[i] + radius[i] * direction, pos[j] - radius[j] * direction
        arrow = FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=12, lw=0.6 + 4.0 * d["leave"], color="0.35",
            connectionstyle="arc3,rad=0.15", shrinkA=0, shrinkB=0, alpha=0.8,
        )  # fmt: skip
        ax.add_patch(arrow)
        mid = (start + end) / 2 + 0.12 * np.array([-direction[1], direction[0]])
        label = f"{d['leave']:.2f}" + (f"\n{leader[(i, j)]}" if (i, j) in leader else "")
        ax.text(*mid, label, fontsize=6.5, color="0.3", ha="center", va="center", linespacing=1.1)
    for k in graph.nodes:
        ax.add_patch(_circle(pos[k], radius[k], state_colour(k)))
        ax.text(*pos[k], f"S{k}\n{result.occupancy[k]:.0%}", ha="center", va="center", fontsize=8)
    xy = np.array(list(pos.values()))
    pad = max(radius.values()) + 0.2
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].min() - pad, xy[:, 1].max() + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(
        f"{result.n_states} latent states: size = occupancy,\narrows = where a state goes next", fontsize=10
    )


def edge_drivers(result: LatentStates) -> dict[tuple[int, int], str]:
    """For each change of state the runs made, its strongest driver as a label: ``↑ metric``
    when a rising metric raises the odds of the change, ``↓ metric`` when a falling one does."""
    labels = {}
    for tr in result.transitions:
        drivers = tr.drivers(result.metrics, 1)
        if drivers and np.isfinite(drivers[0][1]) and drivers[0][1] != 0:
            name, gradient = drivers[0]
            labels[(tr.source, tr.target)] = f"{'↑' if gradient > 0 else '↓'} {name}"
    return labels


def _spread(pos: dict[int, np.ndarray], min_distance: float) -> dict[int, np.ndarray]:
    """Scale a layout up until no two nodes are closer than ``min_distance``."""
    xy = np.array(list(pos.values()))
    if len(xy) < 2:
        return pos
    gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1)[np.triu_indices(len(xy), 1)]
    scale = max(1.0, min_distance / max(gaps.min(), 1e-9))
    return {k: v * scale for k, v in pos.items()}


def _circle(center, radius, colour):
    from matplotlib.patches import Circle

    return Circle(center, radius, facecolor=colour, edgecolor="0.2", alpha=0.9, lw=0.8)


# ---- interactive report --------------------------------------------------------------------
def graph_plotly(result: LatentStates):
    """The transition graph as a plotly Figure (hover a state for its telling metrics, an
    arrow's label for the metrics that drive that change)."""
    import plotly.graph_objects as go

    graph = transition_graph(result)
    pos = layout(graph)
    seen = {(tr.source, tr.target): tr for tr in result.transitions}
    fig = go.Figure()
    for i, j, d in graph.edges(data=True):
        hover = f"S{i} → S{j}: {d['leave']:.1%} of exits (p={d['p']:.4f} per step)"
        if (i, j) in seen:
            tr = seen[(i, j)]
            drivers = "<br>".join(f"{html.escape(m)}: {g:+.2f}" for m, g in tr.drivers(result.metrics))
            hover += f"<br>seen {tr.count}× in the runs; what drives it (d log-odds / d z):<br>{drivers}"
        fig.add_annotation(
            x=pos[j][0], y=pos[j][1], ax=pos[i][0], ay=pos[i][1], xref="x", yref="y", axref="x", ayref="y",
            showarrow=True, arrowhead=3, arrowwidth=0.8 + 5.0 * d["leave"], arrowcolor="rgba(80,80,80,0.7)",
            standoff=18, startstandoff=18, text="",
        )  # fmt: skip
        mid = (pos[i] + pos[j]) / 2
        fig.add_trace(
            go.Scatter(
                x=[mid[0]], y=[mid[1]], mode="text", text=[f"{d['leave']:.2f}"], showlegend=False,
                hovertext=hover,
                hoverinfo="text", textfont={"size": 10, "color": "#555"},
            )
        )  # fmt: skip
    hover = []
    for k in graph.nodes:
        top = "<br>".join(f"{html.escape(m)}: {z:+.2f}" for m, z in result.distinguishing[k][:5])
        hover.append(
            f"<b>state {k}</b><br>{result.occupancy[k]:.1%} of steps, "
            f"stays with p={result.transmat[k, k]:.3f}<br>{top}"
        )
    nodes = list(graph.nodes)
    fig.add_trace(
        go.Scatter(
            x=[pos[k][0] for k in nodes], y=[pos[k][1] for k in nodes], mode="markers+text",
            text=[f"S{k}" for k in nodes], textposition="middle center", hovertext=hover, hoverinfo="text",
            marker={"size": [18 + 44 * np.sqrt(result.occupancy[k]) for k in nodes],
                    "color": [state_colour(k) for k in nodes], "line": {"width": 1, "color": "#333"}},
            name="states", showlegend=False,
        )
    )  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(
        title="Latent states: size = occupancy, arrows = where a state goes when it changes",
        height=480, margin={"l": 10, "r": 10, "t": 50, "b": 10}, plot_bgcolor="white",
    )  # fmt: skip
    return fig


def charts_plotly(result: LatentStates, metrics: int = 6):
    """Metrics over training, one row per run, background coloured by latent state."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_runs = len(result.runs)
    fig = make_subplots(rows=n_runs, cols=1, shared_xaxes=True, vertical_spacing=0.04 if n_runs > 1 else 0,
                        subplot_titles=result.runs)  # fmt: skip
    chosen = telling_metrics(result, metrics)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    for r in range(n_runs):
        steps = result.steps[r]
        for start, end, k in segments(result.states[r], steps):
            fig.add_vrect(x0=start, x1=end, fillcolor=state_colour(k), opacity=0.25, line_width=0,
                          layer="below", row=r + 1, col=1, exclude_empty_subplots=False)  # fmt: skip
        for n, j in enumerate(chosen):
            fig.add_trace(
                go.Scatter(
                    x=steps, y=result.series[r][:, j], mode="lines", name=result.metrics[j],
                    legendgroup=result.metrics[j], showlegend=r == 0,
                    line={"width": 1.3, "color": palette[n % len(palette)]},
                    customdata=result.states[r],
                    hovertemplate="step %{x}: %{y:.2f} (state %{customdata})<extra>%{fullData.name}</extra>",
                ),
                row=r + 1, col=1,
            )  # fmt: skip
        fig.update_yaxes(
            title_text="z-score", range=display_range(result.series[r][:, chosen]), row=r + 1, col=1
        )
    fig.update_xaxes(title_text="step", row=n_runs, col=1)
    fig.update_layout(
        title="Metrics over training (click a legend entry to hide it); background: latent state",
        height=260 * n_runs + 120, margin={"l": 60, "r": 20, "t": 70, "b": 40}, plot_bgcolor="white",
    )  # fmt: skip
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1280px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} td.l {{ text-align: left; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; border-radius: 6px; vertical-align: middle; }}
</style></head><body>
<h1>{title}</h1>
<p>{lead}</p>
<div id="training-map-graph-box">{graph}</div>
<h2>States</h2>
{states}
<div id="training-map-charts-box">{charts}</div>
<h2>State changes</h2>
<p>Each change of state the runs go through, and the metrics that drive it: the gradient of
the log odds of the new state over the old (the HMM's forward posterior) with respect to the
metrics at the first step in the new state, per standard deviation of each metric, averaged
over every time it happens. Positive: a rise of the metric favours the new state.</p>
{transitions}
<h2>Model selection</h2>
<p>Gaussian hidden Markov models ({covariance} covariances) fitted to the z-scored metrics of every
run at once; the number of states with the lowest BIC is chosen. Log-likelihoods are per
observation; held-out: {heldout}; the held-out column is the best restart's, then the mean and
standard deviation over every restart.</p>
{selection}
{dropped}
</body></html>
"""


def report_html(result: LatentStates, title: str = "Training map") -> str:
    """The self-contained interactive report as one HTML string (plotly.js inlined)."""
    graph = graph_plotly(result).to_html(full_html=False, include_plotlyjs=True, div_id="training-map-graph")
    charts = charts_plotly(result).to_html(
        full_html=False, include_plotlyjs=False, div_id="training-map-charts"
    )
    rows = []
    for k in range(result.n_states):
        top = ", ".join(f"{html.escape(m)} {z:+.2f}" for m, z in result.distinguishing[k][:4])
        runs = sum(bool((s == k).any()) for s in result.states)
        rows.append(
            f"<tr><td class=l><span class=swatch style='background:{state_colour(k)}'></span> S{k}</td>"
            f"<td>{result.occupancy[k]:.1%}</td><td>{result.transmat[k, k]:.3f}</td><td>{runs}</td>"
            f"<td class=l>{top}</td></tr>"
        )
    states = (
        "<table><tr><th>state</th><th>of steps</th><th>stay p</th><th>runs visiting</th>"
        "<th>metrics that set it apart (z-score)</th></tr>" + "".join(rows) + "</table>"
    )
    sel = "".join(
        f"<tr><td>{row['n_states']}{' (chosen)' if row['n_states'] == result.n_states else ''}</td>"
        f"<td>{row['bic']:.1f}</td><td>{row['aic']:.1f}</td><td>{row['train_loglik']:.3f}</td>"
        f"<td>{row['heldout_loglik']:.3f}</td>"
        f"<td>{row['heldout_loglik_mean']:.3f} ± {row['heldout_loglik_std']:.3f} "
        f"({row['restarts']})</td></tr>"
        for row in result.selection
    )
    selection = (
        "<table><tr><th>states</th><th>BIC</th><th>AIC</th><th>train log-lik</th><th>held-out log-lik</th>"
        "<th>held-out over restarts</th></tr>" + sel + "</table>"
    )  # fmt: skip
    changes = []
    for tr in result.transitions:
        where = "; ".join(
            f"{html.escape(label)}: {', '.join(map(str, steps[:6]))}{' ...' if len(steps) > 6 else ''}"
            for label, steps in tr.steps.items()
        )
        drivers = ", ".join(f"{html.escape(m)} {g:+.2f}" for m, g in tr.drivers(result.metrics, 4))
        changes.append(
            f"<tr><td class=l>S{tr.source} → S{tr.target}</td><td>{tr.count}</td>"
            f"<td class=l>{drivers}</td><td class=l>{where}</td></tr>"
        )
    transitions = (
        "<table><tr><th>change</th><th>times</th><th>what drives it</th>"
        "<th>steps (first in the new state)</th></tr>"
        + "".join(changes) + "</table>"
        if changes
        else "<p>The runs never change state.</p>"
    )  # fmt: skip
    heldout = "the last runs" if len(result.runs) >= 3 else "the last 20 % of each run"
    dropped = (
        "<p>Metrics left out (constant or never finite): "
        f"{html.escape(', '.join(result.dropped_metrics))}</p>"
        if result.dropped_metrics
        else ""
    )
    lead = (
        f"{len(result.runs)} run(s), {len(result.metrics)} metrics, "
        f"{sum(len(s) for s in result.states)} recorded steps, {result.n_states} latent states."
    )
    return _PAGE.format(
        title=html.escape(title), lead=lead, graph=graph, charts=charts, states=states,
        transitions=transitions, selection=selection, heldout=heldout, dropped=dropped,
        covariance=getattr(result.model, "covariance_type", "diag"),
    )  # fmt: skip


def states_json(result: LatentStates) -> dict:
    return {
        "n_states": result.n_states,
        "covariance_type": getattr(result.model, "covariance_type", "diag"),
        "runs": result.runs,
        "metrics": result.metrics,
        "dropped_metrics": result.dropped_metrics,
        "occupancy": result.occupancy.tolist(),
        "startprob": result.startprob.tolist(),
        "transmat": result.transmat.tolist(),
        "means_z": result.means.tolist(),
        "means": result.means_raw.tolist(),
        "selection": result.selection,
        "distinguishing": [[{"metric": m, "z": z} for m, z in d] for d in result.distinguishing],
        "boundaries": {label: result.boundaries(i) for i, label in enumerate(result.runs)},
        "transitions": [
            {
                "from": tr.source,
                "to": tr.target,
                "count": tr.count,
                "steps": tr.steps,
                "drivers": [{"metric": m, "gradient": g} for m, g in tr.drivers(result.metrics, 8)],
                "importance": tr.importance.tolist(),
            }
            for tr in result.transitions
        ],
        # what decoding a new run needs (StateModel.load): variances and the z-scoring
        **(result.state_model().to_json() if result.model is not None else {}),
    }


def write_report(result: LatentStates, out, title: str = "Training map") -> dict[str, Path]:
    """Write training_map.png, report.html, states.csv and states.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("training_map.png", "report.html", "states.csv", "states.json")}
    training_map_figure(result).savefig(paths["training_map.png"], dpi=110)
    paths["report.html"].write_text(report_html(result, title), encoding="utf-8")
    with open(paths["states.csv"], "w") as f:
        f.write("run,step,state\n")
        for label, steps, states in zip(result.runs, result.steps, result.states, strict=True):
            f.writelines(f"{label},{int(s)},{int(k)}\n" for s, k in zip(steps, states, strict=True))
    paths["states.json"].write_text(json.dumps(states_json(result), indent=1))
    return paths
