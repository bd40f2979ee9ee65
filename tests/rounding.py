"""Comparing results whose computations differ only in batch layout or thread count.

Such runs are not literally the same computation: CPU math libraries choose kernels and summation orders by batch
size, thread count and processor, so they agree to rounding, not bit for bit (bit-equality is asserted only where
the computation is literally the same: strength 0, one particle, the same batch). A tolerance alone could hide a
real leak between items, so each comparison also checks that what a leak gives lies far outside it.
"""

from __future__ import annotations

import torch

# Rounding of a few reductions over patches and particles stays within a few ulps per operation; 1000 ulps of the
# values' magnitude leaves ample room and is still tiny next to any real mix-up of items.
ROUNDING_ULPS = 1000.0


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, leaked: torch.Tensor,
                             ulps: float = ROUNDING_ULPS) -> None:
    """``actual`` equals ``expected`` up to ``ulps`` units of the dtype's machine epsilon at the magnitude of
    ``expected`` (its largest absolute value), and ``leaked`` (what a real mix-up of items gives; NaN counts as
    infinitely far) lies more than 100 times that tolerance away from ``expected``, so the comparison can fail."""
    atol = ulps * torch.finfo(expected.dtype).eps * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)
    gap = float((leaked - expected).abs().nan_to_num(nan=float("inf")).max())
    assert gap > 100 * atol, f"a leak would differ by {gap:.3g}, within 100x the tolerance {atol:.3g}"
