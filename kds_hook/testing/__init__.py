"""Tiny random-weight stand-ins for real models, built from configs: no downloads, deterministic, fast on a CPU.

The test-suite uses them, and so can you: every example in the documentation runs offline against them, for
instance ``with stand_ins(): pipe = StableDiffusionPipeline.from_pretrained(...)`` (see :mod:`.stand_ins`). They
need the ``diffusers`` extra; importing this package imports nothing heavy until a builder is called.
"""

from .sd import (
    LDM_SR_SCHEDULERS,
    SD_KINDS,
    SD_SCHEDULERS,
    make_scheduler,
    reload_pipeline,
    save_and_load,
    tiny_clip_tokenizer,
    tiny_ldm_sr_pipeline,
    tiny_sd_pipeline,
)
from .stand_ins import STAND_IN_REPOS, STAND_INS, stand_in_image, stand_ins

__all__ = [
    "LDM_SR_SCHEDULERS",
    "SD_KINDS",
    "SD_SCHEDULERS",
    "STAND_INS",
    "STAND_IN_REPOS",
    "make_scheduler",
    "reload_pipeline",
    "save_and_load",
    "stand_in_image",
    "stand_ins",
    "tiny_clip_tokenizer",
    "tiny_ldm_sr_pipeline",
    "tiny_sd_pipeline",
]
