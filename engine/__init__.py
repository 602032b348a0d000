"""probescope: watch a PyTorch model learn, cheaply enough to leave it on.

Importing probescope does no work: no threads, no device context, no kernel compilation.
"""

from probescope.events import EVENTS, Callback
from probescope.monitor import Monitor
from probescope.probes import (
    CheckpointProbe,
    CurveProbe,
    GridProbe,
    HistogramProbe,
    LossProbe,
    NeuronProbe,
    PredictionProbe,
    Probe,
    ProbeContext,
    ProbeStats,
    StatsProbe,
)
from probescope.ring import Frame, FrameRing
from probescope.run import Run, RunWriter, open_run
from probescope.schedule import Schedule, StepInfo, StepTime
from probescope.sinks import Sink, TensorBoardSink
from probescope.spec import load_probes, save_probes

__version__ = "0.1.0"

__all__ = [
    "EVENTS",
    "Callback",
    "CheckpointProbe",
    "CurveProbe",
    "Frame",
    "FrameRing",
    "GridProbe",
    "HistogramProbe",
    "LossProbe",
    "Monitor",
    "NeuronProbe",
    "PredictionProbe",
    "Probe",
    "ProbeContext",
    "ProbeStats",
    "Run",
    "RunWriter",
    "Schedule",
    "Sink",
    "StatsProbe",
    "StepInfo",
    "StepTime",
    "TensorBoardSink",
    "__version__",
    "load_probes",
    "open_run",
    "save_probes",
]
