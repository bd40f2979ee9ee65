"""A restoration problem with an exact posterior and an exact conditional denoiser.

The clean "latent image" x0 has shape (C, H, W). Its prior is an independent Gaussian mixture per pixel over
the C-dim channel vector::

    p(x0[:, l]) = sum_k pi_k N(mu_k, Sigma_k)            (full C x C covariances)

and it is observed per pixel through a linear degradation with Gaussian noise, ``y[:, l] = A x0[:, l] +
s_y n`` with A of shape (M, C), M < C. Everything stays Gaussian per component, so per pixel the posterior is
again a mixture::

    p(x0 | y) = sum_k w_k N(m_k, S_k),   S_k = (Sigma_k^-1 + A^T A / s_y^2)^-1,
    m_k = S_k (Sigma_k^-1 mu_k + A^T y / s_y^2),   w_k ∝ pi_k N(y; A mu_k, A Sigma_k A^T + s_y^2 I)

and the conditional denoiser of the diffusion ``x = x0 + sigma eps`` (k-diffusion's VE convention) is exact::

    p(x | y) = sum_k w_k N(m_k, S_k + sigma^2 I)
    E[x0 | x, y] = sum_k r_k(x) (m_k + S_k (S_k + sigma^2 I)^-1 (x - m_k)),   r_k ∝ w_k N(x; m_k, S_k + sigma^2 I)

S_k does not depend on y, so its eigendecomposition ``U_k diag(lam_k) U_k^T`` is computed once and every
inverse above is a rescaling in that basis. All maths is float64.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = ["MixturePrior", "LinearRestoration", "MixturePosterior", "psnr", "default_problem"]

_LOG_2PI = math.log(2.0 * math.pi)


def _as64(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_spd(cov: torch.Tensor, name: str) -> None:
    if not torch.allclose(cov, cov.transpose(-1, -2)):
        raise ValueError(f"{name} must be symmetric")
    if bool((torch.linalg.eigvalsh(cov) <= 0).any()):
        raise ValueError(f"{name} must be positive definite")


class MixturePrior:
    """Per-pixel Gaussian mixture prior over C channels.

    Args:
        means: (K, C) component means.
        covs: (K, C, C) symmetric positive-definite component covariances.
        weights: (K,) positive mixture weights (normalised here).
    """

    def __init__(self, means, covs, weights):
        self.means = _as64(means, "means")
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, C), got {tuple(self.means.shape)}")
        k, c = self.means.shape
        self.covs = _as64(covs, "covs")
        if self.covs.shape != (k, c, c):
            raise ValueError(f"covs must have shape {(k, c, c)}, got {tuple(self.covs.shape)}")
        _check_spd(self.covs, "covs")
        w = _as64(weights, "weights")
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be positive with shape ({k},)")
        self.weights = w / w.sum()

    @property
    def channels(self) -> int:
        return self.means.shape[1]

    def sample(self, num: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``num`` images drawn from the prior, shape (num, C, H, W), float64."""
        count = num * height * width
        comp = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[comp]  # (count, C, C)
        eps = torch.randn(count, self.channels, 1, dtype=torch.float64, generator=generator)
        pixels = self.means[comp] + (chol @ eps).squeeze(-1)
        return pixels.reshape(num, height, width, self.channels).permute(0, 3, 1, 2).contiguous()


