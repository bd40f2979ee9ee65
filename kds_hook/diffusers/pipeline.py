"""Particles for a diffusers pipeline: expand each input to N particles, steer, select in latent space, decode once.

:func:`run` wraps one pipeline call. It repeats every input N times (contiguous, so the particles of one input
form one group for :class:`~kds_hook.KDS`), patches the scheduler for the call (:func:`apply_patch`), picks one
particle per input from the final latents (Eq. 9, :meth:`KDS.select`) where the pipeline hands them to its VAE,
and decodes only the chosen latent. The pipeline's own post-processing (clamping, denormalising, PIL conversion,
safety checker, inpainting overlay) then runs unchanged on the decoded images.

Duck-typed: diffusers is imported only inside :func:`run` (for the LDM super-resolution pre-processing).
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..kds import KDS
from .patch import apply_patch, patched_kds, remove_patch

__all__ = ["KDSPipelineOutput", "SUPPORTED_PIPELINES", "run"]

# Pipeline class (or a base class of it) -> the attribute holding its autoencoder.
SUPPORTED_PIPELINES: Dict[str, str] = {
    "LDMSuperResolutionPipeline": "vqvae",
    "StableDiffusionPipeline": "vae",
    "StableDiffusionImg2ImgPipeline": "vae",
    "StableDiffusionInpaintPipeline": "vae",
}

# Stable Diffusion call arguments that hold one entry per input (a single entry serves every input).
_SD_BATCH_ARGS = (
    "prompt",
    "prompt_embeds",
    "negative_prompt",
    "negative_prompt_embeds",
    "image",
    "mask_image",
    "masked_image_latents",
)
_UNSUPPORTED_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds")


@dataclass
class KDSPipelineOutput:
    """What :func:`run` returns, one entry per output item (B = inputs x ``num_images_per_prompt``).

    Attributes:
        images: the selected particle per item, decoded and post-processed as the pipeline's ``output_type`` says
            (a list of PIL images by default; an array or tensor with a leading B; the latents for "latent").
        latents: (B, C, h, w) the selected final latents, in the scheduler's latent space (Stable Diffusion: the
            decoder's input times the VAE's scaling_factor, which may differ from the scheduler's last output in
            the last bit).
        index: (B,) the selected particle's index in 0..N-1.
        particles: (B, N, C, h, w) all final latents, with ``return_particles=True``; else None.
        particle_images: all N decoded particles per item (a list of B lists of N images, or an array/tensor with
            leading dims (B, N)), with ``return_particles=True``; else None.
        nsfw_content_detected: the pipeline's safety-checker flag of each selected image (B,), or None where the
            pipeline has no safety checker (or reports none).
        particle_nsfw_content_detected: the flags of all particles, B lists of N, with ``return_particles=True``
            and a safety checker; else None.
    """

    images: Any
    latents: torch.Tensor
    index: torch.Tensor
    particles: Optional[torch.Tensor] = None
    particle_images: Any = None
    nsfw_content_detected: Optional[List[bool]] = None
    particle_nsfw_content_detected: Optional[List[List[bool]]] = None


def run(
    pipe: Any,
    kds: KDS,
    *,
    max_batch_size: Optional[int] = None,
    return_particles: bool = False,
    **call_kwargs: Any,
) -> KDSPipelineOutput:
    """Calls ``pipe(**call_kwargs)`` with ``kds.num_particles`` KDS-steered particles per input; returns one image each.

    Supported: LDMSuperResolutionPipeline (``image``: a PIL image, a list of PIL images of one size, or a tensor
    (B, 3, h, w) in [-1, 1]) and StableDiffusionPipeline / StableDiffusionImg2ImgPipeline /
    StableDiffusionInpaintPipeline (``prompt`` or ``prompt_embeds``, ``negative_prompt(_embeds)``, ``image``,
    ``mask_image``, ``masked_image_latents``; each holds 1 or B entries, a single one serving every input; a
    single negative prompt string also serves a list of prompts). Subclasses count as their base. Inpainting with
    ``padding_mask_crop`` takes one PIL image and one PIL mask (as in diffusers), which then serve every row.

    Particles: each input is repeated N times, contiguously, and the pipeline runs on the B*N batch. Initial
    noise comes from ``generator`` exactly as in the pipeline: one ``torch.Generator`` draws the whole (B*N, ...)
    noise, so ``run(pipe, KDS(strength=0.0, ...), generator=torch.Generator().manual_seed(s), ...)`` gives the
    plain sampler's particles from the same noise as the KDS run with the same seed (a paired comparison). A list
    of generators may hold one per input (each input's particles then draw from its own generator, in turn) or
    one per particle. ``latents``, when given, must already hold B*N rows.

    ``num_images_per_prompt=M`` (Stable Diffusion) gives M independent outputs per input, each from its own
    ensemble of N particles (M*N pipeline rows per input). Stable Diffusion inputs are repeated here, not through
    the pipeline's num_images_per_prompt, because img2img and inpaint tile images (i0, i1, i0, i1, ...) while
    they repeat prompts contiguously.

    Selection: where the pipeline decodes its final (B*N) latents, :meth:`KDS.select` picks one particle per item
    in latent space (Stable Diffusion latents are scaled back by the VAE's scaling_factor first) and only those
    B latents are decoded. ``return_particles=True`` decodes all B*N instead and returns them too.

    Memory: ``max_batch_size`` runs the denoiser over the batch in chunks of at most that many rows (with
    classifier-free guidance the UNet batch is 2*B*N). Every tensor argument whose first dim is the batch is
    split; others pass through. Steering still sees the whole batch, and the result is the unchunked one. The
    autoencoder is not chunked: use ``pipe.vae.enable_slicing()`` to encode the B*N repeated images of
    img2img/inpaint, or to decode all particles with ``return_particles``, one at a time.

    The scheduler is patched for the call only: afterwards the pipeline is exactly as before (also on error). If
    the scheduler already carried a KDS patch, ``kds`` replaces it for the call and the earlier patch is
    re-applied afterwards.

    Raises:
        TypeError: ``kds`` is not a KDS; ``return_dict`` was given (run always returns a KDSPipelineOutput).
        ValueError: unsupported pipeline, or one missing its denoiser or autoencoder; unsupported scheduler or
            prediction type (from :func:`apply_patch`); inputs, generators or latents whose counts do not match.
    """
    if not isinstance(kds, KDS):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, numbers.Integral) or max_batch_size < 1
    ):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
    if "return_dict" in call_kwargs:
        raise TypeError("run() always returns a KDSPipelineOutput; do not pass return_dict")
    kind, vae_name = _pipeline_kind(pipe)
    for component in ("unet", vae_name, "scheduler"):
        if getattr(pipe, component, None) is None:
            raise ValueError(
                f"{type(pipe).__name__} has no {component} (None): load the pipeline with all its components and "
                "their weights (from_pretrained on a complete model directory or Hub id)"
            )
    n = kds.num_particles
    if kind == "LDMSuperResolutionPipeline":
        kwargs, items = _expand_ldm_sr(call_kwargs, n)
        scale = 1.0  # the LDM-SR pipeline decodes its latents as they are
    else:
        kwargs, items = _expand_sd(call_kwargs, n)
        scale = float(getattr(getattr(pipe, vae_name).config, "scaling_factor", 1.0))
    rows = items * n

    capture = _DecodeCapture(kds, rows, scale, return_particles)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_kds_patch(pipe, kds))
        stack.enter_context(_override(getattr(pipe, vae_name), "decode", capture.wrap))
        if max_batch_size is not None:
            stack.enter_context(_override(pipe.unet, "forward", lambda f: _chunked(f, max_batch_size)))
        output = pipe(**kwargs, return_dict=True)
    return capture.result(output.images, getattr(output, "nsfw_content_detected", None), items, n)


def _pipeline_kind(pipe: Any) -> Tuple[str, str]:
    for cls in type(pipe).__mro__:  # most derived first: an inpaint pipeline is not taken for its base
        if cls.__name__ in SUPPORTED_PIPELINES:
            return cls.__name__, SUPPORTED_PIPELINES[cls.__name__]
    raise ValueError(
        f"run() does not support {type(pipe).__name__}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)} "
        "(for others, repeat the inputs yourself and use kds_hook.diffusers.apply_patch)"
    )


# ----------------------------------------------------------------------------------------------- expanding inputs


def _has_batch_dim(name: str, value: Any) -> bool:
    """Lists, prompt embeddings (B, seq_len, dim) and 4-D image tensors/arrays (B, ...) hold one entry per input."""
    if isinstance(value, (list, tuple)):
        return True
    if name.endswith("prompt_embeds"):
        if not isinstance(value, torch.Tensor) or value.ndim != 3:
            raise ValueError(f"{name} must be a tensor (B, seq_len, dim)")
        return True
    return getattr(value, "ndim", 0) == 4


def _count(name: str, value: Any) -> int:
    if not _has_batch_dim(name, value):
        return 1
    if len(value) == 0:
        raise ValueError(f"{name} is empty")
    return len(value)


def _repeat(name: str, value: Any, rows: int) -> Any:
    """``value`` with each entry repeated, contiguously, to fill ``rows`` rows (one entry serves every row)."""
    if not _has_batch_dim(name, value):
        return [value] * rows  # a string, a PIL image or a single (C, H, W) image
    reps = rows // len(value)
    if isinstance(value, (list, tuple)):
        return [entry for entry in value for _ in range(reps)]
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(reps, dim=0)
    import numpy as np

    return np.repeat(value, reps, axis=0)


def _expand_sd(call_kwargs: Dict[str, Any], n: int) -> Tuple[Dict[str, Any], int]:
    kwargs = dict(call_kwargs)
    for name in _UNSUPPORTED_ARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"run() does not expand {name}; repeat the inputs yourself and use apply_patch")
    per_input = kwargs.pop("num_images_per_prompt", None)
    per_input = 1 if per_input is None else per_input
    if isinstance(per_input, bool) or not isinstance(per_input, numbers.Integral) or per_input < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {per_input!r}")
    counts = {name: _count(name, kwargs[name]) for name in _SD_BATCH_ARGS if kwargs.get(name) is not None}
    if "prompt" not in counts and "prompt_embeds" not in counts:
        raise ValueError("give prompt or prompt_embeds")
    inputs = max(counts.values())
    wrong = {name: c for name, c in counts.items() if c not in (1, inputs)}
    if wrong:
        listed = ", ".join(f"{name} has {c}" for name, c in counts.items())
        raise ValueError(f"inputs do not match: {listed}; each must hold 1 or {inputs} entries")
    items = inputs * per_input
    rows = items * n
    # A single negative prompt string is repeated too: diffusers refuses a str negative prompt with a list prompt.
    # With padding_mask_crop, diffusers needs the one PIL image and mask as they are; it broadcasts them itself.
    keep = {"image", "mask_image"} if kwargs.get("padding_mask_crop") is not None else set()
    for name in counts:
        if not (name in keep and counts[name] == 1):
            kwargs[name] = _repeat(name, kwargs[name], rows)
    kwargs["num_images_per_prompt"] = 1
    _check_latents(kwargs, rows, items, n)
    _expand_generator(kwargs, (inputs, items, rows))
    return kwargs, items


def _expand_ldm_sr(call_kwargs: Dict[str, Any], n: int) -> Tuple[Dict[str, Any], int]:
    import PIL.Image
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import preprocess

    kwargs = dict(call_kwargs)
    image = kwargs.get("image")
    if image is None:
        raise ValueError("LDMSuperResolutionPipeline needs image=")
    images = image if isinstance(image, (list, tuple)) else [image]
    tensors = []
    for entry in images:
        if isinstance(entry, torch.Tensor):
            tensors.append(entry if entry.ndim == 4 else entry.unsqueeze(0))
        elif isinstance(entry, PIL.Image.Image):
            tensors.append(preprocess(entry))  # the pipeline's own conversion, so a PIL input is bit-identical
        else:
            raise TypeError(f"image must be a PIL image, a list of them, or a tensor (B, 3, h, w); got {type(entry)}")
    sizes = {tuple(t.shape[1:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"images of one call must share their size (after rounding down to 32 pixels), got {sizes}")
    batch = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    items = batch.shape[0]
    kwargs["image"] = batch.repeat_interleave(n, dim=0)
    _check_latents(kwargs, items * n, items, n)
    _expand_generator(kwargs, (items, items * n))
    return kwargs, items


def _check_latents(kwargs: Dict[str, Any], rows: int, items: int, n: int) -> None:
    latents = kwargs.get("latents")
    if latents is not None and latents.shape[0] != rows:
        raise ValueError(
            f"latents has {latents.shape[0]} rows; it must hold {items} item(s) x N={n} particles = {rows} rows"
        )


def _expand_generator(kwargs: Dict[str, Any], allowed: Tuple[int, ...]) -> None:
    """A list of generators, one per input, per item or per row, becomes one per row (the last of ``allowed``)."""
    generator = kwargs.get("generator")
    if not isinstance(generator, (list, tuple)):
        return
    if len(generator) not in allowed:
        raise ValueError(
            f"a list of generators must hold one per input, per output item or per particle "
            f"({' or '.join(map(str, sorted(set(allowed))))}); got {len(generator)}"
        )
    # A generator repeated in the list draws the noise of its input's particles one after the other.
    kwargs["generator"] = [g for g in generator for _ in range(allowed[-1] // len(generator))]


# ------------------------------------------------------------------------------- temporary overrides of methods


@contextlib.contextmanager
def _override(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Sets ``obj.name = make(obj.name)`` on the instance for the block; restores exactly what was there."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, make(getattr(obj, name)))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _kds_patch(pipe: Any, kds: KDS) -> Iterator[None]:
    earlier = patched_kds(pipe)
    apply_patch(pipe, kds)
    try:
        yield
    finally:
        if earlier is None:
            remove_patch(pipe)
        else:
            apply_patch(pipe, earlier)


# ---------------------------------------------------------------------------------------------------- chunking


def _split(value: Any, batch: int, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        parts = [_split(v, batch, start, stop) for v in value]
        return type(value)(parts) if isinstance(value, tuple) else parts
    if isinstance(value, dict):
        return {k: _split(v, batch, start, stop) for k, v in value.items()}
    return value


def _concat(parts: List[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.ndim:
        return torch.cat(parts)
    if isinstance(first, dict):  # diffusers' BaseOutput is an ordered dict and a dataclass
        return type(first)(**{k: _concat([p[k] for p in parts]) for k in first.keys()})
    if isinstance(first, (list, tuple)):
        joined = [_concat([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, tuple) else joined
    return first  # not per row (None, a scalar): the first chunk's


def _chunked(forward: Callable, max_batch_size: int) -> Callable:
    """``forward`` run over row chunks of at most ``max_batch_size``, outputs concatenated along the batch."""

    def chunked_forward(*args: Any, **kwargs: Any) -> Any:
        batch = (args[0] if args else kwargs["sample"]).shape[0]
        if batch <= max_batch_size:
            return forward(*args, **kwargs)
        parts = []
        for start in range(0, batch, max_batch_size):
            stop = start + max_batch_size
            parts.append(forward(*_split(args, batch, start, stop), **_split(kwargs, batch, start, stop)))
        return _concat(parts)

    return chunked_forward


# --------------------------------------------------------------------------------------- selection at decoding


class _DecodeCapture:
    """Wraps the autoencoder's decode: selects per item from the B*N final latents and decodes the chosen B."""

    def __init__(self, kds: KDS, rows: int, scale: float, decode_all: bool):
        self.kds, self.rows, self.scale, self.decode_all = kds, rows, scale, decode_all
        self.latents: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None

    def _select(self, latents: torch.Tensor) -> torch.Tensor:
        self.latents = latents
        self.index = self.kds.select(latents).index
        return self.index

    def wrap(self, decode: Callable) -> Callable:
        def decode_selected(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if z.shape[0] != self.rows:  # not the final particle batch: leave it alone
                return decode(z, *args, **kwargs)
            index = self._select(z * self.scale if self.scale != 1.0 else z)
            if self.decode_all:
                return decode(z, *args, **kwargs)
            grouped = z.reshape(-1, self.kds.num_particles, *z.shape[1:])
            return decode(grouped[torch.arange(grouped.shape[0], device=z.device), index.to(z.device)], *args, **kwargs)

        return decode_selected

    def result(self, images: Any, nsfw: Optional[List[bool]], items: int, n: int) -> KDSPipelineOutput:
        if self.index is None:  # output_type="latent": nothing was decoded, the images are the latents
            if not isinstance(images, torch.Tensor):
                raise RuntimeError("the pipeline returned images without calling its autoencoder's decode")
            self._select(images)
            decoded_all = True
        else:
            decoded_all = self.decode_all
        index = self.index
        picks = (torch.arange(items) * n + index.cpu()).tolist()
        particle_images = particle_nsfw = None
        if decoded_all:
            if self.decode_all:
                particle_images = _group(images, items, n)
                particle_nsfw = None if nsfw is None else _group(list(nsfw), items, n)
            images = [images[i] for i in picks] if isinstance(images, list) else images[picks]
            nsfw = None if nsfw is None else [nsfw[i] for i in picks]
        grouped = self.latents.reshape(items, n, *self.latents.shape[1:])
        return KDSPipelineOutput(
            images=images,
            latents=grouped[torch.arange(items, device=grouped.device), index.to(grouped.device)],
            index=index,
            particles=grouped if self.decode_all else None,
            particle_images=particle_images,
            nsfw_content_detected=None if nsfw is None else list(nsfw),
            particle_nsfw_content_detected=particle_nsfw,
        )


def _group(images: Any, items: int, n: int) -> Any:
    if isinstance(images, list):
        return [images[i * n : (i + 1) * n] for i in range(items)]
    return images.reshape(items, n, *images.shape[1:])
