"""Tiny random-weight stand-ins for real models, built from configs: no downloads, deterministic, fast on a CPU.

The test-suite uses them, and so can you: every example in the documentation runs offline against them, for
instance ``with stand_ins(): pipe = StableDiffusionPipeline.from_pretrained(...)`` (see :mod:`.stand_ins`). They
need the ``diffusers`` extra; importing this package imports nothing heavy until a builder is called.
"""

from .chroma import tiny_chroma_pipeline
from .flux import FLUX_KINDS, flux_scheduler, tiny_flux_pipeline
from .sd import (
    LDM_SR_SCHEDULERS,
    SD_KINDS,
    SD_SCHEDULERS,
    make_scheduler,
    reload_pipeline,
    save_and_load,
    sd_scheduler,
    tiny_clip_tokenizer,
    tiny_ldm_sr_pipeline,
    tiny_sd_pipeline,
)
from .sd3 import tiny_sd3_pipeline
from .sd_upscale import tiny_sd_upscale_pipeline
from .sdxl import SDXL_KINDS, tiny_sdxl_pipeline
from .stand_ins import STAND_IN_REPOS, STAND_INS, stand_in_image, stand_ins
from .text import tiny_clip_text_encoder, tiny_t5_encoder, tiny_t5_tokenizer
from .wan import tiny_wan_pipeline

__all__ = [
    "FLUX_KINDS",
    "LDM_SR_SCHEDULERS",
    "SDXL_KINDS",
    "SD_KINDS",
    "SD_SCHEDULERS",
    "STAND_INS",
    "STAND_IN_REPOS",
    "flux_scheduler",
    "make_scheduler",
    "reload_pipeline",
    "save_and_load",
    "sd_scheduler",
    "stand_in_image",
    "stand_ins",
    "tiny_chroma_pipeline",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_ldm_sr_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sd_upscale_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
    "tiny_wan_pipeline",
]
