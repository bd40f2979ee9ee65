"""Choosing one output per item from its N particles (the paper's Eq. 9 and two alternatives).

Hazard: ``"mean"`` (the paper's rule) picks the most central particle. For a multimodal posterior the ensemble
mean can lie between modes, and the particle nearest to it may be one that itself lies between modes (a blend).
``"density"`` picks the particle in the densest region of the ensemble instead, and ``"medoid"`` the particle
with the smallest total distance to the others, which is less pulled by outliers than the mean.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from ._checks import (
    BandwidthLike,
    check_bandwidth,
    check_finite,
    check_num_particles,
    check_particle_batch,
    check_patch_size,
)

__all__ = ["Selection", "select_particles", "SELECTION_METHODS"]

SELECTION_METHODS = ("mean", "density", "medoid")


class Selection(NamedTuple):
    """``sample``: the chosen particle per item, shape (B, *x.shape[1:]); ``index``: its index in 0..N-1."""

    sample: torch.Tensor
    index: torch.Tensor


def select_particles(
    x: torch.Tensor,
    num_particles: int,
    method: str = "mean",
    *,
    patch_size: Union[int, Sequence[int]] = 1,
    bandwidth: BandwidthLike = "auto",
) -> Selection:
    """Selects one particle per item of a (B*N, ...) batch whose particles are contiguous.

    Methods:
        ``"mean"``: the particle closest (Euclidean, over the whole latent) to its item's ensemble mean, Eq. 9.
        ``"density"``: the particle with the highest patch-wise ensemble KDE log-density (``patch_size`` and
        ``bandwidth`` as in :class:`~kds_hook.PatchMeanShift`).
        ``"medoid"``: the particle with the smallest summed distance to the other particles of its item.

    Hazard of ``"mean"``: it picks the most central particle; for a multimodal posterior the mean lies between
    the modes, and the particle nearest to it can be a blend lying between them too. ``"density"`` picks a
    particle inside the densest mode instead.

    Distances are computed in float32 (float64 stays float64); ``sample`` is taken from ``x`` itself, in its
    own dtype. Ties go to the lowest index. Items never interact. At N = 2 every method is a tie (two particles
    are symmetric), decided by rounding: use N >= 3 when the selection matters.
    """
    num_particles = check_num_particles(num_particles)
    batch = check_particle_batch(x, num_particles)
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    # Checked for every method, so a bad setting fails at once rather than when "density" is first used.
    patch_size = check_patch_size(patch_size)
    bandwidth = check_bandwidth(bandwidth)
    check_finite(x, name="x")
    work = x if x.dtype == torch.float64 else x.float()
    flat = work.reshape(batch, num_particles, -1)
    if method == "mean":
        centre = flat.mean(dim=1, keepdim=True)  # mean over the particles of each item
        score = (flat - centre).square().sum(dim=-1)
    elif method == "medoid":
        score = torch.cdist(flat, flat).sum(dim=-1)
    else:
        from .meanshift import PatchMeanShift

        density = PatchMeanShift(patch_size=patch_size, bandwidth=bandwidth).log_density(work, num_particles)
        score = -density.reshape(batch, num_particles)
    index = score.argmin(dim=1)
    grouped = x.reshape(batch, num_particles, *x.shape[1:])
    sample = grouped[torch.arange(batch, device=x.device), index]
    return Selection(sample=sample, index=index)
