"""Tiny random-weight Flux pipelines (text2img, img2img, Fill inpainting) built from configs.

Shaped like FLUX.1 at toy width: a FluxTransformer2DModel with one double-stream and one single-stream block
(2 heads of 16), packed latents (2x2 latent pixels per token), a CLIP text model for the pooled embedding and a
T5 encoder for the token embeddings (both 32 wide, tokenizers in memory), an AutoencoderKL with 4 latent
channels and Flux's scaling_factor 0.3611 and shift_factor 0.1159 (factor 2: a 32x32 image has a 16x16 latent,
64 tokens), and FLUX.1-dev's FlowMatchEulerDiscreteScheduler (dynamic shifting). The default image size is
32x32 (``default_sample_size`` 16); the real pipeline's is 1024.
"""

from __future__ import annotations

import torch

from .sd import tiny_clip_tokenizer
from .text import tiny_clip_text_encoder, tiny_t5_encoder, tiny_t5_tokenizer
from .vae import tiny_autoencoder_kl

__all__ = ["FLUX_KINDS", "flux_scheduler", "tiny_flux_pipeline"]

FLUX_KINDS = ("text2img", "img2img", "fill")


def flux_scheduler():
    """FlowMatchEulerDiscreteScheduler configured as FLUX.1-dev's (shift 3, dynamic shifting between 0.5 and
    1.15 over 256..4096 image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_pipeline(kind: str = "text2img"):
    """A tiny Flux pipeline: ``kind`` is ``"text2img"`` (FluxPipeline), ``"img2img"`` (FluxImg2ImgPipeline) or
    ``"fill"`` (FluxFillPipeline, whose transformer also sees the packed masked-image latent and mask).

    Prompts work (T5 pads to ``max_sequence_length``, 512 by default as in the real pipeline); so do
    ``prompt_embeds`` (B, seq_len, 32) with ``pooled_prompt_embeds`` (B, 32). Sizes must be multiples of 4.
    """
    from diffusers import FluxFillPipeline, FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel

    classes = {"text2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "fill": FluxFillPipeline}
    if kind not in classes:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(FLUX_KINDS)}")
    torch.manual_seed(0)
    latent_channels, vae_scale_factor = 4, 2
    packed = latent_channels * 4
    # Fill: the packed latent, the packed masked-image latent and the packed mask (vae_scale_factor**2 per pixel)
    in_channels = packed if kind != "fill" else 2 * packed + vae_scale_factor**2 * 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev and Fill are guidance-distilled: guidance_scale is an input
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_autoencoder_kl(0.3611, shift_factor=0.1159, latent_channels=latent_channels, quant_convs=False)
    pipe = classes[kind](
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=tiny_clip_text_encoder(32),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(32),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.default_sample_size = 16  # 32x32 images by default (the real pipeline: 128 -> 1024x1024)
    pipe.set_progress_bar_config(disable=True)
    return pipe
