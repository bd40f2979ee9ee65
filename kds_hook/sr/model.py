"""The architecture and noise schedule of the built-in model, as configs (random weights until trained).

UNet: a diffusers ``UNet2DModel``, 6 channels in (``x_t`` and the bicubic image), 3 out, four levels of
16/32/64/128 channels with two ResNet blocks each and no attention: cheap at full resolution, where most pixels
are, and 3.5 M parameters in all (stored as float16: 7 MB). It downsamples 8x in all, so the pipeline pads
outputs to a multiple of 8.

Schedule: 1000 training steps, cosine betas (``squaredcos_cap_v2``), ``v_prediction``. Sampling uses DDIM with
``timestep_spacing="trailing"`` (the first step starts from pure noise at t = 999) and no x0 clipping (the
scaled residual is not bounded by 1).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

__all__ = ["RESIDUAL_SCALE", "SCHEDULER_CONFIG", "UNET_CONFIG", "build_pipeline", "build_scheduler", "build_unet"]

UNET_CONFIG: Dict[str, Any] = {
    "in_channels": 6,
    "out_channels": 3,
    "block_out_channels": (16, 32, 64, 128),
    "down_block_types": ("DownBlock2D",) * 4,
    "up_block_types": ("UpBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
}

SCHEDULER_CONFIG: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}

RESIDUAL_SCALE = 4.0  # scaled residual std about 0.5 on the training photos (raw: about 0.12 in [-1, 1] units)


def build_unet(seed: int = 0):
    """The UNet with freshly initialised weights (``torch.manual_seed(seed)`` first, so the same seed gives the
    same weights)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


def build_scheduler():
    """The sampling scheduler: DDIM on the training schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_pipeline(seed: int = 0):
    """A :class:`~kds_hook.sr.KDSSuperResolutionPipeline` with the built-in architecture and random weights, in
    eval mode."""
    from .pipeline import KDSSuperResolutionPipeline

    unet = build_unet(seed).eval()
    return KDSSuperResolutionPipeline(unet=unet, scheduler=build_scheduler(), residual_scale=RESIDUAL_SCALE)
