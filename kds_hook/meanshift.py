"""Patch-wise Gaussian mean shift over an ensemble of particles (the paper's Eq. 7-8, Algorithm 2 lines 5-15).

Convention
----------
For one item, one patch location and particles ``p_1 … p_N`` (each patch flattened to a vector)::

    w_ik = exp(-||p_i - p_k||^2 / (2 h^2))            k over all N particles, i included
    m_i  = sum_k w_ik p_k / sum_k w_ik - p_i
    out_i = p_i + delta * m_i

``h`` is the kernel's standard deviation in the units of x0. The paper writes the kernel as
``G(||.||^2 / h^2)``; with the Gaussian profile ``G(u) = exp(-u / 2)`` that is exactly the kernel above, so
the paper's ``h`` and ours are the same number. minKDS computes ``exp(-(||.|| / b^2)^2 / 2)`` with its
``band_width`` b, so its b acts squared: minKDS's ``band_width=b`` is our ``bandwidth=b**2``
(see :meth:`kds_hook.KDS.from_minkds`).
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from einops import rearrange

from ._checks import (
    BandwidthLike,
    check_bandwidth,
    check_finite,
    check_num_particles,
    check_particle_batch,
    check_patch_size,
    check_strength,
)

__all__ = ["PatchMeanShift", "auto_bandwidth"]

# Largest 1/(2h^2) we use: keeps -0 * inv finite (no NaN) when h underflows; any larger value gives the same
# weights in float32 because exp(-d * 1e30) is already 0 for every representable non-zero d.
_MAX_INV_TWO_H2 = 1e30
_SPATIAL = ("h", "w", "d")


def auto_bandwidth(sq_dists: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Median-heuristic bandwidth per item.

    ``sq_dists`` has shape (B, M): for each item, the squared distances of every distinct particle pair at every
    patch location. Returns h of shape (B,) with ``h^2 = median(sq_dists) / (2 log N)``, which makes the kernel
    weight of a pair at the median distance ``exp(-log N) = 1/N``: a typical neighbour counts as much as the
    particle itself counts against all N of them. It grows with the patch dimension and the data scale, so the
    same setting means the same thing for any latent and patch size.
    """
    median = sq_dists.median(dim=1).values
    return torch.sqrt(median / (2.0 * math.log(num_particles)))


