"""kds-hook: Kernel Density Steering for any diffusion sampler that exposes its x0 prediction.

The core is pure torch. Integrations live in ``kds_hook.k_diffusion`` and ``kds_hook.diffusers`` and are
duck-typed: importing ``kds_hook`` imports neither library.
"""

from .gate import TimeGate
from .kds import KDS, StepRecord
from .meanshift import PatchMeanShift, auto_bandwidth
from .selection import SELECTION_METHODS, Selection, select_particles

__version__ = "0.1.0"

__all__ = [
    "KDS",
    "PatchMeanShift",
    "SELECTION_METHODS",
    "Selection",
    "StepRecord",
    "TimeGate",
    "auto_bandwidth",
    "select_particles",
    "__version__",
]
