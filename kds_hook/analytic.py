"""Exact denoisers for Gaussian mixtures: test models and demo problems with a known score.

For ``x0 ~ sum_c pi_c N(mu_c, diag(s_c^2))`` observed as ``x = x0 + sigma * eps`` (the variance-exploding
parameterisation k-diffusion uses), everything is closed form:
``p(x) = sum_c pi_c N(mu_c, s_c^2 + sigma^2)`` and
``E[x0 | x] = sum_c r_c(x) (mu_c + s_c^2 / (s_c^2 + sigma^2) (x - mu_c))`` with responsibilities ``r_c``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["GaussianMixture", "three_gaussians"]


class GaussianMixture:
    """A diagonal-covariance Gaussian mixture on R^D with its exact denoiser.

    Args:
        means: (K, D) component means.
        stds: (K, D) or (K,) per-component standard deviations.
        weights: (K,) mixture weights (normalised here).
    """

    def __init__(self, means, stds, weights: Optional[Sequence[float]] = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        k, d = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.reshape(k, 1).expand(k, d).clone() if stds.ndim == 1 else stds.clone()
        if self.stds.shape != (k, d) or bool((self.stds <= 0).any()):
            raise ValueError("stds must be positive with shape (K,) or (K, D)")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError("weights must be positive with shape (K,)")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_components(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """log pi_c + log N(x; mu_c, s_c^2 + sigma^2), shape (B, K); x is (B, D) float64, sigma (B, 1) or scalar."""
        var = self.stds.unsqueeze(0).square() + _col(sigma, x).square().unsqueeze(-1)  # (B, K, D)
        diff = x.unsqueeze(1) - self.means.unsqueeze(0)
        log_norm = -0.5 * (diff.square() / var + var.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.log().unsqueeze(0) + log_norm

    def log_prob(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
        """log p_sigma(x) for x of shape (B, D)."""
        x64 = x.double()
        return self._log_components(x64, sigma).logsumexp(dim=-1).to(x.dtype)

    def responsibilities(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
        """p(component | x) at noise level sigma, shape (B, K)."""
        return torch.softmax(self._log_components(x.double(), sigma), dim=-1).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """E[x0 | x0 + sigma * eps = x], same shape and dtype as x (B, D); sigma scalar or (B,)."""
        x64 = x.double()
        s = _col(sigma, x64)
        resp = torch.softmax(self._log_components(x64, s), dim=-1)  # (B, K)
        var0 = self.stds.unsqueeze(0).square()  # (1, K, D)
        gain = var0 / (var0 + s.square().unsqueeze(-1))
        cond = self.means.unsqueeze(0) + gain * (x64.unsqueeze(1) - self.means.unsqueeze(0))
        return (resp.unsqueeze(-1) * cond).sum(1).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], **_: object) -> torch.Tensor:
        """k-diffusion denoiser signature ``model(x, sigma) -> denoised`` (extra args ignored)."""
        return self.denoise(x, sigma)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of x0, shape (n, D), float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp] * noise


def _col(sigma: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B, 1) float64 column for x of shape (B, D)."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, 1).to(torch.float64)


def three_gaussians() -> GaussianMixture:
    """The paper's Figure 2 problem: three well-separated 2-D Gaussian modes with unequal weights."""
    means = [[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]]
    return GaussianMixture(means=means, stds=[0.5, 0.5, 0.5], weights=[0.5, 0.3, 0.2])
