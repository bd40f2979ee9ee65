"""x0 as an affine function of the model output, and the gate's t/T, for each family of diffusers schedulers.

For a given sample and noise level every supported scheduler forms its x0 prediction as
``x0 = a * sample + b * model_output``; the functions here give (a, b) from the scheduler's own noise-level
numbers (0-d tensors, turned into Python floats, so the coefficients are exactly the scheduler's values).

Families (``sample`` is what the scheduler steps on):

- variance preserving (VP): ``sample = alpha * x0 + sigma * eps`` (DDIM, DDPM, LCM, TCD, and the multistep
  solvers via ``_sigma_to_alpha_sigma_t``);
- variance exploding (VE, Karras): ``sample = x0 + sigma * eps`` (Euler, Heun, KDPM2, LMS, DPM-Solver SDE);
- EDM preconditioning: ``x0 = c_skip * sample + c_out * F`` with sigma_data (EDM Euler, EDM/Cosine DPM-Solver);
- flow matching: ``sample = (1 - sigma) * x0 + sigma * noise`` and the model predicts ``v = noise - x0``, so
  ``x0 = sample - sigma * v``: the point one Euler step to sigma = 0 reaches.

t/T per family (what :class:`~kds_hook.TimeGate` reads): VP discrete schedulers use their training timestep over
``num_train_timesteps`` (the paper's t/T); flow matching uses sigma itself (its training time, uniform in [0, 1]);
EDM uses ``sigma / (sigma + sigma_data)``, the flow-matching time at the same signal-to-noise ratio.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

Coefficients = Tuple[float, float]  # (a, b): x0 = a * sample + b * model_output

__all__ = [
    "Coefficients",
    "edm_coefficients",
    "edm_t_frac",
    "flow_coefficients",
    "one_value",
    "ve_coefficients",
    "vp_coefficients",
]


def one_value(value: Any, what: str) -> float:
    """A scalar (Python number or one-element tensor) as a float; ValueError for per-row values."""
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"KDS needs one {what} per scheduler step, got {t.numel()} values")
    return float(t.reshape(()))


def vp_coefficients(prediction: str, alpha: Any, sigma: Any, *, implied_by_eps: bool = False) -> Coefficients:
    """(a, b) for ``sample = alpha * x0 + sigma * eps``.

    ``implied_by_eps``: the scheduler keeps eps, computing it from a v prediction as ``alpha * v + sigma * sample``;
    (a, b) are then those of the x0 that eps implies, ``(sample - sigma * eps) / alpha``. In exact arithmetic that is
    ``alpha * sample - sigma * v``, but the scheduler's float32 ``alpha**2 + sigma**2`` is not exactly 1.
    """
    alpha, sigma = float(alpha), float(sigma)
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        if implied_by_eps:
            return (1.0 - sigma * sigma) / alpha, -sigma
        return alpha, -sigma
    if prediction == "sample":
        return 0.0, 1.0
    raise ValueError(f"no VP x0 for prediction_type={prediction!r}")  # guarded by the registry's checks


def ve_coefficients(prediction: str, sigma: torch.Tensor) -> Coefficients:
    """(a, b) for ``sample = x0 + sigma * eps``, as the Euler/Heun family writes them (v: Karras' c_skip, c_out)."""
    if prediction == "epsilon":
        return 1.0, -float(sigma)
    if prediction == "v_prediction":
        return 1.0 / float(sigma**2 + 1), float(-sigma / (sigma**2 + 1) ** 0.5)
    if prediction == "sample":
        return 0.0, 1.0
    raise ValueError(f"no VE x0 for prediction_type={prediction!r}")


def edm_coefficients(prediction: str, sigma: Any, sigma_data: float) -> Coefficients:
    """(c_skip, c_out) of EDM's preconditioning, as diffusers' ``precondition_outputs`` computes them."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    if prediction == "v_prediction":
        c_out = -c_out
    elif prediction != "epsilon":
        raise ValueError(f"no EDM x0 for prediction_type={prediction!r}")
    return float(c_skip), float(c_out)


def flow_coefficients(sigma: Any) -> Coefficients:
    """(a, b) for flow matching: ``x0 = sample - sigma * v``."""
    return 1.0, -float(sigma)


def edm_t_frac(sigma: Any, sigma_data: float) -> float:
    """t/T of an EDM noise level: ``sigma / (sigma + sigma_data)``.

    EDM models have no training timestep (they are trained on a log-normal spread of sigmas). A flow-matching
    model at time s has the signal-to-noise ratio ((1 - s) / s)**2 of unit-scale data; EDM's data have scale
    sigma_data, so sigma / (sigma + sigma_data) is the flow time at the same signal-to-noise ratio. The gate then
    opens at the same noise level, relative to the data, for EDM and flow models.
    """
    sigma = float(sigma)
    return sigma / (sigma + float(sigma_data))