def _segments(size: int, tile: int) -> List[Tuple[int, int, int]]:
    """(start, stop, tile) runs covering [0, size): full tiles, then one smaller tile for the remainder."""
    tile = min(tile, size)
    full = (size // tile) * tile
    runs = [(0, full, tile)] if full else []
    if full < size:
        runs.append((full, size, size - full))
    return runs


class _Region:
    """A box of the spatial grid whose tiles all have the same shape, so it patchifies with one reshape."""

    def __init__(self, slices: Tuple[slice, ...], tiles: Tuple[int, ...]):
        self.slices = slices
        self.tiles = tiles
        spatial = _SPATIAL[: len(tiles)]
        grid = " ".join(f"({s} t{s})" for s in spatial)
        self.to_patches = f"b n c {grid} -> b ({' '.join(spatial)}) n (c {' '.join('t' + s for s in spatial)})"
        self.from_patches = " -> ".join(reversed(self.to_patches.split(" -> ")))
        self.tile_kwargs = {f"t{s}": t for s, t in zip(spatial, tiles)}

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C, *spatial) -> (B, L, N, D)."""
        return rearrange(x[(Ellipsis, *self.slices)], self.to_patches, **self.tile_kwargs)

    def grid_kwargs(self, x_region_shape: Sequence[int]) -> dict:
        spatial = _SPATIAL[: len(self.tiles)]
        sizes = x_region_shape[3:]
        kwargs = dict(self.tile_kwargs)
        kwargs.update({s: size // t for s, size, t in zip(spatial, sizes, self.tiles)})
        kwargs["c"] = x_region_shape[2]
        return kwargs


class PatchMeanShift:
    """Patch-wise Gaussian mean shift over the N particles of each item.

    Args:
        patch_size: side of the non-overlapping square (cubic) tiles, or one size per spatial dim. Where a
            spatial size is not divisible, the last tile along that dim is smaller; nothing is padded.
        bandwidth: the kernel's standard deviation ``h`` in x0 units (a positive float, ``inf`` for a plain
            pull toward the ensemble mean), or ``"auto"`` for the median heuristic of :func:`auto_bandwidth`,
            computed per item and per call.

    Input layout: ``x`` has shape (B*N, C, *spatial) with 0 to 3 spatial dims, or (B*N, D); the N particles of
    item b are rows ``b*N … b*N+N-1`` (the order of ``repeat_interleave`` and of diffusers'
    ``num_images_per_prompt``). Particles of different items never interact.

    After each call, :attr:`last_self_weight` holds the mean self-weight ``w_ii / sum_k w_ik``: near 1, the
    kernel is too narrow and KDS silently does nothing; near 1/N it is a plain pull toward the ensemble mean.
    :attr:`last_bandwidth` holds the h used per item (shape (B,)).
    """

    def __init__(self, patch_size: Union[int, Sequence[int]] = 1, bandwidth: BandwidthLike = 0.3):
        self.patch_size = check_patch_size(patch_size)
        self.bandwidth = check_bandwidth(bandwidth)
        self._self_weight: Optional[torch.Tensor] = None
        self.last_bandwidth: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"PatchMeanShift(patch_size={self.patch_size!r}, bandwidth={self.bandwidth!r})"

    @property
    def last_self_weight(self) -> Optional[float]:
        """Mean self-weight of the last call (None before any call that steered)."""
        return None if self._self_weight is None else float(self._self_weight)

    # ------------------------------------------------------------------ public operations

    def __call__(
        self,
        x: torch.Tensor,
        num_particles: int,
        strength: Union[float, torch.Tensor] = 0.3,
        *,
        check_finite_values: bool = True,
    ) -> torch.Tensor:
        """Returns ``x + strength * shift(x)``, same shape, dtype and device.

        ``strength`` is a float in [0, 1] or a tensor with one value per item. With ``strength == 0`` or
        ``num_particles == 1`` the input tensor itself is returned, bit for bit.
        """
        num_particles = check_num_particles(num_particles)
        strength = check_strength(strength)
        check_particle_batch(x, num_particles)
        if num_particles == 1 or (isinstance(strength, float) and strength == 0.0):
            return x
        if check_finite_values:
            check_finite(x)
        work = x if x.dtype == torch.float64 else x.float()
        shift = self._shift(work, num_particles)
        if isinstance(strength, torch.Tensor):
            per_item = strength.to(device=x.device, dtype=work.dtype).reshape(-1)
            per_row = per_item.repeat_interleave(num_particles) if per_item.numel() > 1 else per_item
            strength = per_row.reshape((-1,) + (1,) * (x.ndim - 1))
        return (work + strength * shift).to(x.dtype)

    def shift(self, x: torch.Tensor, num_particles: int, *, check_finite_values: bool = True) -> torch.Tensor:
        """The mean-shift vectors m (same shape as x, computed in float32 or float64)."""
        num_particles = check_num_particles(num_particles)
        check_particle_batch(x, num_particles)
        if check_finite_values:
            check_finite(x)
        work = x if x.dtype == torch.float64 else x.float()
        if num_particles == 1:
            return torch.zeros_like(work)
        return self._shift(work, num_particles)

    def log_density(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        """Per-particle ensemble log-density, summed over patch locations, shape (B*N,).

        ``sum_j log sum_k exp(-||p_ij - p_kj||^2 / (2 h^2))``, up to a constant shared by the particles of an
        item. Used by ``select_particles(..., method="density")``.
        """
        num_particles = check_num_particles(num_particles)
        check_particle_batch(x, num_particles)
        check_finite(x)
        work = x if x.dtype == torch.float64 else x.float()
        batch = work.shape[0] // num_particles
        if num_particles == 1:
            return torch.zeros(work.shape[0], dtype=work.dtype, device=work.device)
        grouped, regions = self._grouped(work, num_particles)
        sq = [self._sq_dists(region.patches(grouped)) for region in regions]
        inv = self._inv_two_h2(sq, num_particles)
        total = sum((-d * inv).logsumexp(dim=-1).sum(dim=1) for d in sq)  # (B, N)
        return total.reshape(batch * num_particles)

    # ------------------------------------------------------------------ internals

    def _tiles(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        if isinstance(self.patch_size, tuple):
            if len(self.patch_size) != len(spatial):
                raise ValueError(
                    f"patch_size {self.patch_size} has {len(self.patch_size)} entries but x has "
                    f"{len(spatial)} spatial dims"
                )
            return self.patch_size
        return (self.patch_size,) * len(spatial)

    def _grouped(self, x: torch.Tensor, num_particles: int) -> Tuple[torch.Tensor, List[_Region]]:
        """(B*N, C, *spatial) -> (B, N, C, *spatial) and the regions of equal tiles that cover it."""
        if x.ndim == 2:  # (B*N, D): the whole vector is one patch
            x = x.unsqueeze(-1)
            grouped = x.reshape(-1, num_particles, *x.shape[1:])
            return grouped, [_Region((slice(None),), (x.shape[-1],))]
        grouped = x.reshape(-1, num_particles, *x.shape[1:])
        spatial = x.shape[2:]
        per_dim = [_segments(size, tile) for size, tile in zip(spatial, self._tiles(spatial))]
        regions = [
            _Region(tuple(slice(a, b) for a, b, _ in combo), tuple(t for _, _, t in combo))
            for combo in itertools.product(*per_dim)
        ]
        return grouped, regions

    @staticmethod
    def _sq_dists(patches: torch.Tensor) -> torch.Tensor:
        """Pairwise squared distances (B, L, N, N) from patches (B, L, N, D), without an N x N x D tensor.

        Patches are first expressed relative to particle 0 of their location: this removes the common offset
        (less cancellation in the Gram identity), and identical particles give exact zeros.
        """
        centred = patches - patches[:, :, :1]
        gram = centred @ centred.transpose(-1, -2)
        sq_norm = gram.diagonal(dim1=-2, dim2=-1)
        # d_ii = g_ii + g_ii - 2 g_ii is exactly 0 in floating point.
        return (sq_norm.unsqueeze(-1) + sq_norm.unsqueeze(-2) - 2.0 * gram).clamp_min_(0.0)

    def _inv_two_h2(self, sq: List[torch.Tensor], num_particles: int) -> torch.Tensor:
        """1 / (2 h^2), shaped (B, 1, 1, 1) to broadcast over (B, L, N, N)."""
        batch = sq[0].shape[0]
        ref = sq[0]
        if self.bandwidth == "auto":
            rows, cols = torch.triu_indices(num_particles, num_particles, offset=1, device=ref.device)
            pairs = torch.cat([d[:, :, rows, cols].reshape(batch, -1) for d in sq], dim=1)
            h = auto_bandwidth(pairs, num_particles)
        else:
            h = torch.full((batch,), float(self.bandwidth), dtype=ref.dtype, device=ref.device)
        self.last_bandwidth = h
        inv = (0.5 / (h * h)).nan_to_num(nan=_MAX_INV_TWO_H2).clamp(max=_MAX_INV_TWO_H2)
        return inv.reshape(batch, 1, 1, 1)

    def _shift(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        grouped, regions = self._grouped(x, num_particles)
        patch_sets = [region.patches(grouped) for region in regions]
        sq = [self._sq_dists(p) for p in patch_sets]
        inv = self._inv_two_h2(sq, num_particles)

        out = torch.empty_like(grouped)
        self_weight_sum = grouped.new_zeros(())
        count = 0
        for region, patches, d in zip(regions, patch_sets, sq):
            weights = torch.softmax(-d * inv, dim=-1)  # max-subtracted: far-apart particles give no 0/0
            centred = patches - patches[:, :, :1]
            m = weights @ centred - centred
            self_weight_sum = self_weight_sum + weights.diagonal(dim1=-2, dim2=-1).sum()
            count += weights.shape[0] * weights.shape[1] * weights.shape[2]
            region_shape = grouped[(Ellipsis, *region.slices)].shape
            out[(Ellipsis, *region.slices)] = rearrange(m, region.from_patches, **region.grid_kwargs(region_shape))
        self._self_weight = (self_weight_sum / count).detach()
        shift = out.reshape(x.shape)
        return shift
