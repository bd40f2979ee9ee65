"""kds-hook: Kernel Density Steering for any diffusion sampler that exposes its x0 prediction.

The core is pure torch. Integrations live in ``kds_hook.k_diffusion`` and ``kds_hook.diffusers`` and are
duck-typed: importing ``kds_hook`` imports neither library. The names below are loaded on first use (PEP 562), so
``import kds_hook`` alone does not import torch, and ``kds-hook --help`` stays fast; ``from kds_hook import KDS``
works as usual.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY_NAMES = {
    "KDS": ".kds",
    "PatchMeanShift": ".meanshift",
    "SELECTION_METHODS": ".selection",
    "Selection": ".selection",
    "StepRecord": ".kds",
    "TimeGate": ".gate",
    "auto_bandwidth": ".meanshift",
    "select_particles": ".selection",
}

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

if _typing.TYPE_CHECKING:  # type checkers and IDEs see the names as if imported here
    from .gate import TimeGate
    from .kds import KDS, StepRecord
    from .meanshift import PatchMeanShift, auto_bandwidth
    from .selection import SELECTION_METHODS, Selection, select_particles


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> _typing.List[str]:
    return sorted(set(globals()) | set(__all__))
