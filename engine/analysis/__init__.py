"""Training dynamics: latent states of training (hidden Markov models) and the training map.

Needs the ``analysis`` extra (hmmlearn, networkx, plotly, pandas, pyarrow).
"""

from probescope.analysis.online import StateModel, StateTracker
from probescope.analysis.report import report_html, training_map_figure, transition_graph, write_report
from probescope.analysis.states import LatentStates, RunSeries, latent_states, load_series

__all__ = [
    "LatentStates",
    "RunSeries",
    "StateModel",
    "StateTracker",
    "latent_states",
    "load_series",
    "report_html",
    "training_map_figure",
    "transition_graph",
    "write_report",
]
