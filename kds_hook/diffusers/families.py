"""What :func:`~kds_hook.diffusers.run` knows about each supported pipeline family.

For every family: where its denoiser and autoencoder live, which call arguments hold one entry per input, how the
pipeline maps the scheduler's latents to the decoder's input (undone here so that selection happens in the
scheduler's latent space), and, for packed latents, the layout the scheduler patch needs.

Latent scalings (the pipeline decodes ``z``; the scheduler works on ``x``):

- LDM super-resolution: ``z = x``; kds_hook.sr's pixel-space model too (its "autoencoder" is ``pipe.decoder``,
  which adds the bicubic image to the scaled residual).
- Stable Diffusion 1/2, the x4 upscaler: ``z = x / scaling_factor``.
- SDXL: ``z = x / scaling_factor``, or ``x * latents_std / scaling_factor + latents_mean`` where the VAE config
  has per-channel statistics.
- SD3 and Flux: ``z = x / scaling_factor + shift_factor``; Flux's scheduler latents are packed 2x2,
  (B, h·w/4, 4·C), and unpacked to (B, C, h, w) before that.
- Wan (video, (B, C, F, H, W)): ``z = x * latents_std + latents_mean``, per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .inputs import Expanded, expand_inputs, expand_kds_sr, expand_ldm_sr

__all__ = ["PipelineFamily", "FAMILIES", "family_of"]


@dataclass(frozen=True)
class PipelineFamily:
    """How :func:`run` drives one kind of pipeline.

    Attributes:
        denoisers: the attributes holding the denoising network(s): the first is required, the others (Wan 2.2's
            ``transformer_2``) are chunked too when present.
        autoencoder: the attribute holding the autoencoder whose ``decode`` is intercepted.
        expand: ``(call_kwargs, N) -> (pipeline call arguments for B·N rows, number of output items)``.
        to_latent_space: ``(pipe, z) -> x``: the decoder's input back in the scheduler's latent space, spatial.
        layout: ``(pipe, expanded call arguments) -> layout`` for :func:`apply_patch`, or None for spatial latents.
        output: the attribute of the pipeline's output holding the images (``frames`` for video).
        not_per_row: denoiser keyword arguments that are never split by ``max_batch_size``.
    """

    denoisers: Tuple[str, ...]
    autoencoder: str
    expand: Callable[[Dict[str, Any], int], Expanded]
    to_latent_space: Callable[[Any, torch.Tensor], torch.Tensor]
    layout: Optional[Callable[[Any, Dict[str, Any]], Any]] = None
    output: str = "images"
    not_per_row: Tuple[str, ...] = ()


_PROMPTS = ("prompt", "prompt_embeds", "negative_prompt", "negative_prompt_embeds")
_POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_IMAGES = ("image", "mask_image", "masked_image_latents")
_IP_ADAPTER = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
               "negative_ip_adapter_image_embeds")
_NEEDS_PROMPT = (("prompt", "prompt_embeds"),)


def _text_family(batch_args: Sequence[str], required=_NEEDS_PROMPT, per_prompt_arg: str = "num_images_per_prompt"):
    def expand(call_kwargs: Dict[str, Any], n: int) -> Expanded:
        return expand_inputs(
            call_kwargs, n, batch_args=batch_args, required=required, per_prompt_arg=per_prompt_arg,
            unsupported=_IP_ADAPTER,
        )

    return expand


def _config(pipe: Any, name: str) -> Any:
    return getattr(pipe.vae.config, name, None)


def _unchanged(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    return z


def _scaled(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    scale = float(_config(pipe, "scaling_factor") or 1.0)
    return z * scale if scale != 1.0 else z


def _sdxl_latent_space(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    mean, std = _config(pipe, "latents_mean"), _config(pipe, "latents_std")
    if mean is None or std is None:
        return _scaled(pipe, z)
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mean = torch.tensor(mean).view(shape).to(z.device, z.dtype)
    std = torch.tensor(std).view(shape).to(z.device, z.dtype)
    return (z - mean) * _config(pipe, "scaling_factor") / std


def _shifted(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    return (z - _config(pipe, "shift_factor")) * _config(pipe, "scaling_factor")


def _wan_latent_space(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mean = torch.tensor(_config(pipe, "latents_mean")).view(shape).to(z.device, z.dtype)
    inverse_std = 1.0 / torch.tensor(_config(pipe, "latents_std")).view(shape).to(z.device, z.dtype)  # as Wan has it
    return (z - mean) * inverse_std


def _flux_layout(pipe: Any, kwargs: Dict[str, Any]) -> Any:
    """Flux packs 2x2 latent patches into tokens; the latent grid follows the call's height and width exactly as
    the pipeline computes it (its default size where they are not given)."""
    from .layouts import packed_2x2

    default = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = kwargs.get("height") or default, kwargs.get("width") or default
    grid = pipe.vae_scale_factor * 2
    return packed_2x2(2 * (int(height) // grid), 2 * (int(width) // grid))


_SD = PipelineFamily(("unet",), "vae", _text_family(_PROMPTS + _IMAGES), _scaled)
_SDXL = PipelineFamily(
    ("unet",), "vae", _text_family(_PROMPTS + _POOLED + ("prompt_2", "negative_prompt_2") + _IMAGES),
    _sdxl_latent_space,
)
_FLUX = PipelineFamily(
    ("transformer",), "vae", _text_family(_PROMPTS + _POOLED + ("prompt_2", "negative_prompt_2") + _IMAGES),
    _shifted, layout=_flux_layout, not_per_row=("img_ids", "txt_ids"),
)

# Pipeline class name (or a base class's) -> its family.
FAMILIES: Dict[str, PipelineFamily] = {
    "LDMSuperResolutionPipeline": PipelineFamily(("unet",), "vqvae", expand_ldm_sr, _unchanged),
    "StableDiffusionPipeline": _SD,
    "StableDiffusionImg2ImgPipeline": _SD,
    "StableDiffusionInpaintPipeline": _SD,
    "StableDiffusionUpscalePipeline": PipelineFamily(
        ("unet",), "vae", _text_family(_PROMPTS + ("image",), required=_NEEDS_PROMPT + (("image",),)), _scaled
    ),
    "StableDiffusionXLPipeline": _SDXL,
    "StableDiffusionXLImg2ImgPipeline": _SDXL,
    "StableDiffusionXLInpaintPipeline": _SDXL,
    "StableDiffusion3Pipeline": PipelineFamily(
        ("transformer",), "vae",
        _text_family(_PROMPTS + _POOLED + ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")),
        _shifted,
    ),
    "FluxPipeline": _FLUX,
    "FluxImg2ImgPipeline": _FLUX,
    "FluxFillPipeline": _FLUX,
    "WanPipeline": PipelineFamily(
        ("transformer", "transformer_2"), "vae", _text_family(_PROMPTS, per_prompt_arg="num_videos_per_prompt"),
        _wan_latent_space, output="frames",
    ),
    # kds_hook.sr's pixel-space model: its latents are the scaled residuals; pipe.decoder adds the bicubic image
    "KDSSuperResolutionPipeline": PipelineFamily(("unet",), "decoder", expand_kds_sr, _unchanged),
}


def family_of(pipe: Any) -> Tuple[str, PipelineFamily]:
    """The supported class name along ``pipe``'s MRO (most derived first) and its family; ValueError otherwise."""
    for cls in type(pipe).__mro__:  # an inpaint pipeline is not taken for its base
        if cls.__name__ in FAMILIES:
            return cls.__name__, FAMILIES[cls.__name__]
    raise ValueError(
        f"run() does not support {type(pipe).__name__}; supported pipelines: {', '.join(FAMILIES)} "
        "(for others: apply_patch, num_images_per_prompt=N, output_type='latent' and kds.select; see "
        "docs/diffusers.md, 'Other pipelines')"
    )