class LinearRestoration:
    """The degradation ``y = A x0 + noise_std * n`` applied to every pixel's channel vector.

    Args:
        prior: the per-pixel prior of x0.
        operator: A, shape (M, C).
        noise_std: s_y > 0, the observation noise's standard deviation.
    """

    def __init__(self, prior: MixturePrior, operator, noise_std: float):
        self.prior = prior
        self.operator = _as64(operator, "operator")
        if self.operator.ndim != 2 or self.operator.shape[1] != prior.channels:
            raise ValueError(f"operator must have shape (M, {prior.channels}), got {tuple(self.operator.shape)}")
        if not noise_std > 0:  # also rejects NaN
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        self.noise_std = float(noise_std)
        # Posterior covariances and their eigenbases: the same for every pixel and every observation.
        a, s2 = self.operator, self.noise_std**2
        prec = torch.linalg.inv(prior.covs) + (a.T @ a / s2).unsqueeze(0)
        self.post_covs = torch.linalg.inv(prec)
        self.post_covs = 0.5 * (self.post_covs + self.post_covs.transpose(-1, -2))
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.post_covs)  # (K, C), (K, C, C)

    def observe(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A noisy observation y of x0 (G, C, H, W): shape (G, M, H, W)."""
        clean = torch.einsum("mc,gchw->gmhw", self.operator, x0.double())
        return clean + self.noise_std * torch.randn(clean.shape, dtype=torch.float64, generator=generator)

    def posterior(self, y: torch.Tensor) -> "MixturePosterior":
        """The exact posterior p(x0 | y) for observations y of shape (G, M, H, W)."""
        y = _as64(y, "y")
        m = self.operator.shape[0]
        if y.ndim != 4 or y.shape[1] != m:
            raise ValueError(f"y must have shape (G, {m}, H, W), got {tuple(y.shape)}")
        prior, a, s2 = self.prior, self.operator, self.noise_std**2
        g, _, h, w = y.shape
        y_pix = y.permute(0, 2, 3, 1).reshape(g, h * w, m)  # (G, L, M)
        # Component evidences N(y; A mu_k, A Sigma_k A^T + s2 I).
        ev_cov = a @ prior.covs @ a.T + s2 * torch.eye(m, dtype=torch.float64)  # (K, M, M)
        diff = y_pix.unsqueeze(2) - (prior.means @ a.T)  # (G, L, K, M)
        sol = torch.linalg.solve(ev_cov, diff.unsqueeze(-1)).squeeze(-1)
        log_ev = -0.5 * ((diff * sol).sum(-1) + torch.logdet(ev_cov) + m * _LOG_2PI)
        log_w = torch.log_softmax(prior.weights.log() + log_ev, dim=-1)
        # Component means m_k = S_k (Sigma_k^-1 mu_k + A^T y / s2).
        prior_term = torch.linalg.solve(prior.covs, prior.means.unsqueeze(-1)).squeeze(-1)  # (K, C)
        data_term = y_pix @ a / s2  # (G, L, C)
        rhs = prior_term + data_term.unsqueeze(2)  # (G, L, K, C)
        means = torch.einsum("kcd,glkd->glkc", self.post_covs, rhs)
        return MixturePosterior(log_w, means, self.eigvals, self.eigvecs, (h, w))


class MixturePosterior:
    """Per-pixel Gaussian-mixture posterior of G images, with its exact denoiser.

    Attributes:
        log_weights: (G, L, K) log w_k per image and pixel (L = H * W).
        means: (G, L, K, C) component means m_k.
        eigvals, eigvecs: (K, C) and (K, C, C), the eigendecomposition of the shared covariances S_k.

    Batched inputs x have shape (G*N, C, H, W): rows ``g*N ... g*N+N-1`` belong to image g (any N >= 1).
    """

    def __init__(self, log_weights, means, eigvals, eigvecs, size):
        self.log_weights = log_weights
        self.means = means
        self.eigvals = eigvals
        self.eigvecs = eigvecs
        self.size = tuple(size)

    @property
    def num_images(self) -> int:
        return self.means.shape[0]

    @property
    def channels(self) -> int:
        return self.means.shape[-1]

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(G*N, C, H, W) -> (G, N, L, C) float64."""
        g, c = self.num_images, self.channels
        if x.ndim != 4 or x.shape[1] != c or tuple(x.shape[2:]) != self.size or x.shape[0] % g:
            raise ValueError(
                f"x must have shape (G*N, {c}, {self.size[0]}, {self.size[1]}) with G={g}, got {tuple(x.shape)}"
            )
        n = x.shape[0] // g
        return x.double().reshape(g, n, c, -1).transpose(-1, -2)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(G, N, L, C) -> (G*N, C, H, W)."""
        g, n, _, c = pixels.shape
        return pixels.transpose(-1, -2).reshape(g * n, c, *self.size)

    def _components(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]):
        """Rotated offsets u = U_k^T (x - m_k), variances lam + sigma^2 and log w_k N(x; m_k, S_k + sigma^2 I)."""
        pix = self._pixels(x)  # (G, N, L, C)
        diff = pix.unsqueeze(3) - self.means.unsqueeze(1)  # (G, N, L, K, C)
        u = torch.einsum("gnlkc,kcd->gnlkd", diff, self.eigvecs)
        var = self.eigvals + torch.as_tensor(sigma, dtype=torch.float64) ** 2  # (K, C)
        log_norm = -0.5 * ((u.square() / var).sum(-1) + var.log().sum(-1) + self.channels * _LOG_2PI)
        return u, var, self.log_weights.unsqueeze(1) + log_norm  # log joint: (G, N, L, K)

    def log_prob(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
        """log p(x | y) per pixel at noise level sigma (0: the posterior itself), shape (G*N, H, W)."""
        _, _, log_joint = self._components(x, sigma)
        g, n, l, _ = log_joint.shape
        return log_joint.logsumexp(-1).reshape(g * n, *self.size)

    def denoise(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x, y], same shape as x, float64; sigma a scalar (float or 0-d tensor)."""
        u, var, log_joint = self._components(x, sigma)
        resp = torch.softmax(log_joint, dim=-1)  # (G, N, L, K)
        gain = self.eigvals / var  # S_k (S_k + sigma^2 I)^-1 in the eigenbasis
        shrunk = torch.einsum("gnlkd,kcd->gnlkc", u * gain, self.eigvecs)
        cond = self.means.unsqueeze(1) + shrunk
        return self._image((resp.unsqueeze(-1) * cond).sum(3))

    def __call__(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], **_: object) -> torch.Tensor:
        """k-diffusion denoiser signature ``model(x, sigma) -> denoised``."""
        return self.denoise(x, sigma)

    def mean(self) -> torch.Tensor:
        """The exact posterior mean (the MMSE estimate), shape (G, C, H, W)."""
        mean = (self.log_weights.exp().unsqueeze(-1) * self.means).sum(2)  # (G, L, C)
        return self._image(mean.unsqueeze(1))

    def mode(self, iterations: int = 200) -> torch.Tensor:
        """The posterior mode per pixel, shape (G, C, H, W).

        A Gaussian mixture's modes have no closed form; this runs the mixture's fixed-point iteration
        ``x <- (sum_k r_k S_k^-1)^-1 sum_k r_k S_k^-1 m_k`` (which increases the density at every step) from
        every component mean and keeps, per pixel, the start that ends highest.
        """
        k = self.means.shape[2]
        prec = self.eigvecs @ torch.diag_embed(1.0 / self.eigvals) @ self.eigvecs.transpose(-1, -2)  # (K, C, C)
        prec_means = torch.einsum("kcd,glkd->glkc", prec, self.means)
        best, best_lp = None, None
        for start in range(k):
            x = self.means[:, :, start]  # (G, L, C)
            for _ in range(iterations):
                img = self._image(x.unsqueeze(1))
                _, _, log_joint = self._components(img, 0.0)
                r = torch.softmax(log_joint[:, 0], dim=-1)  # (G, L, K)
                lhs = torch.einsum("glk,kcd->glcd", r, prec)
                rhs = (r.unsqueeze(-1) * prec_means).sum(2)
                x = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
            lp = self.log_prob(self._image(x.unsqueeze(1))).reshape(x.shape[:2])
            if best is None:
                best, best_lp = x, lp
            else:
                better = (lp > best_lp).unsqueeze(-1)
                best, best_lp = torch.where(better, x, best), torch.maximum(lp, best_lp)
        return self._image(best.unsqueeze(1))

    def sample(self, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``num`` exact posterior samples per image, shape (G*num, C, H, W), image g's rows contiguous."""
        g, l, k, c = self.means.shape
        probs = self.log_weights.exp().reshape(g * l, k)
        comp = torch.multinomial(probs, num, replacement=True, generator=generator).reshape(g, l, num)
        comp = comp.permute(0, 2, 1)  # (G, num, L)
        eps = torch.randn(g, num, l, c, dtype=torch.float64, generator=generator)
        # x = m_k + U_k diag(sqrt(lam_k)) eps
        scaled = self.eigvecs[comp] @ (self.eigvals[comp].sqrt() * eps).unsqueeze(-1)
        means = torch.gather(self.means.unsqueeze(1).expand(g, num, l, k, c), 3,
                             comp[..., None, None].expand(g, num, l, 1, c)).squeeze(3)
        return self._image(means + scaled.squeeze(-1))


def psnr(x: torch.Tensor, reference: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """PSNR in dB per image, ``10 log10(range^2 / MSE)``; the default range 2 is that of data in [-1, 1].

    ``x`` is (G*N, ...) and ``reference`` (G, ...): each image's N rows are compared with its reference.
    """
    g = reference.shape[0]
    if x.shape[0] % g or x.shape[1:] != reference.shape[1:]:
        raise ValueError(f"x {tuple(x.shape)} does not match reference {tuple(reference.shape)}")
    n = x.shape[0] // g
    err = (x.double().reshape(g, n, -1) - reference.double().reshape(g, 1, -1)).square().mean(-1)
    return (10.0 * torch.log10(peak_to_peak**2 / err)).reshape(g * n)


def default_problem() -> LinearRestoration:
    """The demo's problem: 4 channels, 3 components, observed through 2 pairwise channel averages.

    Components 0 and 1 have the same image under A, so wherever the truth comes from one of them the posterior
    is bimodal (weights 0.5 : 0.3) and its mean lies between the modes, where the density is low: the classic
    case where an MMSE estimate is blurred and a random posterior sample is sharp but can be far off.
    """
    means = [[0.8, 0.2, -0.5, 0.5], [0.2, 0.8, 0.5, -0.5], [-0.6, -0.6, 0.0, 0.0]]
    stds = torch.tensor([0.15, 0.2, 0.25], dtype=torch.float64)
    covs = torch.eye(4, dtype=torch.float64) * stds.square().reshape(3, 1, 1)
    prior = MixturePrior(means, covs, [0.5, 0.3, 0.2])
    operator = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    return LinearRestoration(prior, operator, noise_std=0.1)
