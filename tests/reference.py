"""A literal transcription of the paper's Algorithm 2, lines 5-15, for comparison with the fast operator.

Deliberately slow and plain: Python loops over items, patch locations and particles, float64, no
vectorisation. Tiles follow kds-hook's rule: non-overlapping, the last tile along a dim smaller where the size
is not divisible. With no spatial dims, the whole vector is one patch.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence, Union

import torch


def reference_mean_shift(
    x: torch.Tensor,
    num_particles: int,
    bandwidth: float,
    patch_size: Union[int, Sequence[int]],
    strength: float,
) -> torch.Tensor:
    """Steered x (float64) by the kernel w_ik = exp(-||p_i - p_k||^2 / (2 h^2))."""
    x = x.detach().to(torch.float64)
    out = x.clone()
    n = num_particles
    spatial = x.shape[2:]
    if isinstance(patch_size, int):
        patch_size = (patch_size,) * len(spatial)
    starts = [range(0, size, tile) for size, tile in zip(spatial, patch_size)]
    for item in range(x.shape[0] // n):
        for corner in itertools.product(*starts):  # Algorithm 2, line 6: each patch location j
            where = (slice(None),) + tuple(
                slice(a, min(a + tile, size)) for a, tile, size in zip(corner, patch_size, spatial)
            )
            patches = [x[item * n + k][where].reshape(-1) for k in range(n)]  # line 7: P_j
            for i in range(n):  # line 8
                p_i = patches[i]
                weights = [
                    math.exp(-float(((p_i - p_k) ** 2).sum()) / (2.0 * bandwidth**2)) for p_k in patches
                ]
                weighted = sum(w * p_k for w, p_k in zip(weights, patches))
                m = weighted / sum(weights) - p_i  # line 10: Eq. 7
                steered = p_i + strength * m  # line 11: Eq. 8
                out[item * n + i][where] = steered.reshape(out[item * n + i][where].shape)  # line 12
    return out
