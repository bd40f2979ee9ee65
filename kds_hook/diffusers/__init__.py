"""diffusers integration: steer a pipeline's scheduler in one line (tomesd style, duck-typed).

``apply_patch(pipe, kds)`` / ``remove_patch(pipe)`` steer the scheduler of a pipeline whose batch already holds
N contiguous particles per input; ``run(pipe, kds, **call_kwargs)`` also expands each input into N particles,
selects one per input in latent space and decodes only that one. Importing this module does not import
diffusers; the functions work on any object with the right methods.
"""

from .layouts import SPATIAL, VIDEO, Layout, PackedLayout, packed_2x2
from .patch import apply_patch, patched_kds, patched_layout, remove_patch
from .pipeline import SUPPORTED_PIPELINES, KDSPipelineOutput, run
from .schedulers import SUPPORTED_SCHEDULERS, T_FRAC_RULES, UNSUPPORTED_SCHEDULERS, SchedulerSpec

__all__ = [
    "KDSPipelineOutput",
    "Layout",
    "PackedLayout",
    "SPATIAL",
    "SUPPORTED_PIPELINES",
    "SUPPORTED_SCHEDULERS",
    "SchedulerSpec",
    "T_FRAC_RULES",
    "UNSUPPORTED_SCHEDULERS",
    "VIDEO",
    "apply_patch",
    "packed_2x2",
    "patched_kds",
    "patched_layout",
    "remove_patch",
    "run",
]
