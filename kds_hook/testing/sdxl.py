"""Tiny random-weight Stable Diffusion XL pipelines (text2img, img2img, inpaint) built from configs.

Shaped like SDXL at toy width: two CLIP text encoders (the second with a projection, whose pooled output and the
six size/crop "time ids" form the UNet's added conditioning), their hidden states concatenated for the
cross-attention (32 + 32 = 64), an AutoencoderKL with SDXL's scaling_factor 0.13025 (factor 2 here: a 32x32
image has 16x16 latents), Euler-discrete scheduling with SDXL's betas by default. No watermarker.
"""

from __future__ import annotations

import torch

from .sd import sd_scheduler, tiny_clip_tokenizer
from .text import tiny_clip_text_encoder
from .vae import tiny_autoencoder_kl

__all__ = ["SDXL_KINDS", "tiny_sdxl_pipeline"]

SDXL_KINDS = ("text2img", "img2img", "inpaint")


def tiny_sdxl_pipeline(kind: str = "text2img", scheduler: str = "euler", inpaint_channels: int = 9):
    """A tiny SDXL pipeline: ``kind`` is ``"text2img"`` (StableDiffusionXLPipeline), ``"img2img"``
    (StableDiffusionXLImg2ImgPipeline) or ``"inpaint"`` (StableDiffusionXLInpaintPipeline; with
    ``inpaint_channels=9`` a UNet that also sees the mask and the masked-image latent, as the SDXL inpainting
    model; with 4 the base UNet, the pipeline then pastes the known region back after every step).

    ``scheduler`` is ``"euler"`` (SDXL's default), ``"ddim"`` or ``"dpmpp"`` (see
    :func:`~kds_hook.testing.sd_scheduler`). Prompts work; so do ``prompt_embeds`` (B, 77, 64) with
    ``pooled_prompt_embeds`` (B, 32). Sizes must be multiples of 8 (use height=width=32).
    """
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    classes = {
        "text2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    }
    if kind not in classes:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(SDXL_KINDS)}")
    if inpaint_channels not in (4, 9):
        raise ValueError(f"inpaint_channels must be 4 or 9, got {inpaint_channels!r}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=inpaint_channels if kind == "inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # the two text encoders' hidden states side by side
        attention_head_dim=4,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + six time ids of 8 each
    )
    vae = tiny_autoencoder_kl(0.13025)  # SDXL's scaling_factor; the real fp16 VAE sets force_upcast
    text_encoder = tiny_clip_text_encoder(32)
    text_encoder_2 = tiny_clip_text_encoder(32, projection_dim=32)  # its pooled projection
    sched = sd_scheduler(scheduler)
    pipe = classes[kind](
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=sched,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
