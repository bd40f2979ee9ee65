"""A tiny random-weight Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline) built from configs.

Shaped like stabilityai/stable-diffusion-x4-upscaler at toy width: the UNet sees the noisy latent concatenated
with the noise-augmented low-resolution image (4 + 3 = 7 channels in, 4 out) at the low-resolution size, with
the augmentation level as its class label; the 3-block AutoencoderKL (scaling_factor 0.08333, as the real one)
decodes the latent 4x larger. The denoising scheduler is DDIM with v-prediction and SD 2's betas; the
``low_res_scheduler`` that noises the conditioning image is a default DDPMScheduler (linear betas 0.0001..0.02),
the real model's.
"""

from __future__ import annotations

import torch

from .sd import sd_scheduler, tiny_clip_tokenizer
from .text import tiny_clip_text_encoder
from .vae import tiny_autoencoder_kl

__all__ = ["tiny_sd_upscale_pipeline"]


def tiny_sd_upscale_pipeline(scheduler: str = "ddim", prediction_type: str = "v_prediction"):
    """A tiny StableDiffusionUpscalePipeline (4x): an 8x8 input image gives a 32x32 output.

    ``scheduler`` is ``"ddim"``, ``"dpmpp"`` or ``"euler"`` (see :func:`~kds_hook.testing.sd_scheduler`).
    Prompts work (a tiny CLIP text model and byte-level tokenizer); so do ``prompt_embeds`` of shape
    (B, 77, 32). Input sizes must be multiples of 4 pixels (the tiny UNet downsamples twice). No safety checker
    and no watermarker.
    """
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=7,  # noisy latent (4) concatenated with the noise-augmented low-resolution image (3)
        out_channels=4,
        layers_per_block=1,
        # the full-resolution level is the costly one on a CPU: narrow there, cross-attention at the lowest level
        block_out_channels=(4, 8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=2,
        num_class_embeds=1000,  # the augmentation level (noise_level) is the class label, as in the real model
    )
    vae = tiny_autoencoder_kl(0.08333, block_out_channels=(8, 8, 16))  # factor 4, the real one's
    text_encoder = tiny_clip_text_encoder(32)
    sched = sd_scheduler(scheduler, prediction_type)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet.eval(),
        low_res_scheduler=DDPMScheduler(),
        scheduler=sched,
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
