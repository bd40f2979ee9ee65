"""A tiny random-weight Chroma pipeline (ChromaPipeline) built from configs.

Chroma is a Flux-derived model that :func:`~kds_hook.diffusers.run` does not drive itself; the documentation's
recipe for such pipelines (``apply_patch`` with the packed-latent layout, ``num_images_per_prompt=N``,
``output_type="latent"``, ``kds.select``, decode yourself) runs on this stand-in. Shaped like Chroma at toy width:
a ChromaTransformer2DModel with one double- and one single-stream block (2 heads of 16) over packed latents, a T5
encoder 32 wide (tokenizer in memory), classifier-free guidance with negative prompts, an AutoencoderKL with
Flux's scaling_factor 0.3611 and shift_factor 0.1159 (factor 2, 4 latent channels), and a
FlowMatchEulerDiscreteScheduler. The default image size is 32x32 (the real pipeline's 1024).
"""

from __future__ import annotations

import torch

from .text import tiny_t5_encoder, tiny_t5_tokenizer
from .vae import tiny_autoencoder_kl

__all__ = ["tiny_chroma_pipeline"]


def tiny_chroma_pipeline():
    """A tiny ChromaPipeline. Prompts work (T5 pads to ``max_sequence_length``, 512 by default); so do
    ``prompt_embeds`` (B, seq_len, 32). Sizes must be multiples of 4."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 latent pixels per token
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = tiny_autoencoder_kl(0.3611, shift_factor=0.1159, quant_convs=False)  # Flux's VAE
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=tiny_t5_encoder(32),
        tokenizer=tiny_t5_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.default_sample_size = 16  # 32x32 images by default (the real pipeline: 128 -> 1024x1024)
    pipe.set_progress_bar_config(disable=True)
    return pipe
