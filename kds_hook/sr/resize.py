"""The bicubic 4x resampling that the built-in model is trained and run with (pure torch).

Training, the pipeline and every evaluation use these two functions, so "LR made by bicubic downsampling" and
"the bicubic upsampling the model sees" mean the same thing everywhere. Images are (B, 3, H, W) float tensors in
[-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SCALE", "bicubic_downsample", "bicubic_upsample", "quantize"]

SCALE = 4  # the model's upscaling factor


def _check(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor (B, C, H, W), got {type(image).__name__}")
    if image.ndim != 4:
        raise ValueError(f"expected a tensor (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"expected a floating-point tensor in [-1, 1], got {image.dtype}")


def bicubic_upsample(image: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """``image`` ``factor`` times larger by bicubic interpolation (half-pixel centres), computed in float32 at
    least and returned in the input's dtype. This is the conditioning the model sees and the base it adds its
    residual to."""
    _check(image)
    work = image.to(torch.promote_types(image.dtype, torch.float32))
    return F.interpolate(work, scale_factor=factor, mode="bicubic", align_corners=False).to(image.dtype)


def bicubic_downsample(image: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """``image`` ``factor`` times smaller by antialiased bicubic resampling (the kernel widened by ``factor``, as
    PIL's and MATLAB's ``imresize`` do); height and width must be multiples of ``factor``. Used to make the
    low-resolution inputs of training pairs and of evaluations; the result is not quantized (see
    :func:`quantize`)."""
    _check(image)
    height, width = image.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    work = image.to(torch.promote_types(image.dtype, torch.float32))
    small = F.interpolate(
        work, size=(height // factor, width // factor), mode="bicubic", antialias=True, align_corners=False
    )
    return small.to(image.dtype)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """``image`` in [-1, 1] clamped and rounded to the 256 levels of an 8-bit image (what a saved LR file holds)."""
    _check(image)
    return ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
