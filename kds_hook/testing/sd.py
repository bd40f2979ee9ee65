"""Tiny random-weight Stable Diffusion and LDM-SR pipelines built from configs: no downloads, deterministic, a few
ms per UNet call.

Used by the diffusers tests and the CLI tests, and public so that users can try every example offline. Every builder seeds torch itself and puts the models in eval mode
(as from_pretrained does; the tiny LDM-SR gave different outputs in training mode), so two calls with the same
arguments give pipelines with identical weights. Shapes follow the real models at toy width:

- :func:`tiny_ldm_sr_pipeline`: like CompVis/ldm-super-resolution-4x-openimages, the UNet sees the noisy latent
  concatenated with the low-resolution image (6 channels in, 3 out) at the low-resolution size, and the VQ
  autoencoder (3 blocks, 3 latent channels) decodes it 4x larger. A 8x8 input image gives a 32x32 output.
- :func:`tiny_sd_pipeline`: Stable Diffusion (text2img, img2img, inpaint with a 9-channel UNet) with a tiny
  UNet2DConditionModel, AutoencoderKL (factor 2: a 32x32 image has 16x16 latents), CLIP text model from a
  CLIPTextConfig and a byte-level CLIPTokenizer whose vocab.json and merges.txt are written to a temp directory.

Function names are stable: other tests import them.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

from .text import tiny_clip_text_encoder
from .vae import tiny_autoencoder_kl

__all__ = [
    "LDM_SR_SCHEDULERS",
    "SD_KINDS",
    "SD_SCHEDULERS",
    "make_scheduler",
    "reload_pipeline",
    "save_and_load",
    "sd_scheduler",
    "tiny_clip_tokenizer",
    "tiny_ldm_sr_pipeline",
    "tiny_sd_pipeline",
]

LDM_SR_SCHEDULERS = ("ddim", "dpmpp", "euler")
SD_SCHEDULERS = LDM_SR_SCHEDULERS
SD_KINDS = ("text2img", "img2img", "inpaint")


def make_scheduler(name: str, **config):
    """A diffusers scheduler by short name: ``"ddim"`` (DDIMScheduler), ``"dpmpp"`` (DPMSolverMultistepScheduler,
    dpmsolver++) or ``"euler"`` (EulerDiscreteScheduler); ``config`` goes to its constructor (beta schedule,
    prediction_type, ...)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**config)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **config)
    if name == "euler":
        return EulerDiscreteScheduler(**config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(LDM_SR_SCHEDULERS)}")


def sd_scheduler(name: str, prediction_type: str = "epsilon"):
    """:func:`make_scheduler` configured as Stable Diffusion's (scaled_linear betas 0.00085..0.012, steps_offset 1,
    DDIM without clipping or a final alpha of one), for the SD, SDXL and x4-upscaler stand-ins."""
    return make_scheduler(
        name,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,  # as in SD's own configs (diffusers warns otherwise)
        **({"clip_sample": False, "set_alpha_to_one": False} if name == "ddim" else {}),
    )


def tiny_ldm_sr_pipeline(scheduler: str = "ddim", prediction_type: str = "epsilon"):
    """A tiny LDMSuperResolutionPipeline (4x): UNet2DModel 6->3 channels and a 3-block VQModel.

    ``scheduler`` is ``"ddim"``, ``"dpmpp"`` or ``"euler"`` (see :func:`make_scheduler`), configured like the real
    model's DDIM scheduler (scaled_linear betas 0.0015..0.0155, no clipping). Input images must be a multiple of
    4 pixels (the tiny UNet downsamples twice); outputs are 4x the input size.
    """
    from diffusers import UNet2DModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
        LDMSuperResolutionPipeline,
    )

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=6,  # noisy latent (3) concatenated with the low-resolution image (3)
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=4,
    )
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks: 2 downsamplings, factor 4 as the real model
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        norm_num_groups=4,
        sample_size=32,
    )
    sched = make_scheduler(
        scheduler,
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0155,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **({"clip_sample": False} if scheduler == "ddim" else {}),
    )
    pipe = LDMSuperResolutionPipeline(vqvae=vqvae.eval(), unet=unet.eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_tokenizer(directory: Optional[str] = None):
    """A byte-level CLIPTokenizer with no merges, written to ``directory`` and loaded (with
    ``directory=None``, a temporary folder that is removed once the tokenizer is loaded).

    The vocabulary holds the 256 byte characters, each also with the end-of-word marker, plus the two special
    tokens: 514 ids, so any text tokenizes (one token per byte). model_max_length is 77, as in CLIP.
    """
    from transformers import CLIPTokenizer

    try:
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:  # pragma: no cover - older/newer layouts
        from transformers.convert_slow_tokenizer import bytes_to_unicode

    if directory is None:  # the tokenizer holds its vocabulary in memory once loaded: leave no folder behind
        with tempfile.TemporaryDirectory(prefix="kds-tiny-tokenizer-") as scratch:
            return tiny_clip_tokenizer(scratch)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def tiny_sd_pipeline(kind: str = "text2img", scheduler: str = "ddim", prediction_type: str = "epsilon"):
    """A tiny Stable Diffusion pipeline: ``kind`` is ``"text2img"`` (StableDiffusionPipeline), ``"img2img"``
    (StableDiffusionImg2ImgPipeline) or ``"inpaint"`` (StableDiffusionInpaintPipeline with a 9-channel UNet: latent,
    mask, masked-image latent).

    Components: UNet2DConditionModel (cross-attention dim 32), AutoencoderKL with 4 latent channels and factor 2
    (use height=width=32 for 16x16 latents; sizes must be multiples of 8), CLIPTextModel from a tiny
    CLIPTextConfig, :func:`tiny_clip_tokenizer`, scheduler as in :func:`make_scheduler` with SD's betas
    (scaled_linear 0.00085..0.012). No safety checker or feature extractor.
    """
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    classes = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    if kind not in classes:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(SD_KINDS)}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = tiny_autoencoder_kl(0.18215, force_upcast=True)  # SD's scaling_factor and AutoencoderKL's default upcast
    text_encoder = tiny_clip_text_encoder(32)
    sched = sd_scheduler(scheduler, prediction_type)
    pipe = classes[kind](
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_and_load(pipe, directory: str):
    """Saves ``pipe`` with ``save_pretrained`` into ``directory`` and loads it back with its class's
    ``from_pretrained`` (the real loading code, local files only). Returns the loaded pipeline."""
    pipe.save_pretrained(directory, safe_serialization=True)
    loaded = type(pipe).from_pretrained(directory, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def reload_pipeline(pipe):
    """:func:`save_and_load` through a fresh temporary directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kds-tiny-pipeline-") as directory:
        return save_and_load(pipe, directory)
