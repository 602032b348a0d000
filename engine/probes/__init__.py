"""The probes: what probescope evaluates on a snapshot of the model while it trains."""

from probescope.probes.base import Probe, ProbeContext, ProbeStats
from probescope.probes.checkpoint import CheckpointProbe
from probescope.probes.curve import CurveProbe
from probescope.probes.grid import GridProbe
from probescope.probes.histogram import HistogramProbe
from probescope.probes.loss import LossProbe
from probescope.probes.neurons import NeuronProbe
from probescope.probes.prediction import PredictionProbe
from probescope.probes.stats import StatsProbe

#: The kinds of probescope's own probes, each drawn by a panel of its own; a probe of any other
#: kind is drawn from what its frames hold (probescope.probes.views).
BUILT_IN_KINDS = frozenset(
    p.kind
    for p in (
        CheckpointProbe,
        CurveProbe,
        GridProbe,
        HistogramProbe,
        LossProbe,
        NeuronProbe,
        PredictionProbe,
        StatsProbe,
    )
)

__all__ = [
    "BUILT_IN_KINDS",
    "CheckpointProbe",
    "CurveProbe",
    "GridProbe",
    "HistogramProbe",
    "LossProbe",
    "NeuronProbe",
    "PredictionProbe",
    "Probe",
    "ProbeContext",
    "ProbeStats",
    "StatsProbe",
]
