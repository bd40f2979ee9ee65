"""Tiny random-weight stand-ins for real models, built from configs: no downloads, deterministic, fast on a CPU.

The test-suite uses them, and so can you: every example in the documentation runs offline against them. They need
the ``diffusers`` extra; importing this package imports nothing heavy until a builder is called.
"""

from .sd_upscale import tiny_sd_upscale_pipeline
from .sdxl import SDXL_KINDS, tiny_sdxl_pipeline
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

__all__ = [
    "LDM_SR_SCHEDULERS",
    "SD_KINDS",
    "SD_SCHEDULERS",
    "SDXL_KINDS",
    "make_scheduler",
    "reload_pipeline",
    "save_and_load",
    "tiny_clip_tokenizer",
    "tiny_ldm_sr_pipeline",
    "tiny_sd_pipeline",
    "tiny_sd_upscale_pipeline",
    "tiny_sdxl_pipeline",
]
