"""kds_hook.k_diffusion with k-diffusion's real samplers (loaded by kdiffusion_loader) and exact mixture models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from kdiffusion_loader import importorskip_k_diffusion
from kds_hook import KDS
from kds_hook.analytic import GaussianMixture, three_gaussians
from kds_hook.k_diffusion import KDSDenoiser, SampleResult, sample

kd = importorskip_k_diffusion()

# torchsde warns when k-diffusion's float32 sigma_max is compared with its float64 copy; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Should have tb<=t1")

SAMPLERS = [
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpm_fast",
    "sample_dpm_adaptive",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
]
# Loose tolerances and a large first step keep the adaptive solver at a handful of evaluations.
SAMPLER_KWARGS = {"sample_dpm_adaptive": {"rtol": 0.5, "atol": 0.1, "h_init": 0.5}}
TRAIN_STEPS = 1000


class MixtureDenoiser(kd.external.DiscreteSchedule):
    """The exact denoiser of a Gaussian mixture on a DDPM schedule (Stable Diffusion's scaled-linear betas).

    Works per pixel: x is (M, D) or (M, D, *spatial) with D the mixture's dimension. ``offset`` (extra arg)
    shifts the mixture per row, so conditioning has a visible, exact effect. Counts its evaluations.
    """

    def __init__(self, mixture: GaussianMixture, quantize: bool = False):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt().float(), quantize)
        self.mixture = mixture
        self.calls = 0
        self.sigmas_seen = []

    def forward(self, x, sigma, offset=None):
        self.calls += 1
        self.sigmas_seen.append(sigma.detach().clone())
        return denoise_mixture(self.mixture, x, sigma, offset)


def denoise_mixture(mixture, x, sigma, offset=None):
    if offset is not None:
        x = x - offset
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])  # one mixture vector per pixel
    pixels = rows.shape[0] // x.shape[0]
    x0 = mixture.denoise(rows, sigma.repeat_interleave(pixels)).reshape(x.movedim(1, -1).shape).movedim(-1, 1)
    return x0 if offset is None else x0 + offset


class ContinuousMixture:
    """The same exact mixture denoiser without a discrete schedule (a continuous-time model)."""

    def __init__(self, mixture):
        self.mixture = mixture
        self.sigmas_seen = []

    def __call__(self, x, sigma):
        self.sigmas_seen.append(sigma.detach().clone())
        return denoise_mixture(self.mixture, x, sigma)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance over a conditional denoiser (the docs' recipe): uncond + s * (cond - uncond)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, x, sigma, uncond, cond, cond_scale):
        both = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), offset=torch.cat([uncond, cond]))
        x0_uncond, x0_cond = both.chunk(2)
        return x0_uncond + (x0_cond - x0_uncond) * cond_scale


def plain_sampler(name, model, x, sigmas, seed, **kwargs):
    """The sampler without KDS; dpm_fast/dpm_adaptive get sigma_min/sigma_max/n as sample() derives them."""
    sampler = getattr(kd.sampling, name)
    kwargs = {**SAMPLER_KWARGS.get(name, {}), **kwargs}
    torch.manual_seed(seed)
    if name == "sample_dpm_fast":
        return sampler(model, x, float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1, disable=True, **kwargs)
    if name == "sample_dpm_adaptive":
        return sampler(model, x, float(sigmas[-2]), float(sigmas[0]), disable=True, **kwargs)
    return sampler(model, x, sigmas, disable=True, **kwargs)


def kds_sampler(name, model, x, sigmas, kds, seed, **kwargs):
    torch.manual_seed(seed)
    kwargs = {**SAMPLER_KWARGS.get(name, {}), **kwargs}
    return sample(getattr(kd.sampling, name), model, x, sigmas, kds, return_all=True, disable=True, **kwargs)


def particle_noise(items, num_particles, shape, sigma, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(items * num_particles, *shape, generator=generator) * sigma


@pytest.fixture
def model():
    return MixtureDenoiser(three_gaussians())


# ---------------------------------------------------------------------------------------------- import rules


def test_importing_kds_hook_does_not_import_k_diffusion():
    code = (
        "import sys, kds_hook, kds_hook.k_diffusion; "
        "assert 'k_diffusion' not in sys.modules, sorted(m for m in sys.modules if 'k_diffusion' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loader_leaves_no_torchvision_stand_in_behind():
    import importlib.util

    kd_utils = sys.modules["k_diffusion.utils"]
    if importlib.util.find_spec("torchvision") is None:
        assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)
        with pytest.raises(AttributeError, match="stand-in"):
            kd_utils.from_pil_image(None)


# ------------------------------------------------------------------------------------- exactness, 13 samplers


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("case", ["strength_0", "one_particle"])
def test_reproduces_the_plain_sampler_bit_for_bit(model, name, case):
    num_particles, strength = (4, 0.0) if case == "strength_0" else (1, 0.3)
    sigmas = model.get_sigmas(6)
    x = particle_noise(2, num_particles, (2, 2, 2), sigmas[0], seed=1)
    expected = plain_sampler(name, model, x, sigmas, seed=7)
    kds = KDS(num_particles=num_particles, bandwidth=1.0, strength=strength, threshold=0.0)
    result = kds_sampler(name, model, x, sigmas, kds, seed=7)
    assert torch.equal(result.particles, expected)
    if num_particles == 1:
        assert torch.equal(result.sample, expected)


@pytest.mark.parametrize("name", SAMPLERS)
def test_steers_every_model_evaluation(model, name):
    sigmas = model.get_sigmas(6)
    x = particle_noise(2, 4, (2, 2, 2), sigmas[0], seed=2)
    plain = plain_sampler(name, model, x, sigmas, seed=3)
    model.calls = 0
    kds = KDS(num_particles=4, bandwidth=1.0, threshold=0.0, record=True)  # gate open at every step
    result = kds_sampler(name, model, x, sigmas, kds, seed=3)
    assert model.calls > 0
    assert len(kds.history) == model.calls  # one steer_x0 call per model evaluation, stages included
    assert all(record.strength == 0.3 for record in kds.history)
    assert not torch.allclose(result.particles, plain)
    assert result.sample.shape == (2, 2, 2, 2) and result.index.shape == (2,)


def test_dpm_adaptive_info_and_explicit_sigma_range(model):
    sigmas = model.get_sigmas(6)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=4)
    kds = KDS(num_particles=4, strength=0.0)
    kwargs = dict(SAMPLER_KWARGS["sample_dpm_adaptive"], disable=True, return_info=True)
    sampler = kd.sampling.sample_dpm_adaptive
    selected, info = sample(sampler, model, x, None, kds, sigma_min=0.1, sigma_max=10.0, **kwargs)
    expected, expected_info = sampler(model, x, 0.1, 10.0, **kwargs)
    assert info == expected_info and info["nfe"] > 0
    assert torch.equal(selected, kds.select(expected).sample)
    result = sample(sampler, model, x, sigmas, kds, return_all=True, **kwargs)
    assert isinstance(result, SampleResult) and result.info["nfe"] > 0


# ------------------------------------------------------------------------------------------ items and extras


@pytest.mark.parametrize("name", ["sample_dpmpp_2m", "sample_euler_ancestral"])
def test_items_never_interact(model, name):
    sigmas = model.get_sigmas(6)
    x = particle_noise(3, 5, (2, 2, 2), sigmas[0], seed=5)
    changed = x.clone()
    changed[5:10] = particle_noise(1, 5, (2, 2, 2), sigmas[0], seed=6)  # item 1's particles only
    kds = KDS(num_particles=5, bandwidth="auto", threshold=0.0)
    first = kds_sampler(name, model, x, sigmas, kds, seed=8)
    second = kds_sampler(name, model, changed, sigmas, kds, seed=8)
    assert torch.equal(first.particles[:5], second.particles[:5])
    assert torch.equal(first.particles[10:], second.particles[10:])
    assert not torch.allclose(first.particles[5:10], second.particles[5:10])
    assert first.index[0] == second.index[0] and first.index[2] == second.index[2]


def test_extra_args_are_repeated_per_particle(model):
    sigmas = model.get_sigmas(8)
    offsets = torch.tensor([[0.0, 0.0], [40.0, -40.0]])  # item 1's mixture is far away
    x = particle_noise(2, 4, (2,), sigmas[0], seed=9)
    kds = KDS(num_particles=4)
    euler = kd.sampling.sample_euler
    per_item = sample(euler, model, x, sigmas, kds, {"offset": offsets}, return_all=True, disable=True)
    expanded = {"offset": offsets.repeat_interleave(4, 0)}
    per_particle = sample(euler, model, x, sigmas, kds, expanded, return_all=True, disable=True)
    assert torch.equal(per_item.particles, per_particle.particles)
    # Each item's particles end at its own (shifted) modes.
    for item, offset in enumerate(offsets):
        ends = per_item.particles[item * 4 : item * 4 + 4] - offset
        assert torch.cdist(ends.double(), model.mixture.means).min(dim=1).values.max() < 2.0


def test_nested_extra_args(model):
    received = []

    def recording_model(x, sigma, cond, scale):
        received.append((cond, scale))
        return model(x, sigma)

    kds = KDS(num_particles=3)
    per_item, per_particle, scalar = torch.arange(2.0), torch.arange(6.0), torch.tensor(5.0)
    extra = {"cond": {"items": [per_item, per_particle], "scalar": (scalar,)}, "scale": 2.5}
    sigmas = model.get_sigmas(3)
    x = particle_noise(2, 3, (2,), sigmas[0], seed=10)
    sample(kd.sampling.sample_euler, KDSDenoiser(recording_model, kds, sigma_threshold=1.0), x, sigmas, kds, extra,
           disable=True)
    cond, scale = received[0]
    assert torch.equal(cond["items"][0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert cond["items"][1] is per_particle and cond["scalar"] == (scalar,) and scale == 2.5
    assert isinstance(cond["scalar"], tuple)


# --------------------------------------------------------------------------------------------------- gating


def test_gate_follows_t_over_T_of_the_discrete_schedule(model):
    kds = KDS(num_particles=4, record=True)  # the paper's gate: 0.3 while t/T >= 0.3
    sigmas = model.get_sigmas(6)
    x = particle_noise(1, 4, (2,), sigmas[0], seed=11)
    sample(kd.sampling.sample_heun, model, x, sigmas, kds, disable=True)
    assert len(kds.history) == len(model.sigmas_seen) == 11  # Heun: 2 per step, 1 in the last
    for record, sigma in zip(kds.history, model.sigmas_seen):
        t_frac = float(model.sigma_to_t(sigma[:1])) / TRAIN_STEPS
        assert record.t_frac == pytest.approx(t_frac, abs=1e-6)
        assert record.strength == (0.3 if t_frac >= 0.3 else 0.0)
    assert {record.strength for record in kds.history} == {0.0, 0.3}


@pytest.mark.parametrize("quantize", [False, True])
def test_gate_opens_exactly_at_the_threshold_timestep(quantize):
    model = MixtureDenoiser(three_gaussians(), quantize=quantize)
    kds = KDS(num_particles=4, bandwidth=1.0)
    denoiser = KDSDenoiser(model, kds)
    x = particle_noise(1, 4, (2,), 1.0, seed=12)
    for timestep, steered in [(299, False), (300, True)]:
        sigma = model.sigmas[timestep].expand(4)
        out, plain = denoiser(x, sigma), model(x, sigma)
        assert torch.equal(out, plain) is not steered


def test_sigma_threshold_for_a_continuous_model():
    model = ContinuousMixture(three_gaussians())
    with pytest.raises(ValueError, match="sigma_threshold"):
        KDSDenoiser(model, KDS(num_particles=4))
    kds = KDS(num_particles=4, bandwidth=1.0, record=True)
    denoiser = KDSDenoiser(model, kds, sigma_threshold=1.0)
    sigmas = kd.sampling.get_sigmas_karras(8, 0.05, 20.0)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=13)
    sample(kd.sampling.sample_dpmpp_2m, denoiser, x, sigmas, kds, disable=True)
    strengths = [0.3 if float(sigma[0]) >= 1.0 else 0.0 for sigma in model.sigmas_seen]
    assert [record.strength for record in kds.history] == strengths
    assert set(strengths) == {0.0, 0.3}
    one = torch.ones(8)
    assert torch.equal(denoiser(x, one * 0.999), model(x, one * 0.999))
    assert not torch.equal(denoiser(x, one), model(x, one))
    per_item = torch.tensor([2.0] * 4 + [0.5] * 4)  # item 0 above the threshold, item 1 below
    out, plain = denoiser(x, per_item), model(x, per_item)
    assert not torch.equal(out[:4], plain[:4]) and torch.equal(out[4:], plain[4:])
    with pytest.raises(ValueError, match="same noise level"):
        denoiser(x, torch.tensor([2.0, 0.5] * 4))


def test_schedule_with_sigma_to_t_frac():
    model = ContinuousMixture(three_gaussians())
    kds = KDS(num_particles=4, schedule=lambda t_frac: 0.5 * t_frac, record=True)

    def sigma_to_t_frac(sigma):
        return sigma / (1 + sigma)

    with pytest.raises(ValueError, match="schedule"):
        KDSDenoiser(model, kds, sigma_threshold=1.0)
    denoiser = KDSDenoiser(model, kds, sigma_to_t_frac=sigma_to_t_frac)
    sigmas = kd.sampling.get_sigmas_karras(5, 0.05, 20.0)
    x = particle_noise(1, 4, (2,), sigmas[0], seed=14)
    sample(kd.sampling.sample_euler, denoiser, x, sigmas, kds, disable=True)
    for record, sigma in zip(kds.history, model.sigmas_seen):
        t_frac = float(sigma[0]) / (1 + float(sigma[0]))
        assert record.t_frac == pytest.approx(t_frac) and record.strength == pytest.approx(0.5 * t_frac)
    # The same map given to KDS itself serves a KDSDenoiser built without one.
    kds_with_map = KDS(num_particles=4, schedule=lambda t_frac: 0.5 * t_frac, sigma_to_t_frac=sigma_to_t_frac)
    assert KDSDenoiser(model, kds_with_map).sigma_to_t_frac is sigma_to_t_frac


# ------------------------------------------------------------------------------------------------------ CFG


def test_cfg_composition_steers_the_guided_prediction(model):
    kds = KDS(num_particles=4, bandwidth=1.0, record=True)
    cfg = CFGDenoiser(model)
    denoiser = KDSDenoiser(cfg, kds)  # t/T found on cfg.inner_model, a discrete schedule
    uncond, cond = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    extra = {"uncond": uncond.repeat_interleave(4, 0), "cond": cond.repeat_interleave(4, 0), "cond_scale": 3.0}
    x = particle_noise(2, 4, (2,), 2.0, seed=15)
    sigma = model.sigmas[600].expand(8)
    guided = cfg(x, sigma, **extra)
    steered = denoiser(x, sigma, **extra)
    assert torch.equal(steered, kds.steer_x0(guided, t_frac=0.6))  # Algorithm 3: KDS after guidance
    assert not torch.equal(steered, guided)

    model.calls, kds.history[:] = 0, []
    sigmas = model.get_sigmas(5)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=16)
    extra = {"uncond": uncond, "cond": cond, "cond_scale": 3.0}  # per item: sample() repeats them
    result = sample(kd.sampling.sample_dpmpp_2m, denoiser, x, sigmas, kds, extra, return_all=True, disable=True)
    assert len(kds.history) == model.calls == 5  # one guided (double-batch) evaluation per step
    assert result.sample.shape == (2, 2)


# --------------------------------------------------------------------------------------- the paper's Figure 2


def test_figure2_kds_moves_particles_toward_their_modes(model):
    """Paired over seeds: KDS (paper's gate, N=50, patch = the whole 2-D vector) vs the plain exact sampler."""
    mixture = model.mixture
    sigmas = model.get_sigmas(20)
    differences = []
    for seed in range(8):
        x = particle_noise(4, 50, (2,), sigmas[0], seed=100 + seed)
        plain = kd.sampling.sample_euler(model, x, sigmas, disable=True)
        steered = sample(kd.sampling.sample_euler, model, x, sigmas, KDS(num_particles=50), return_all=True,
                         disable=True).particles
        distance = [torch.cdist(p.double(), mixture.means).min(dim=1).values.mean() for p in (steered, plain)]
        differences.append(float(distance[0] - distance[1]))
    differences = torch.tensor(differences)
    mean, standard_error = differences.mean(), differences.std() / len(differences) ** 0.5
    # Measured: mean -0.015, standard error 0.001 (plain: 0.56 from the nearest mode).
    assert mean < -5 * standard_error and mean < -0.005


# ----------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs(model):
    kds = KDS(num_particles=4)
    sigmas = model.get_sigmas(3)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=17)
    with pytest.raises(ValueError, match="divisible|contiguous particles"):
        sample(kd.sampling.sample_euler, model, x[:7], sigmas, kds, disable=True)
    with pytest.raises(ValueError, match=r"extra_args\['offset'\] has batch size 3"):
        sample(kd.sampling.sample_euler, model, x, sigmas, kds, {"offset": torch.zeros(3, 2)}, disable=True)
    with pytest.raises(TypeError, match="not the name"):
        sample("sample_euler", model, x, sigmas, kds)
    with pytest.raises(ValueError, match="sigma_min, sigma_max, n"):
        sample(kd.sampling.sample_dpm_fast, model, x, None, kds)
    with pytest.raises(ValueError, match="different KDS"):
        sample(kd.sampling.sample_euler, KDSDenoiser(model, KDS(num_particles=4)), x, sigmas, kds)
    with pytest.raises(ValueError, match="not both"):
        KDSDenoiser(model, kds, sigma_threshold=1.0, sigma_to_t_frac=lambda s: s)
    with pytest.raises(ValueError, match="non-negative"):
        KDSDenoiser(model, kds, sigma_threshold=float("nan"))
    with pytest.raises(TypeError, match="kds_hook.KDS"):
        KDSDenoiser(model, {"num_particles": 4})
    with pytest.raises(ValueError, match="divisible"):
        KDSDenoiser(model, kds)(x[:6], sigmas[0].expand(6))


def test_wrapper_forwards_attributes_and_module_calls(model):
    denoiser = KDSDenoiser(model, KDS(num_particles=2))
    assert denoiser.sigmas is model.sigmas and torch.equal(denoiser.get_sigmas(4), model.get_sigmas(4))
    assert denoiser.inner_model is model and denoiser.mixture is model.mixture
    denoiser.to(torch.float64).eval()
    assert model.sigmas.dtype == torch.float64 and not model.training
    with pytest.raises(AttributeError):
        denoiser.no_such_attribute
