"""The exact-posterior maths of the demo's restoration problem, against closed forms, autograd and Monte Carlo."""

import math

import pytest
import torch

from kds_hook.analytic import GaussianMixture
from kds_hook.demo.posterior import LinearRestoration, MixturePrior, default_problem, psnr

C, M, K = 3, 2, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_problem(seed=0, noise_std=0.3):
    """Full-covariance components and a generic (non-diagonal) operator."""
    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(K, C, dtype=torch.float64, generator=gen)
    factors = 0.4 * torch.randn(K, C, C, dtype=torch.float64, generator=gen)
    covs = factors @ factors.transpose(-1, -2) + 0.05 * torch.eye(C, dtype=torch.float64)
    operator = torch.randn(M, C, dtype=torch.float64, generator=gen)
    return LinearRestoration(MixturePrior(means, covs, [0.5, 0.3, 0.2]), operator, noise_std)


def gaussian_log_pdf(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


def prior_log_pdf(prior, x):
    """log p(x0) for x of shape (P, C), straight from the definition."""
    comps = torch.stack([gaussian_log_pdf(x, prior.means[k], prior.covs[k]) for k in range(K)], -1)
    return (prior.weights.log() + comps).logsumexp(-1)


def one_pixel_posterior(problem, seed=1):
    gen = torch.Generator().manual_seed(seed)
    truth = problem.prior.sample(1, 1, 1, gen)
    y = problem.observe(truth, gen)
    return y, problem.posterior(y)


def test_posterior_is_prior_times_likelihood_normalised_by_evidence():
    problem = random_problem()
    y, post = one_pixel_posterior(problem)
    x = 1.5 * torch.randn(64, C, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lik = gaussian_log_pdf(
        y.reshape(1, M), x.reshape(64, C) @ problem.operator.T, problem.noise_std**2 * torch.eye(M, dtype=torch.float64)
    )
    unnormalised = prior_log_pdf(problem.prior, x.reshape(64, C)) + lik
    # p(y) by its own closed form: sum_k pi_k N(y; A mu_k, A Sigma_k A^T + s^2 I).
    a, s2 = problem.operator, problem.noise_std**2
    evidence = torch.stack(
        [
            problem.prior.weights[k].log()
            + gaussian_log_pdf(y.reshape(M), a @ problem.prior.means[k], a @ problem.prior.covs[k] @ a.T + s2 * torch.eye(M, dtype=torch.float64))
            for k in range(K)
        ]
    ).logsumexp(0)
    torch.testing.assert_close(post.log_prob(x).reshape(64), unnormalised - evidence, rtol=0, atol=1e-10)


def test_log_prob_at_sigma_is_the_posterior_convolved_with_the_noise():
    problem = random_problem()
    _, post = one_pixel_posterior(problem)
    sigma = 0.7
    x = torch.randn(16, C, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = post.log_weights[0, 0]
    expected = torch.stack(
        [
            weights[k] + gaussian_log_pdf(x.reshape(16, C), post.means[0, 0, k], problem.post_covs[k] + sigma**2 * torch.eye(C, dtype=torch.float64))
            for k in range(K)
        ],
        -1,
    ).logsumexp(-1)
    torch.testing.assert_close(post.log_prob(x, sigma).reshape(16), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_denoiser_is_tweedie_of_the_noisy_posterior(sigma):
    """E[x0 | x, y] = x + sigma^2 grad_x log p_sigma(x | y), exactly."""
    problem = random_problem()
    gen = torch.Generator().manual_seed(4)
    truth = problem.prior.sample(2, 3, 2, gen)
    post = problem.posterior(problem.observe(truth, gen))
    x = (post.sample(3, gen) + sigma * torch.randn(6, C, 3, 2, dtype=torch.float64, generator=gen)).requires_grad_()
    (grad,) = torch.autograd.grad(post.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(post.denoise(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=0, atol=1e-9)


def test_denoiser_matches_monte_carlo():
    """E[x0 | x] by self-normalised importance weights over exact posterior samples."""
    problem = random_problem(noise_std=0.5)
    y, post = one_pixel_posterior(problem)
    sigma = 0.8
    gen = torch.Generator().manual_seed(5)
    samples = post.sample(200_000, gen).reshape(-1, C)
    x = post.sample(1, gen) + sigma * torch.randn(1, C, 1, 1, dtype=torch.float64, generator=gen)
    log_w = -0.5 * (samples - x.reshape(1, C)).square().sum(-1) / sigma**2
    estimate = (torch.softmax(log_w, 0).unsqueeze(-1) * samples).sum(0)
    torch.testing.assert_close(post.denoise(x, sigma).reshape(C), estimate, rtol=0, atol=0.02)


def test_denoiser_limits():
    problem = random_problem()
    _, post = one_pixel_posterior(problem)
    x = torch.randn(5, C, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(post.denoise(x, 0.0), x, rtol=0, atol=1e-12)  # no noise: x is x0
    far = post.denoise(x, 1e6)  # all information from x gone: the posterior mean
    torch.testing.assert_close(far, post.mean().expand(5, C, 1, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
def test_core_mixture_log_prob_and_denoiser_are_exact(sigma):
    """analytic.GaussianMixture: log p_sigma by its definition, and E[x0 | x] = x + sigma^2 grad log p_sigma."""
    mixture = GaussianMixture([[0.0, 1.0], [2.0, -1.0]], [[0.3, 0.5], [0.6, 0.2]], [0.7, 0.3])
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).requires_grad_()
    expected = torch.stack(
        [
            mixture.weights[k].log()
            + gaussian_log_pdf(x.detach(), mixture.means[k], torch.diag(mixture.stds[k].square() + sigma**2))
            for k in range(2)
        ],
        -1,
    ).logsumexp(-1)
    torch.testing.assert_close(mixture.log_prob(x.detach(), sigma), expected, rtol=0, atol=1e-12)
    if sigma > 0:
        (grad,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(mixture.denoise(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=0, atol=1e-12)


def test_samples_have_the_posterior_mean_and_covariance():
    problem = random_problem()
    _, post = one_pixel_posterior(problem)
    samples = post.sample(100_000, torch.Generator().manual_seed(7)).reshape(-1, C)
    torch.testing.assert_close(samples.mean(0), post.mean().reshape(C), rtol=0, atol=0.01)
    w = post.log_weights[0, 0].exp()
    m = post.means[0, 0]
    mean = (w.unsqueeze(-1) * m).sum(0)
    cov = sum(w[k] * (problem.post_covs[k] + torch.outer(m[k] - mean, m[k] - mean)) for k in range(K))
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0, atol=0.02)


def test_mode_is_a_stationary_point_at_least_as_high_as_every_component_mean():
    problem = random_problem()
    gen = torch.Generator().manual_seed(8)
    post = problem.posterior(problem.observe(problem.prior.sample(2, 2, 2, gen), gen))
    mode = post.mode().requires_grad_()
    (grad,) = torch.autograd.grad(post.log_prob(mode).sum(), mode)
    assert grad.abs().max() < 1e-6
    for k in range(K):
        start = post._image(post.means[:, :, k].unsqueeze(1))
        assert bool((post.log_prob(mode.detach()) >= post.log_prob(start) - 1e-9).all())


def test_uninformative_observation_gives_the_prior_and_the_core_mixture_denoiser():
    """With A = 0 the posterior is the prior; for diagonal covariances that is analytic.GaussianMixture."""
    means = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.3, 0.5, 0.4], [0.6, 0.2, 0.3], [0.4, 0.4, 0.4]], dtype=torch.float64)
    weights = [0.2, 0.5, 0.3]
    problem = LinearRestoration(MixturePrior(means, torch.diag_embed(stds.square()), weights), torch.zeros(M, C), 0.1)
    y = torch.randn(1, M, 2, 2, dtype=torch.float64)
    post = problem.posterior(y)
    torch.testing.assert_close(post.log_weights.exp()[0, 0], torch.tensor(weights, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(1, C, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    reference = GaussianMixture(means, stds, weights)
    flat = x.permute(0, 2, 3, 1).reshape(4, C)
    expected = reference.denoise(flat, 0.6).reshape(1, 2, 2, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(post.denoise(x, 0.6), expected, rtol=0, atol=1e-12)


def test_default_problem_is_bimodal_where_the_truth_is_ambiguous():
    problem = default_problem()
    gen = torch.Generator().manual_seed(10)
    truth = problem.prior.sample(4, 8, 8, gen)
    post = problem.posterior(problem.observe(truth, gen))
    w = post.log_weights.exp()
    ambiguous = (w[..., 0] > 0.1) & (w[..., 1] > 0.1)
    assert 0.3 < float(ambiguous.double().mean()) < 0.95
    # The MMSE estimate beats the mode in PSNR but lies in low density: the point of the demo's table.
    assert float(psnr(post.mean(), truth).mean()) > float(psnr(post.mode(), truth).mean())
    assert float(post.log_prob(post.mean()).mean()) < float(post.log_prob(post.mode()).mean())


def test_psnr_closed_form_and_pairing():
    ref = torch.zeros(2, 1, 2, 2)
    x = torch.cat([torch.full((3, 1, 2, 2), 0.1), torch.full((3, 1, 2, 2), 0.2)])
    expected = torch.tensor([10 * math.log10(4 / 0.01)] * 3 + [10 * math.log10(4 / 0.04)] * 3, dtype=torch.float64)
    torch.testing.assert_close(psnr(x, ref), expected)


def test_bad_inputs_are_named():
    prior = default_problem().prior
    with pytest.raises(ValueError, match="positive definite"):
        MixturePrior(prior.means, -prior.covs, prior.weights)
    with pytest.raises(ValueError, match="operator"):
        LinearRestoration(prior, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        LinearRestoration(prior, torch.ones(2, 4), float("nan"))
    post = default_problem().posterior(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        post.denoise(torch.zeros(3, 4, 4, 4), 1.0)  # 3 rows for 2 images
    with pytest.raises(ValueError, match="y must have shape"):
        default_problem().posterior(torch.zeros(2, 3, 4, 4))
