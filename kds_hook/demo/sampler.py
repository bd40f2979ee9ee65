"""A plain DDIM sampler (eta = 0) with the paper's KDS hook, for the demo and the benchmarks.

It is Algorithm 1 / Algorithm 2 of the paper in the variance-preserving form ``z_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps`` over a DDPM schedule of ``T = 1000`` training timesteps. The model is given as an x0
predictor ``predict_x0(z_t, t) -> x0``; with ``kds`` the prediction is steered (lines 5-15) and eps is
re-derived from the steered x0 (lines 16-17). Plain and KDS runs share every line but the steering, so from the
same initial noise they differ only by what KDS does.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..kds import KDS

__all__ = ["ddpm_alphas_cumprod", "ddim_timesteps", "ddim_sample", "paired_runs", "x0_predictor_from_denoiser"]

X0Predictor = Callable[[torch.Tensor, int], torch.Tensor]


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """The DDPM linear beta schedule's cumulative alphas, float64, shape (T,)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list:
    """DDIM's "leading" spacing, as diffusers' DDIMScheduler: T/S * (S-1), ..., T/S, 0."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [i * ratio for i in reversed(range(num_steps))]


def x0_predictor_from_denoiser(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor
) -> X0Predictor:
    """Wraps a variance-exploding denoiser ``D(x, sigma) = E[x0 | x0 + sigma eps = x]`` as ``predict_x0(z, t)``.

    ``z_t / sqrt(a_t) = x0 + sigma_t eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``, so the VP latent is the VE
    one rescaled and both predict the same x0.
    """

    def predict_x0(z: torch.Tensor, t: int) -> torch.Tensor:
        a = float(alphas_cumprod[t])
        return denoiser(z / math.sqrt(a), torch.tensor(math.sqrt((1.0 - a) / a), dtype=torch.float64))

    return predict_x0


def ddim_sample(
    predict_x0: X0Predictor,
    noise: torch.Tensor,
    *,
    num_steps: int = 50,
    alphas_cumprod: Optional[torch.Tensor] = None,
    kds: Optional[KDS] = None,
    timesteps: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Deterministic DDIM from ``z_T = noise``; returns the last x0 prediction (Algorithm 2, line 19).

    Args:
        predict_x0: the model as ``(z_t, t) -> x0`` for an integer training timestep t.
        noise: the initial latent z_T, shape (B*N, ...) with the N particles of an item contiguous.
        num_steps: number of DDIM steps (ignored when ``timesteps`` is given).
        alphas_cumprod: the training schedule (default: DDPM linear, T = 1000); T = its length.
        kds: steers each x0 prediction with ``kds.steer_x0(x0, t_frac=t / T)``; None samples plainly.
        timesteps: descending training timesteps to visit (default: :func:`ddim_timesteps`).
    """
    if alphas_cumprod is None:
        alphas_cumprod = ddpm_alphas_cumprod()
    num_train = alphas_cumprod.shape[0]
    steps = list(timesteps) if timesteps is not None else ddim_timesteps(num_steps, num_train)
    z = noise
    x0 = noise
    for i, t in enumerate(steps):
        a_t = float(alphas_cumprod[t])
        # The step after the last one lands on clean data (diffusers' set_alpha_to_one=True).
        a_prev = float(alphas_cumprod[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        x0 = predict_x0(z, t)
        if kds is not None:
            x0 = kds.steer_x0(x0, t_frac=t / num_train)
        eps = (z - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        z = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x0


def paired_runs(
    predict_x0: X0Predictor,
    noise: torch.Tensor,
    configs: Dict[str, dict],
    num_particles: int,
    num_steps: int,
    label: str,
    progress: Optional[Callable[[str], None]] = None,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields ``("plain", x)`` and then ``(name, x)`` for each KDS configuration (``KDS(**kwargs)``), every run
    from the same ``noise``: the paired comparison the demo and the benchmarks report."""
    runs: Dict[str, Optional[dict]] = {"plain": None, **configs}
    for i, (name, kwargs) in enumerate(runs.items()):
        if progress:
            progress(f"{label}: {name} [{i + 1}/{len(runs)}]")
        kds = None if kwargs is None else KDS(num_particles=num_particles, **kwargs)
        yield name, ddim_sample(predict_x0, noise, num_steps=num_steps, kds=kds)
