"""Latent layouts: how a scheduler's sample is viewed as (B·N, C, *spatial) for the patch-wise mean shift.

KDS cuts x0 into spatial patches, so it needs the latent's spatial layout. Most pipelines hand the scheduler
latents that are already spatial: (B, C, H, W) images, (B, C, F, H, W) videos. Flux, Qwen-Image, Chroma and
other transformer pipelines *pack* the latent into tokens first, (B, H/2·W/2, 4·C), each token holding a 2x2
block of latent pixels; their schedulers step on the packed tensor. A layout converts between the two:

- ``to_spatial(x)``: the scheduler's layout -> (B·N, C, *spatial) (1 to 3 spatial dims).
- ``from_spatial(x, like)``: back to ``like``'s layout, with ``like``'s shape and dtype.

Any object with these two methods is a layout (:class:`Layout`); ``apply_patch(..., layout=...)`` takes one.
The rows (the B·N particle axis) must pass through unchanged. The mean shift then sees exactly the tensor the
unpacked latent would be, so steering a packed latent with its layout is the same computation, value for value,
as steering the unpacked latent.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, runtime_checkable

import torch

__all__ = ["SPATIAL", "VIDEO", "Layout", "PackedLayout", "SpatialLayout", "packed_2x2"]


@runtime_checkable
class Layout(Protocol):
    """What ``apply_patch(..., layout=...)`` accepts: any object with these two methods."""

    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The scheduler's layout -> (B·N, C, *spatial), the rows unchanged."""
        ...

    def from_spatial(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B·N, C, *spatial) -> ``like``'s layout, shape and dtype."""
        ...


class SpatialLayout:
    """The identity: the scheduler's sample already is (B·N, C, *spatial) (images, and (B, C, F, H, W) videos)."""

    def __repr__(self) -> str:
        return "SPATIAL"

    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_spatial(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


#: The default layout: (B·N, C, H, W) latents, or any (B·N, C, *spatial) with 1 to 3 spatial dims.
SPATIAL = SpatialLayout()

#: Video latents (B·N, C, F, H, W) are already spatial, with three spatial dims (frames, height, width), so their
#: layout is :data:`SPATIAL` itself. An int ``KDS(patch_size=p)`` then cuts p x p x p blocks across frames; give
#: ``patch_size=(1, p, p)`` for per-frame p x p patches. Video packed into tokens (LTX-Video) takes
#: ``PackedLayout(height, width, patch, frames=F, patch_t=pt)``.
VIDEO = SPATIAL


class PackedLayout:
    """Latents packed into tokens of patches, as diffusers' ``_pack_latents`` does (images and, with ``frames``, video).

    Images: the packed tensor is (B, (H/p)·(W/p), C·p·p); token (i, j) (row-major over the (H/p, W/p) grid)
    holds the p x p block at rows i·p.., columns j·p.., its features ordered channel-major: feature
    c·p·p + dy·p + dx is channel c at offset (dy, dx). ``height`` and ``width`` are the latent grid's (the
    unpacked latent's H and W), not the image's: for Flux at 1024x1024 with its 8x autoencoder, 128 each.

    Video (``frames`` given, as LTX-Video packs): (B, (F/pt)·(H/p)·(W/p), C·pt·p·p) <-> (B, C, F, H, W), tokens
    row-major over (frame, row, column) blocks and features channel-major over (pt, p, p).
    """

    def __init__(self, height: int, width: int, patch: int = 2, *, frames: Optional[int] = None, patch_t: int = 1):
        named = [("height", height), ("width", width), ("patch", patch), ("patch_t", patch_t)]
        if frames is not None:
            named.append(("frames", frames))
        for name, value in named:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.height, self.width, self.patch, self.frames, self.patch_t = height, width, patch, frames, patch_t
        self.sizes = (height, width) if frames is None else (frames, height, width)
        self.patches = (patch, patch) if frames is None else (patch_t, patch, patch)
        if any(size % p for size, p in zip(self.sizes, self.patches)):
            raise ValueError(
                f"the latent grid {'x'.join(map(str, self.sizes))} is not divisible by the packing patch "
                f"{'x'.join(map(str, self.patches))}: the sizes are the unpacked latent's (e.g. "
                "2 * (image_height // (vae_scale_factor * 2)) for Flux)"
            )
        self.grid = tuple(size // p for size, p in zip(self.sizes, self.patches))
        self.block = math.prod(self.patches)

    def __repr__(self) -> str:
        video = "" if self.frames is None else f", frames={self.frames}, patch_t={self.patch_t}"
        return f"PackedLayout(height={self.height}, width={self.width}, patch={self.patch}{video})"

    def _check_packed(self, x: torch.Tensor) -> None:
        tokens = math.prod(self.grid)
        if x.ndim != 3 or x.shape[1] != tokens or x.shape[2] % self.block:
            raise ValueError(
                f"{self!r} expects packed latents (B, {tokens}, C*{self.block}), got shape {tuple(x.shape)}; "
                "check the latent sizes the layout was built with"
            )

    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed(x)
        k = len(self.sizes)
        rows, _, features = x.shape
        channels = features // self.block
        blocks = x.reshape(rows, *self.grid, channels, *self.patches)  # (B, *grid, C, *patch)
        # -> (B, C, grid_1, patch_1, grid_2, patch_2, ...); reshape copies into a contiguous (B, C, *sizes)
        order = [0, k + 1] + [d for i in range(k) for d in (1 + i, k + 2 + i)]
        return blocks.permute(order).reshape(rows, channels, *self.sizes)

    def from_spatial(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self._check_packed(like)
        k = len(self.sizes)
        rows, channels = x.shape[:2]
        if tuple(x.shape) != (like.shape[0], like.shape[2] // self.block, *self.sizes):
            raise ValueError(f"{self!r} cannot pack shape {tuple(x.shape)} into the layout of {tuple(like.shape)}")
        blocks = x.reshape(rows, channels, *[v for g, p in zip(self.grid, self.patches) for v in (g, p)])
        order = [0] + [2 + 2 * i for i in range(k)] + [1] + [3 + 2 * i for i in range(k)]  # (B, *grid, C, *patch)
        return blocks.permute(order).reshape(like.shape).to(like.dtype)


def packed_2x2(height: int, width: int) -> PackedLayout:
    """The layout of Flux, Chroma, Qwen-Image (and others using ``_pack_latents``): 2x2 latent pixels per token.

    ``height`` and ``width`` are the latent grid's, i.e. ``2 * (image_size // (vae_scale_factor * 2))``.
    """
    return PackedLayout(height, width, 2)
