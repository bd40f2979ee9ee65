"""A tiny random-weight Stable Diffusion 3 pipeline (StableDiffusion3Pipeline) built from configs.

Shaped like SD3 at toy width: an SD3Transformer2DModel (MMDiT) with one joint block, patch size 2; two CLIP text
encoders with projections (hidden 32 each, side by side 64 wide; their pooled projections 2 x 32 form the
pooled embedding) and a T5 encoder 64 wide (tokenizers in memory); an AutoencoderKL with 4 latent channels and
SD3's scaling_factor 1.5305 and shift_factor 0.0609 (factor 2: a 32x32 image has a 16x16 latent); SD3's
FlowMatchEulerDiscreteScheduler (shift 3). The default image size is 32x32 (the real pipeline's 1024).
"""

from __future__ import annotations

import torch

from .sd import tiny_clip_tokenizer
from .text import tiny_clip_text_encoder, tiny_t5_encoder, tiny_t5_tokenizer
from .vae import tiny_autoencoder_kl

__all__ = ["tiny_sd3_pipeline"]


def tiny_sd3_pipeline():
    """A tiny StableDiffusion3Pipeline. Prompts work (all three encoders; T5 pads to ``max_sequence_length``,
    256 by default as in the real pipeline); so do ``prompt_embeds`` (B, seq_len, 64) with
    ``pooled_prompt_embeds`` (B, 64). Sizes must be multiples of 4."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,  # the default latent size: 32x32 images
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width; the CLIP hidden states (2 x 32) are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections side by side
        pos_embed_max_size=32,
    )
    vae = tiny_autoencoder_kl(1.5305, shift_factor=0.0609, quant_convs=False)  # SD3's latent statistics
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=tiny_clip_text_encoder(32, projection_dim=32),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(32, projection_dim=32),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(64),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
