"""A small learned 4x super-resolution model that ships with kds-hook (pixel-space diffusion, residual to bicubic).

``load_builtin()`` returns the shipped pipeline, offline; ``KDSSuperResolutionPipeline`` is a diffusers
``DiffusionPipeline`` (``save_pretrained`` / ``from_pretrained`` on local folders) that
:func:`kds_hook.diffusers.apply_patch` steers as it is. The photos it was trained on and the held-out ones are
listed in :mod:`kds_hook.sr.data`. Needs the ``diffusers`` extra; the model page is ``docs/sr-model.md``.
"""

from .builtin import builtin_path, load_builtin, load_pipeline
from .data import HELD_OUT_PHOTOS, PHOTOS, TRAIN_PHOTOS, load_photo
from .model import build_pipeline
from .pipeline import KDSSuperResolutionPipeline
from .resize import SCALE, bicubic_downsample, bicubic_upsample, quantize

__all__ = [
    "HELD_OUT_PHOTOS",
    "KDSSuperResolutionPipeline",
    "PHOTOS",
    "SCALE",
    "TRAIN_PHOTOS",
    "bicubic_downsample",
    "bicubic_upsample",
    "build_pipeline",
    "builtin_path",
    "load_builtin",
    "load_photo",
    "load_pipeline",
    "quantize",
]
