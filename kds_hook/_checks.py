"""Argument validation shared by the core: every bad input becomes a clear ``ValueError``/``TypeError``."""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

BandwidthLike = Union[float, str]


def check_num_particles(num_particles: object) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral):
        raise TypeError(f"num_particles must be an int, got {type(num_particles).__name__}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    return int(num_particles)


def check_bandwidth(bandwidth: object) -> BandwidthLike:
    """A positive (possibly infinite) float, or the string ``"auto"``."""
    if isinstance(bandwidth, str):
        if bandwidth != "auto":
            raise ValueError(f'bandwidth must be a positive float or "auto", got {bandwidth!r}')
        return bandwidth
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real):
        raise TypeError(f'bandwidth must be a positive float or "auto", got {type(bandwidth).__name__}')
    value = float(bandwidth)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"bandwidth must be positive (the kernel's standard deviation), got {value}")
    return value


def check_strength(strength: object, name: str = "strength") -> Union[float, torch.Tensor]:
    """A float in [0, 1], or a 1-D tensor of such values (one per item)."""
    if isinstance(strength, torch.Tensor):
        if strength.ndim > 1:
            raise ValueError(
                f"{name} as a tensor must be 0-D or 1-D (one value per item), got shape {tuple(strength.shape)}"
            )
        if torch.isnan(strength).any() or (strength < 0).any() or (strength > 1).any():
            raise ValueError(f"{name} must lie in [0, 1], got {strength.tolist()}")
        return strength
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(strength).__name__}")
    value = float(strength)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_patch_size(patch_size: object) -> Union[int, tuple]:
    if isinstance(patch_size, (tuple, list)):
        sizes = tuple(patch_size)
        if not 1 <= len(sizes) <= 3:
            raise ValueError(f"patch_size as a sequence needs 1 to 3 entries (one per spatial dim), got {sizes}")
        for s in sizes:
            check_patch_size(s)
        return tuple(int(s) for s in sizes)
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral):
        raise TypeError(f"patch_size must be an int or a tuple of ints, got {type(patch_size).__name__}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return int(patch_size)


def check_particle_batch(x: torch.Tensor, num_particles: int) -> int:
    """Returns the number of items B for a (B*N, C, *spatial) or (B*N, D) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not 2 <= x.ndim <= 5:
        raise ValueError(
            f"x must have shape (B*N, C, *spatial) with 0 to 3 spatial dims, or (B*N, D); got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): there is nothing to steer or select")
    if x.shape[0] % num_particles:
        raise ValueError(
            f"batch size {x.shape[0]} is not divisible by num_particles={num_particles}: the batch must hold "
            f"N={num_particles} contiguous particles per item"
        )
    return x.shape[0] // num_particles


def check_finite(x: torch.Tensor, name: str = "x0") -> None:
    # amax propagates NaN and Inf, and one reduction is ~10x cheaper than isfinite(x).all().
    if x.numel() and not bool(torch.isfinite(x.abs().amax())):
        raise ValueError(
            f"{name} contains NaN or Inf values; KDS cannot steer a non-finite prediction "
            "(check the model's dtype and inputs)"
        )


def check_no_autograd(x: torch.Tensor, name: str = "x0") -> None:
    """The mean shift works in place on its own buffers and is not differentiable: say so up front instead of
    failing inside autograd with an unrelated message."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but KDS steering is not differentiable; run the sampler under "
            f"torch.no_grad() (as diffusers pipelines do) or steer {name}.detach()"
        )
