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
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from einops import rearrange

from ._checks import (
    BandwidthLike,
    check_bandwidth,
    check_finite,
    check_no_autograd,
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

    Exact zeros (locations where particles coincide) are left out of the median, so a region that every particle
    reproduces exactly cannot switch steering off where they differ; with no positive distance h is 0.
    """
    positive = sq_dists.masked_fill(sq_dists <= 0, float("nan"))
    median = positive.nanmedian(dim=1).values.nan_to_num(0.0)  # torch's lower median, as median()
    return torch.sqrt(median / (2.0 * math.log(num_particles)))


def _segments(size: int, tile: int) -> List[Tuple[int, int, int]]:
    """(start, stop, tile) runs covering [0, size): full tiles, then one smaller tile for the remainder."""
    tile = min(tile, size)
    full = (size // tile) * tile
    runs = [(0, full, tile)] if full else []
    if full < size:
        runs.append((full, size, size - full))
    return runs


def _use_matmul(num_particles: int, dim: int) -> bool:
    """Whether a region with patch dimension ``dim`` runs as batched matmuls over locations.

    Matmuls over per-location N x D matrices pay a fixed cost per location, which only wide patches (and, at
    D = 12-16, many particles) amortise; otherwise N x N maps over all locations at once with elementwise ops
    are faster. The rule comes from benchmarks/bench_meanshift.py on CPU (docs/benchmarks.md).
    """
    return dim >= 32 or (dim >= 12 and num_particles >= 32)


class _Region:
    """A box of the spatial grid whose tiles all have the same shape, so it patchifies with one rearrange.

    Small patches (see :func:`_use_matmul`) use the layout (B, N, D, L), locations last, with pairwise maps
    (B, N, N, L): for patch size 1 that is the input's own memory order, and every op runs over long
    contiguous rows of locations. Larger patches use (B, L, N, D) with maps (B, L, N, N), for batched matmuls.
    """

    def __init__(self, slices: Tuple[slice, ...], tiles: Tuple[int, ...], channels: int, num_particles: int):
        self.slices = slices
        self.tiles = tiles
        self.matmul = _use_matmul(num_particles, channels * math.prod(tiles))
        spatial = _SPATIAL[: len(tiles)]
        grid = " ".join(f"({s} t{s})" for s in spatial)
        tile_axes = " ".join("t" + s for s in spatial)
        # Only splits and a permutation: a view of x (or of the output) whose element order, read
        # contiguously, is the patch layout, so data moves between the two in one pass (a rearrange that
        # merges axes would copy once more).
        layout = f"b {' '.join(spatial)} n c {tile_axes}" if self.matmul else f"b n c {tile_axes} {' '.join(spatial)}"
        self.split = f"b n c {grid} -> {layout}"
        # The matmul layout's gather reads x in runs of one tile row; moving the first grid axis out front
        # first (long runs) and then the rest (within cache-sized slabs) is about twice as fast.
        self.staged = None
        if self.matmul and len(spatial) > 1:
            stage = f"b {spatial[0]} n c t{spatial[0]} " + " ".join(f"{s} t{s}" for s in spatial[1:])
            self.staged = (f"b n c {grid} -> {stage}", f"{stage} -> {layout}")
        self.tile_kwargs = {f"t{s}": t for s, t in zip(spatial, tiles)}
        self.particle_dim = 1 + len(spatial) if self.matmul else 1
        # Dimension of the pairwise maps that runs over the other particle k.
        self.k_dim = 3 if self.matmul else 2

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x[(Ellipsis, *self.slices)], self.split, **self.tile_kwargs)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C, *spatial) -> patches relative to particle 0 of their item: (B, L, N, D) or (B, N, D, L).

        Centring leaves the shift unchanged, but the common offset no longer costs precision and identical
        particles give exact zeros.
        """
        if self.matmul:
            # This permutation reads x in short runs: torch's copy kernel does it faster than a strided sub.
            # Always a copy: with a single location the view is already contiguous, and centring in place
            # would overwrite the caller's x.
            box = x[(Ellipsis, *self.slices)]
            if self.staged is None:
                centred = self._view(x).clone(memory_format=torch.contiguous_format)
            else:
                staged = rearrange(box, self.staged[0], **self.tile_kwargs).clone(memory_format=torch.contiguous_format)
                centred = rearrange(staged, self.staged[1]).contiguous()
            centred = centred.sub_(centred.narrow(self.particle_dim, 0, 1).clone())
        else:
            view = self._view(x)
            first = view.narrow(self.particle_dim, 0, 1)
            centred = torch.sub(view, first, out=torch.empty(view.shape, dtype=view.dtype, device=view.device))
        batch, n, dim = x.shape[0], x.shape[1], x.shape[2] * math.prod(self.tiles)
        return centred.reshape(batch, -1, n, dim) if self.matmul else centred.reshape(batch, n, dim, -1)

    def unpatch(
        self, shift: torch.Tensor, out: torch.Tensor, x: torch.Tensor, strength: Optional[torch.Tensor]
    ) -> None:
        """Writes this region of ``out`` (B, N, C, *spatial): the shift itself when ``strength`` is None, else
        ``x + strength * shift`` with one strength per item (B,)."""
        target = self._view(out)
        shift = shift.reshape(target.shape)
        if strength is None:
            target.copy_(shift)
        elif self.matmul or not target.is_contiguous():
            # As in patches(): a copy, then contiguous ops in x's own layout, beats one strided addcmul
            # (2x for patch 2 in the elementwise layout).
            target.copy_(shift)
            box = out[(Ellipsis, *self.slices)]
            box.mul_(strength.reshape((-1,) + (1,) * (box.ndim - 1))).add_(x[(Ellipsis, *self.slices)])
        else:
            strength = strength.reshape((-1,) + (1,) * (target.ndim - 1))
            torch.addcmul(self._view(x), strength, shift, out=target)

    def sq_dists(self, patches: torch.Tensor) -> torch.Tensor:
        """Pairwise squared distances, never an N x N x D tensor. The diagonal is exactly 0 (the kernel
        relies on it: w_ii = 1)."""
        if self.matmul:
            # In place on the Gram matrices: every fresh map-sized temporary costs page faults on CPU, which
            # took longer than the arithmetic (about 2x at N = 32).
            d = patches @ patches.transpose(-1, -2)  # (B, L, N, N)
            sq_norm = d.diagonal(dim1=-2, dim2=-1).clone()
            d.mul_(-2.0).add_(sq_norm.unsqueeze(-1)).add_(sq_norm.unsqueeze(-2)).clamp_min_(0.0)
            # Where the Gram products overflow (|x0| near the float's square root of its max) inf - inf gives
            # NaN: such pairs are too far apart to weigh anything, and the diagonal is 0 by definition. Both
            # fixes run on the small N x N maps and need no device sync.
            d.nan_to_num_(nan=math.inf)
            d.diagonal(dim1=-2, dim2=-1).zero_()
            return d
        batch, n, dim, locations = patches.shape
        d = patches.new_empty(batch, n, n, locations)
        d.diagonal(dim1=1, dim2=2).zero_()
        # One scratch buffer for the differences of every k (a fresh tensor per k costs page faults on CPU).
        scratch = patches.new_empty(batch * (n - 1) * dim * locations)
        for k in range(n - 1):  # each pair once: d is symmetric
            others = n - k - 1
            diff = scratch[: batch * others * dim * locations].view(batch, others, dim, locations)
            torch.sub(patches[:, k + 1 :], patches[:, k : k + 1], out=diff)
            torch.sum(diff.square_(), dim=2, out=d[:, k, k + 1 :])  # (B, N-k-1, L)
            d[:, k + 1 :, k] = d[:, k, k + 1 :]
        return d

    def sq_dists_rows(self, patches: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Squared distances of the query particles [start, stop) to all N, in the layout of :meth:`rows_of`.

        Each distance is computed as in :meth:`sq_dists` (the same differences, squared and summed over the same
        axis), so in the elementwise layout the values are bit-identical; a query's distance to itself is 0.
        """
        if self.matmul:
            queries = patches[:, :, start:stop]
            d = queries @ patches.transpose(-1, -2)  # (B, L, n, N)
            sq_norm = patches.square().sum(dim=-1)  # (B, L, N)
            d.mul_(-2.0).add_(sq_norm[:, :, start:stop].unsqueeze(-1)).add_(sq_norm.unsqueeze(-2)).clamp_min_(0.0)
            d.nan_to_num_(nan=math.inf)  # overflowing Gram products, as in sq_dists
            d.diagonal(offset=start, dim1=-2, dim2=-1).zero_()
            return d
        batch, n, dim, locations = patches.shape
        queries = patches[:, start:stop]
        d = patches.new_empty(batch, n, stop - start, locations)
        scratch = torch.empty_like(queries, memory_format=torch.contiguous_format)
        for k in range(n):  # p_q - p_k is exactly -(p_k - p_q): the same squares as sq_dists takes
            torch.sub(queries, patches[:, k : k + 1], out=scratch)
            torch.sum(scratch.square_(), dim=2, out=d[:, k])  # (B, n, L)
        return d

    def rows_of(self, d: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The query particles [start, stop) of a full (symmetric) map: (B, L, n, N) in the matmul layout, else
        (B, N, n, L), keys first, so that ``weights[:, k]`` is key k's column as :meth:`weighted_sum` reads it.

        The elementwise layout's slice is a view whose rows of locations are contiguous; the matmul layout's
        slice runs in rows of only N values, on which the kernel's elementwise ops took longer than on the
        whole map, so it is copied (half a map at W = 2, about a tenth of the kernel's time).
        """
        rows = d[:, :, start:stop]
        return rows.contiguous() if self.matmul else rows

    def key_sums(self, weights: torch.Tensor, rows: bool) -> torch.Tensor:
        """sum_k w_ik, shaped to divide the weighted sums; ``rows``: a map of query rows (:meth:`rows_of`)."""
        if rows and not self.matmul:
            return weights.sum(dim=1).unsqueeze(2)  # (B, n, 1, L)
        return weights.sum(dim=self.k_dim, keepdim=True)

    def query_patches(self, patches: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The patches of particles [start, stop) of every item (a view)."""
        return patches[:, :, start:stop] if self.matmul else patches[:, start:stop]

    def pair_values(self, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The distances of the distinct pairs (rows[j], cols[j]) at every location, flattened per item."""
        pairs = d[:, :, rows, cols] if self.matmul else d[:, rows, cols]
        return pairs.reshape(d.shape[0], -1)

    def weighted_sum(self, weights: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """sum_k w_ik p_k for every particle i, in this layout."""
        if self.matmul:
            return weights @ patches
        # w is symmetric: w[:, k] (contiguous) equals column k, w[:, :, k].
        total = weights[:, 0].unsqueeze(2) * patches[:, 0:1]
        for k in range(1, patches.shape[1]):
            total.addcmul_(weights[:, k].unsqueeze(2), patches[:, k : k + 1])
        return total


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
        particle_range: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Returns ``x + strength * shift(x)``, same shape, dtype and device.

        ``strength`` is a float in [0, 1] or a tensor with one value per item. With ``strength == 0`` or
        ``num_particles == 1`` the input tensor itself is returned, bit for bit.

        ``particle_range=(start, stop)`` steers only particles start..stop-1 of every item, against all N (the
        others still count as neighbours, and ``"auto"`` still takes its bandwidth from all N): the result has
        shape (B*(stop-start), ...), the rows of those particles in the full result. This is one rank's share
        when the particles are spread over processes (:mod:`kds_hook.distributed`).
        """
        num_particles = check_num_particles(num_particles)
        strength = check_strength(strength)
        check_particle_batch(x, num_particles)
        rows = _check_particle_range(particle_range, num_particles)
        if num_particles == 1 or (isinstance(strength, float) and strength == 0.0):
            self._self_weight = self.last_bandwidth = None  # nothing was steered: no stale diagnostics
            return x if rows is None else _particle_rows(x, num_particles, rows)
        check_no_autograd(x, "x")
        if check_finite_values:
            check_finite(x)
        work = x if x.dtype == torch.float64 else x.float()
        if isinstance(strength, torch.Tensor):
            per_item = strength.to(device=x.device, dtype=work.dtype).reshape(-1)
            batch = x.shape[0] // num_particles
            if per_item.numel() not in (1, batch):
                raise ValueError(
                    f"strength as a tensor needs one value per item ({batch} items), got {per_item.numel()}"
                )
            strength = per_item.expand(batch)
        return self._shift(work, num_particles, strength, rows).to(x.dtype)

    def shift(
        self,
        x: torch.Tensor,
        num_particles: int,
        *,
        check_finite_values: bool = True,
        particle_range: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """The mean-shift vectors m: same shape, dtype and device as x (computed in float32, or float64); with
        ``particle_range``, those of particles start..stop-1 of every item only (see :meth:`__call__`)."""
        num_particles = check_num_particles(num_particles)
        check_particle_batch(x, num_particles)
        rows = _check_particle_range(particle_range, num_particles)
        check_no_autograd(x, "x")
        if check_finite_values:
            check_finite(x)
        if num_particles == 1:
            self._self_weight = self.last_bandwidth = None
            return torch.zeros_like(x)
        work = x if x.dtype == torch.float64 else x.float()
        return self._shift(work, num_particles, None, rows).to(x.dtype)

    def log_density(
        self, x: torch.Tensor, num_particles: int, *, particle_range: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """Per-particle ensemble log-density, summed over patch locations, shape (B*N,).

        ``sum_j log sum_k exp(-||p_ij - p_kj||^2 / (2 h^2))``, up to a constant shared by the particles of an
        item. Used by ``select_particles(..., method="density")``. With ``particle_range=(start, stop)``, the
        values of particles start..stop-1 of every item only, shape (B*(stop-start),), against all N.
        """
        num_particles = check_num_particles(num_particles)
        check_particle_batch(x, num_particles)
        rows = _check_particle_range(particle_range, num_particles)
        check_no_autograd(x, "x")
        check_finite(x)
        work = x if x.dtype == torch.float64 else x.float()
        batch = work.shape[0] // num_particles
        queries = num_particles if rows is None else rows[1] - rows[0]
        if num_particles == 1:
            return torch.zeros(batch * queries, dtype=work.dtype, device=work.device)
        grouped, regions = self._grouped(work, num_particles)
        patch_sets = [region.patches(grouped) for region in regions]
        if rows is None:
            sq = [region.sq_dists(p) for region, p in zip(regions, patch_sets)]
            inv = self._inv_two_h2(regions, sq, num_particles)
            total = 0
            for region, d in zip(regions, sq):
                # d_ii = 0 exactly, so sum_k exp(-d_ik / 2h^2) >= 1: the log needs no max-subtraction.
                log_z = _kernel(d, inv).sum(dim=region.k_dim).log()  # (B, N, L) or (B, L, N)
                total = total + log_z.sum(dim=1 if region.matmul else 2)
            return total.reshape(batch * num_particles)
        maps, inv = self._row_maps(regions, patch_sets, num_particles, rows)
        total = 0
        for region, d in zip(regions, maps):
            log_z = region.key_sums(_kernel(d, inv), rows=True).log()  # (B, n, 1, L) or (B, L, n, 1)
            total = total + (log_z.sum(dim=(2, 3)) if not region.matmul else log_z.sum(dim=(1, 3)))
        return total.reshape(batch * queries)

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
            return grouped, [_Region((slice(None),), (1,), x.shape[1], num_particles)]
        grouped = x.reshape(-1, num_particles, *x.shape[1:])
        spatial = x.shape[2:]
        per_dim = [_segments(size, tile) for size, tile in zip(spatial, self._tiles(spatial))]
        regions = [
            _Region(tuple(slice(a, b) for a, b, _ in combo), tuple(t for _, _, t in combo), x.shape[1], num_particles)
            for combo in itertools.product(*per_dim)
        ]
        return grouped, regions

    def _inv_two_h2(self, regions: List[_Region], sq: List[torch.Tensor], num_particles: int) -> torch.Tensor:
        """1 / (2 h^2) per item, shaped (B, 1, 1, 1) to broadcast over the pairwise maps."""
        batch = sq[0].shape[0]
        ref = sq[0]
        if self.bandwidth == "auto":
            rows, cols = torch.triu_indices(num_particles, num_particles, offset=1, device=ref.device)
            pairs = torch.cat([region.pair_values(d, rows, cols) for region, d in zip(regions, sq)], dim=1)
            h = auto_bandwidth(pairs, num_particles)
        else:
            h = torch.full((batch,), float(self.bandwidth), dtype=ref.dtype, device=ref.device)
        self.last_bandwidth = h
        inv = (0.5 / (h * h)).nan_to_num(nan=_MAX_INV_TWO_H2).clamp(max=_MAX_INV_TWO_H2)
        return inv.reshape(batch, 1, 1, 1)

    def _row_maps(
        self, regions: List[_Region], patch_sets: List[torch.Tensor], num_particles: int, rows: Tuple[int, int]
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The distance maps of the query particles ``rows`` to all N, and 1/(2h^2). "auto" needs every pair's
        distance for its median, so it computes the full maps (exactly as without ``rows``: the same h) and
        keeps their query rows; a fixed bandwidth computes the query rows only."""
        if self.bandwidth == "auto":
            full = [region.sq_dists(p) for region, p in zip(regions, patch_sets)]
            inv = self._inv_two_h2(regions, full, num_particles)
            return [region.rows_of(d, *rows) for region, d in zip(regions, full)], inv
        maps = [region.sq_dists_rows(p, *rows) for region, p in zip(regions, patch_sets)]
        return maps, self._inv_two_h2(regions, maps, num_particles)

    def _shift(
        self,
        x: torch.Tensor,
        num_particles: int,
        strength: Union[None, float, torch.Tensor] = None,
        rows: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """The shift m (strength None), or the steered ``x + strength * m`` (strength a float or one per item);
        of every particle, or of the particles ``rows`` (start, stop) of every item against all N."""
        grouped, regions = self._grouped(x, num_particles)
        patch_sets = [region.patches(grouped) for region in regions]
        if rows is None:
            sq = [region.sq_dists(p) for region, p in zip(regions, patch_sets)]
            inv = self._inv_two_h2(regions, sq, num_particles)
            queries, target = patch_sets, grouped
        else:
            sq, inv = self._row_maps(regions, patch_sets, num_particles, rows)
            queries = [region.query_patches(p, *rows) for region, p in zip(regions, patch_sets)]
            target = grouped[:, rows[0] : rows[1]]
        if strength is not None:
            strength = torch.as_tensor(strength, dtype=x.dtype, device=x.device).expand(grouped.shape[0])

        out = torch.empty(target.shape, dtype=x.dtype, device=x.device)
        inv_z_sum = grouped.new_zeros(())
        count = 0
        for region, patches, query, d in zip(regions, patch_sets, queries, sq):
            weights = _kernel(d, inv)
            z = region.key_sums(weights, rows is not None)  # >= 1 (w_ii = 1): no 0/0 for far-apart particles
            # w_ii / z = 1 / z: the self-weight diagnostic comes for free.
            inv_z_sum = inv_z_sum + z.reciprocal().sum()
            count += z.numel()
            shift = region.weighted_sum(weights, patches).div_(z).sub_(query)
            region.unpatch(shift, out, target, strength)
        self._self_weight = (inv_z_sum / count).detach()
        return out.reshape((-1,) + tuple(x.shape[1:]))


def _check_particle_range(particle_range: object, num_particles: int) -> Optional[Tuple[int, int]]:
    """None, or (start, stop) with 0 <= start < stop <= N."""
    if particle_range is None:
        return None
    if not isinstance(particle_range, (tuple, list)) or len(particle_range) != 2:
        raise TypeError(f"particle_range must be a pair (start, stop), got {particle_range!r}")
    start, stop = particle_range
    for value in (start, stop):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"particle_range must hold two ints, got {particle_range!r}")
    if not 0 <= start < stop <= num_particles:
        raise ValueError(
            f"particle_range {tuple(particle_range)} must satisfy 0 <= start < stop <= num_particles={num_particles}"
        )
    return int(start), int(stop)


def _particle_rows(x: torch.Tensor, num_particles: int, rows: Tuple[int, int]) -> torch.Tensor:
    """The rows of particles start..stop-1 of every item of a (B*N, ...) batch, (B*(stop-start), ...)."""
    grouped = x.reshape(-1, num_particles, *x.shape[1:])
    return grouped[:, rows[0] : rows[1]].reshape((-1,) + tuple(x.shape[1:]))


def _kernel(sq_dists: torch.Tensor, inv_two_h2: torch.Tensor) -> torch.Tensor:
    """exp(-d / 2h^2), in place: the distances are not needed afterwards.

    Weights that would be subnormal are set to exactly 0. They are some 30 orders of magnitude below the
    self-weight w_ii = 1, so no result changes, but subnormal arithmetic is slow on CPUs: with a narrow kernel
    most weights land there and the call took about twice as long.
    """
    floor = math.log(torch.finfo(sq_dists.dtype).tiny) + 1.0
    cutoff = math.exp(floor) * (1.0 + 1e-3)  # just above exp(floor) as computed in sq_dists' dtype
    weights = sq_dists.mul_(-inv_two_h2).clamp_(min=floor).exp_()
    return torch.nn.functional.threshold_(weights, cutoff, 0.0)
