"""diffusers integration: steer a pipeline's scheduler in one line (tomesd style, duck-typed).

``apply_patch(pipe, kds)`` / ``remove_patch(pipe)`` steer the scheduler of a pipeline whose batch already holds
N contiguous particles per input; ``run(pipe, kds, **call_kwargs)`` also expands each input into N particles,
selects one per input in latent space and decodes only that one. Importing this module does not import
diffusers; the functions work on any object with the right methods.
"""

from .patch import SUPPORTED_SCHEDULERS, apply_patch, patched_kds, remove_patch
from .pipeline import SUPPORTED_PIPELINES, KDSPipelineOutput, run

__all__ = [
    "KDSPipelineOutput",
    "SUPPORTED_PIPELINES",
    "SUPPORTED_SCHEDULERS",
    "apply_patch",
    "patched_kds",
    "remove_patch",
    "run",
]
