"""Expanding a pipeline call's inputs to N particles each, for :func:`~kds_hook.diffusers.run`.

Every per-input argument (prompts, their embeddings, pooled embeddings, images, masks) is repeated N times,
contiguously, so that the particles of one input are consecutive rows of the pipeline's batch; the pipeline then
runs with one image per prompt on that B·N batch. Inputs are repeated here rather than through the pipeline's
``num_images_per_prompt`` because img2img and inpaint pipelines tile images (i0, i1, i0, i1, ...) while they
repeat prompts contiguously.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, Sequence, Tuple

import torch

__all__ = ["expand_generator", "expand_inputs", "expand_ldm_sr", "check_latents"]

Expanded = Tuple[Dict[str, Any], int]  # (the pipeline's call arguments, the number of output items)


def _has_batch_dim(name: str, value: Any) -> bool:
    """Lists and tensors/arrays with a leading batch dim hold one entry per input; anything else is one entry.

    Prompt embeddings are (B, seq_len, dim), pooled ones (B, dim), masked-image latents always batched (Flux Fill's
    are packed to 3 dims); images and masks are batched when 4-D (a single (C, H, W) image is one entry).
    """
    if isinstance(value, (list, tuple)):
        return True
    if name.endswith("pooled_prompt_embeds"):
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise ValueError(f"{name} must be a tensor (B, dim)")
        return True
    if name.endswith("prompt_embeds"):
        if not isinstance(value, torch.Tensor) or value.ndim != 3:
            raise ValueError(f"{name} must be a tensor (B, seq_len, dim)")
        return True
    if name == "masked_image_latents":
        return getattr(value, "ndim", 0) >= 1
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


def expand_inputs(
    call_kwargs: Dict[str, Any],
    n: int,
    *,
    batch_args: Sequence[str],
    required: Iterable[Sequence[str]],
    per_prompt_arg: str = "num_images_per_prompt",
    unsupported: Sequence[str] = (),
) -> Expanded:
    """The call arguments for B inputs x M outputs each x N particles, and B·M.

    ``batch_args`` hold 1 or B entries each (a single entry serves every input); of each group in ``required`` at
    least one must be given; ``per_prompt_arg`` (``num_images_per_prompt`` or ``num_videos_per_prompt``) is M and
    becomes 1 in the call.
    """
    kwargs = dict(call_kwargs)
    for name in unsupported:
        if kwargs.get(name) is not None:
            raise ValueError(f"run() does not expand {name}; repeat the inputs yourself and use apply_patch")
    per_input = kwargs.pop(per_prompt_arg, None)
    per_input = 1 if per_input is None else per_input
    if isinstance(per_input, bool) or not isinstance(per_input, numbers.Integral) or per_input < 1:
        raise ValueError(f"{per_prompt_arg} must be a positive int, got {per_input!r}")
    counts = {name: _count(name, kwargs[name]) for name in batch_args if kwargs.get(name) is not None}
    for group in required:
        if not any(name in counts for name in group):
            raise ValueError(f"give {' or '.join(group)}")
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
    kwargs[per_prompt_arg] = 1
    check_latents(kwargs, rows, items, n)
    expand_generator(kwargs, (inputs, items, rows))
    return kwargs, items


def expand_ldm_sr(call_kwargs: Dict[str, Any], n: int) -> Expanded:
    """LDMSuperResolutionPipeline: ``image`` (PIL, list of PIL of one size, or a (B, 3, h, w) tensor) to B·N rows."""
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
    check_latents(kwargs, items * n, items, n)
    expand_generator(kwargs, (items, items * n))
    return kwargs, items


def expand_kds_sr(call_kwargs: Dict[str, Any], n: int) -> Expanded:
    """kds_hook.sr's KDSSuperResolutionPipeline: ``image`` (PIL, list of PIL of one size, uint8 array or
    (B, 3, h, w) tensor in [-1, 1]) to B·N rows, converted as the pipeline itself converts it."""
    from ..sr.pipeline import preprocess

    kwargs = dict(call_kwargs)
    if kwargs.get("image") is None:
        raise ValueError("KDSSuperResolutionPipeline needs image=")
    batch = preprocess(kwargs["image"])
    items = batch.shape[0]
    kwargs["image"] = batch.repeat_interleave(n, dim=0)
    check_latents(kwargs, items * n, items, n)
    expand_generator(kwargs, (items, items * n))
    return kwargs, items


def check_latents(kwargs: Dict[str, Any], rows: int, items: int, n: int) -> None:
    latents = kwargs.get("latents")
    if latents is not None and latents.shape[0] != rows:
        raise ValueError(
            f"latents has {latents.shape[0]} rows; it must hold {items} item(s) x N={n} particles = {rows} rows"
        )


def expand_generator(kwargs: Dict[str, Any], allowed: Tuple[int, ...]) -> None:
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
