"""The time gate: how strongly to steer at diffusion time t/T (the paper's Eq. 10)."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from ._checks import check_strength

__all__ = ["TimeGate"]

Schedule = Callable[[float], float]


class TimeGate:
    """``delta(t/T) = strength`` if ``t/T >= threshold`` else 0, or a user schedule ``t/T -> delta``.

    ``t`` is the training timestep and ``T`` the number of training timesteps, so t/T runs from about 1 (pure
    noise) to 0 (clean). The paper uses strength 0.3 and threshold 0.3 for every experiment: steering acts on
    the early, coarse part of sampling and stops for the last 30 % of training time, where the model is most
    sensitive. A schedule's values are checked to lie in [0, 1].
    """

    def __init__(self, strength: float = 0.3, threshold: float = 0.3, schedule: Optional[Schedule] = None):
        self.strength = check_strength(strength)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (a fraction t/T), got {threshold!r}")
        self.threshold = float(threshold)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable t/T -> strength, got {type(schedule).__name__}")
        self.schedule = schedule

    def __repr__(self) -> str:
        if self.schedule is not None:
            return f"TimeGate(schedule={self.schedule!r})"
        return f"TimeGate(strength={self.strength}, threshold={self.threshold})"

    def __call__(self, t_frac: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """Strength at t/T: a float for a scalar, a tensor (same shape) for a tensor of t/T values."""
        if isinstance(t_frac, torch.Tensor) and t_frac.numel() > 1:
            if torch.isnan(t_frac).any():
                raise ValueError("t/T contains NaN")
            values = [self._scalar(float(v)) for v in t_frac.reshape(-1).tolist()]
            return torch.tensor(values, dtype=torch.float64).reshape(t_frac.shape)
        return self._scalar(float(t_frac))

    def _scalar(self, t_frac: float) -> float:
        if math.isnan(t_frac):
            raise ValueError("t/T is NaN")
        if self.schedule is not None:
            return check_strength(float(self.schedule(t_frac)), name="schedule(t/T)")
        return self.strength if t_frac >= self.threshold else 0.0
