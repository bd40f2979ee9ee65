"""The tiny AutoencoderKL of the stand-in pipelines: a few 8- and 16-wide blocks, random weights, eval mode.

Each family keeps its real VAE's latent statistics (``scaling_factor``, ``shift_factor``) and its convolution
layout (SD3, Flux and Chroma drop the quant convs), so the latent scale that selection undoes is the real one.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["tiny_autoencoder_kl"]


def tiny_autoencoder_kl(
    scaling_factor: float,
    *,
    shift_factor: Optional[float] = None,
    block_out_channels: Sequence[int] = (8, 16),
    latent_channels: int = 4,
    quant_convs: bool = True,
    force_upcast: bool = False,
):
    """An AutoencoderKL with one layer per block: ``len(block_out_channels) - 1`` downsamplings (two blocks: a
    32x32 image has a 16x16 latent). float32 weights, so nothing needs upcasting (``force_upcast`` False)."""
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
        force_upcast=force_upcast,
    )
    return vae.eval()
