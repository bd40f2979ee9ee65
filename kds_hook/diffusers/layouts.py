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

from typing import Protocol, runtime_checkable

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
#: ``patch_size=(1, p, p)`` for per-frame p x p patches.
VIDEO = SPATIAL


class PackedLayout:
    """Latents packed into tokens of ``patch x patch`` latent pixels, as diffusers' ``_pack_latents`` does.

    The packed tensor is (B, (H/p)·(W/p), C·p·p); token (i, j) (row-major over the (H/p, W/p) grid) holds the
    p x p block at rows i·p.., columns j·p.., its features ordered channel-major: feature c·p·p + dy·p + dx is
    channel c at offset (dy, dx). ``height`` and ``width`` are the latent grid's (the unpacked latent's H and W),
    not the image's: for Flux at 1024x1024 with its 8x autoencoder, ``height = width = 128``.
    """

    def __init__(self, height: int, width: int, patch: int = 2):
        for name, value in (("height", height), ("width", width), ("patch", patch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if height % patch or width % patch:
            raise ValueError(
                f"the latent grid {height}x{width} is not divisible by the packing patch {patch}: height and width "
                "are the unpacked latent's (e.g. 2 * (image_height // (vae_scale_factor * 2)) for Flux)"
            )
        self.height, self.width, self.patch = height, width, patch

    def __repr__(self) -> str:
        return f"PackedLayout(height={self.height}, width={self.width}, patch={self.patch})"

    def _check_packed(self, x: torch.Tensor) -> None:
        tokens = (self.height // self.patch) * (self.width // self.patch)
        if x.ndim != 3 or x.shape[1] != tokens or x.shape[2] % (self.patch * self.patch):
            raise ValueError(
                f"{self!r} expects packed latents (B, {tokens}, C*{self.patch * self.patch}), got shape "
                f"{tuple(x.shape)}; check the latent height and width the layout was built with"
            )

    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed(x)
        p = self.patch
        rows, _, features = x.shape
        blocks = x.reshape(rows, self.height // p, self.width // p, features // (p * p), p, p)
        # (B, H/p, W/p, C, p, p) -> (B, C, H/p, p, W/p, p); reshape copies into a contiguous (B, C, H, W)
        return blocks.permute(0, 3, 1, 4, 2, 5).reshape(rows, features // (p * p), self.height, self.width)

    def from_spatial(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self._check_packed(like)
        p = self.patch
        rows, channels = x.shape[:2]
        if tuple(x.shape) != (like.shape[0], like.shape[2] // (p * p), self.height, self.width):
            raise ValueError(f"{self!r} cannot pack shape {tuple(x.shape)} into the layout of {tuple(like.shape)}")
        blocks = x.reshape(rows, channels, self.height // p, p, self.width // p, p).permute(0, 2, 4, 1, 3, 5)
        return blocks.reshape(like.shape).to(like.dtype)


def packed_2x2(height: int, width: int) -> PackedLayout:
    """The layout of Flux, Chroma, Qwen-Image (and others using ``_pack_latents``): 2x2 latent pixels per token.

    ``height`` and ``width`` are the latent grid's, i.e. ``2 * (image_size // (vae_scale_factor * 2))``.
    """
    return PackedLayout(height, width, 2)
