"""A tiny random-weight Wan text-to-video pipeline (WanPipeline) built from configs.

Shaped like Wan 2.1 at toy width: a WanTransformer3DModel with one block (2 heads of 12, patches of 1x2x2
latent voxels), a UMT5 text encoder 32 wide (tokenizer in memory), Wan's causal video autoencoder
(AutoencoderKLWan, 4 levels: 8x smaller in space, 4x in time, 16 latent channels with Wan's per-channel
latents_mean/latents_std) and Wan 2.1's UniPC multistep scheduler in flow-matching mode (flow_shift 3). The
latents are (B, 16, 1 + (frames - 1) / 4, height / 8, width / 8).

The real pipeline's default size (81 frames of 480x832) is far too large for a CPU even at this width: call it
with e.g. ``height=32, width=32, num_frames=5`` (a 2 x 4 x 4 latent).
"""

from __future__ import annotations

import torch

from .text import tiny_t5_encoder, tiny_t5_tokenizer

__all__ = ["tiny_wan_pipeline"]


def tiny_wan_pipeline(scheduler: str = "unipc"):
    """A tiny WanPipeline. ``scheduler`` is ``"unipc"`` (UniPCMultistepScheduler with flow_prediction and flow
    sigmas, Wan 2.1's) or ``"euler"`` (FlowMatchEulerDiscreteScheduler, shift 3). Prompts work (UMT5 pads to
    ``max_sequence_length``, 512 by default); so do ``prompt_embeds`` (B, seq_len, 32)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose 'unipc' or 'euler'")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(32, umt5=True),
        vae=vae.eval(),
        scheduler=sched,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
