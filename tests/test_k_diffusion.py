"""kds_hook.k_diffusion with k-diffusion's real samplers (loaded by kds_hook.k_diffusion_loader) and exact mixture
models."""

from __future__ import annotations

import ast
import copy
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from kdiffusion_loader import importorskip_k_diffusion
from rounding import assert_equal_to_rounding
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
STEPS = 6  # model.get_sigmas(STEPS) has STEPS + 1 values: STEPS steps, the last one to sigma = 0


def model_evaluations(name, info=None):
    """How many times each sampler calls the model over STEPS steps (read off k_diffusion/sampling.py)."""
    if name == "sample_dpm_adaptive":
        return info["nfe"]  # `order` evaluations per attempted step
    if name in ("sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                "sample_dpmpp_sde"):
        return 2 * STEPS - 1  # two per step; the last step, to sigma = 0, is a single Euler step
    return STEPS  # one per step; dpm_fast gets n = len(sigmas) - 1 evaluations from sample()


DOC = Path(__file__).resolve().parents[1] / "docs" / "k_diffusion.md"


def doc_section(heading):
    """The text of the docs page's section ``## heading``."""
    return DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def doc_code_blocks(heading):
    """The ```python blocks of the docs page's section ``## heading``, in order."""
    return re.findall(r"```python\n(.*?)```", doc_section(heading), re.S)


class MixtureDenoiser(kd.external.DiscreteSchedule):
    """The exact denoiser of a Gaussian mixture on a DDPM schedule (Stable Diffusion's scaled-linear betas).

    Works per pixel: x is (M, D) or (M, D, *spatial) with D the mixture's dimension. ``cond`` (extra arg, (M, D))
    shifts the mixture per row, so conditioning has a visible, exact effect. Counts its evaluations.
    """

    def __init__(self, mixture: GaussianMixture, quantize: bool = False):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt().float(), quantize)
        self.mixture = mixture
        self.calls = 0
        self.sigmas_seen = []

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        self.sigmas_seen.append(sigma.detach().clone())
        return denoise_mixture(self.mixture, x, sigma, cond)


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


class RecordingNetwork(nn.Module):
    """Stands in for the trained network inside k-diffusion's discrete wrappers: records the timestep t and the
    conditioning it receives, and predicts eps (or v) linearly, so every sampler runs."""

    def __init__(self, alphas_cumprod=None, learned_sigmas=False):
        super().__init__()
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.learned_sigmas = learned_sigmas
        self.timesteps, self.conds = [], []

    def forward(self, x, t, cond):
        self.timesteps.append(t.detach().clone())
        self.conds.append(cond)
        prediction = 0.5 * x + 0.1 * cond.reshape(cond.shape + (1,) * (x.ndim - cond.ndim))
        return torch.cat([prediction, prediction], dim=1) if self.learned_sigmas else prediction

    def apply_model(self, x, t, cond):  # CompVis LatentDiffusion's entry point
        return self(x, t, cond)


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def discrete_wrapper(name, quantize):
    """One of k-diffusion's five discrete-schedule wrappers around a RecordingNetwork; returns (wrapper, network)."""
    external, alphas_cumprod = kd.external, sd_alphas_cumprod()
    network = RecordingNetwork(alphas_cumprod, learned_sigmas=name == "OpenAIDenoiser")
    if name == "CompVisDenoiser":
        return external.CompVisDenoiser(network, quantize=quantize), network
    if name == "CompVisVDenoiser":
        return external.CompVisVDenoiser(network, quantize=quantize), network
    if name == "DiscreteEpsDDPMDenoiser":
        return external.DiscreteEpsDDPMDenoiser(network, alphas_cumprod, quantize), network
    if name == "DiscreteVDDPMDenoiser":
        return external.DiscreteVDDPMDenoiser(network, alphas_cumprod, quantize), network
    diffusion = types.SimpleNamespace(alphas_cumprod=alphas_cumprod.double().numpy())  # guided-diffusion's
    return external.OpenAIDenoiser(network, diffusion, quantize=quantize), network


DISCRETE_WRAPPERS = [
    "CompVisDenoiser", "CompVisVDenoiser", "DiscreteEpsDDPMDenoiser", "DiscreteVDDPMDenoiser", "OpenAIDenoiser"
]

def defined_in_docs(heading, name):
    """Runs the first code block of a docs section and returns what it defines as ``name``."""
    namespace = {}
    exec(doc_code_blocks(heading)[0], namespace)
    return namespace[name]


# The docs' CFG recipe as written: the tests use the very class the docs tell users to copy.
CFGDenoiser = defined_in_docs("Classifier-free guidance", "CFGDenoiser")


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
        "import sys, kds_hook, kds_hook.k_diffusion, kds_hook.k_diffusion_loader; "
        "assert 'k_diffusion' not in sys.modules, sorted(m for m in sys.modules if 'k_diffusion' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_kds_hook_source_imports_k_diffusion():
    """Statically, every module of the package (also those the runtime check above does not import), except the
    loader, which imports k-diffusion only when the user calls ``load_k_diffusion()``."""
    package = Path(__file__).resolve().parents[1] / "kds_hook"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "k_diffusion_loader.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"
            ):
                names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)]
            offenders += [f"{path.name}: {name}" for name in names if str(name).split(".")[0] == "k_diffusion"]
    assert len(list(package.rglob("*.py"))) > 5 and offenders == []


def test_loader_leaves_no_torchvision_stand_in_behind():
    import importlib.util

    kd_utils = sys.modules["k_diffusion.utils"]
    if importlib.util.find_spec("torchvision") is None:
        assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)
        with pytest.raises(AttributeError, match="stand-in"):
            kd_utils.from_pil_image(None)


@pytest.fixture
def k_diffusion_unloaded(monkeypatch):
    """No k_diffusion module in sys.modules for the test's duration; the loaded ones come back afterwards."""
    import kds_hook.k_diffusion_loader

    for name in [n for n in sys.modules if n.split(".")[0] == "k_diffusion"]:
        monkeypatch.delitem(sys.modules, name)
    return kds_hook.k_diffusion_loader


def test_loader_reports_a_missing_k_diffusion(k_diffusion_unloaded, monkeypatch):
    class HideKDiffusion:  # a meta path finder: `import k_diffusion` finds nothing
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "k_diffusion":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    monkeypatch.setattr(sys, "meta_path", [HideKDiffusion()] + sys.meta_path)
    monkeypatch.setattr(k_diffusion_unloaded.importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModuleNotFoundError, match="k-diffusion is not installed"):
        k_diffusion_unloaded.load_k_diffusion()
    assert "k_diffusion" not in sys.modules


def test_loader_leaves_nothing_half_loaded_when_a_sampler_dependency_is_missing(k_diffusion_unloaded, monkeypatch):
    class HideTorchsde:  # a meta path finder: torchsde (which k_diffusion.sampling imports) is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchsde":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for name in [n for n in sys.modules if n.split(".")[0] == "torchsde"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [HideTorchsde()] + sys.meta_path)
    with pytest.raises(ModuleNotFoundError, match="torchsde"):
        k_diffusion_unloaded.load_k_diffusion()
    assert not [name for name in sys.modules if name.split(".")[0] in ("k_diffusion", "torchvision")]


# ------------------------------------------------------------------------------------- exactness, 13 samplers


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("case", ["strength_0", "one_particle"])
def test_reproduces_the_plain_sampler_bit_for_bit(model, name, case):
    num_particles, strength = (4, 0.0) if case == "strength_0" else (1, 0.3)
    sigmas = model.get_sigmas(STEPS)
    x = particle_noise(2, num_particles, (2, 2, 2), sigmas[0], seed=1)
    expected = plain_sampler(name, model, x, sigmas, seed=7)
    kds = KDS(num_particles=num_particles, bandwidth=1.0, strength=strength, threshold=0.0)
    result = kds_sampler(name, model, x, sigmas, kds, seed=7)
    assert torch.equal(result.particles, expected)
    assert torch.equal(result.sample, kds.select(expected).sample)
    if num_particles == 1:
        assert torch.equal(result.sample, expected)


@pytest.mark.parametrize("name", SAMPLERS)
def test_steers_every_model_evaluation(model, name):
    sigmas = model.get_sigmas(STEPS)
    x = particle_noise(2, 4, (2, 2, 2), sigmas[0], seed=2)
    plain = plain_sampler(name, model, x, sigmas, seed=3)
    model.calls = 0
    kds = KDS(num_particles=4, bandwidth=1.0, threshold=0.0, record=True)  # gate open at every step
    extra = {"return_info": True} if name == "sample_dpm_adaptive" else {}
    result = kds_sampler(name, model, x, sigmas, kds, seed=3, **extra)
    assert model.calls == model_evaluations(name, result.info)
    assert len(kds.history) == model.calls  # one steer_x0 call per model evaluation, stages included
    assert all(record.strength == 0.3 and record.self_weight is not None for record in kds.history)
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
    per_item = sample(euler, model, x, sigmas, kds, {"cond": offsets}, return_all=True, disable=True)
    expanded = {"cond": offsets.repeat_interleave(4, 0)}
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


@pytest.mark.parametrize("wrapper", DISCRETE_WRAPPERS)
@pytest.mark.parametrize("quantize", [False, True])
def test_gate_follows_sigma_to_t_of_k_diffusion_wrappers(wrapper, quantize):
    """t/T is the timestep the network itself receives, over the 1000 training steps, for every wrapper."""
    model, network = discrete_wrapper(wrapper, quantize)
    kds = KDS(num_particles=4, bandwidth=1.0, record=True)  # the paper's gate
    sigmas = model.get_sigmas(8)
    x = particle_noise(2, 4, (2, 2, 2), sigmas[0], seed=18)
    cond = torch.tensor([1.0, -2.0])  # per item: the network must get it per particle
    sample(kd.sampling.sample_heun, model, x, sigmas, kds, {"cond": cond}, disable=True)
    assert len(network.timesteps) == len(kds.history) == 15  # Heun, 8 steps: 2 per step, 1 in the last
    for record, t in zip(kds.history, network.timesteps):
        assert t.shape == (8,) and torch.equal(t, t[:1].expand(8))
        t_frac = float(t[0] / TRAIN_STEPS)
        assert record.t_frac == t_frac
        assert record.strength == (0.3 if t_frac >= 0.3 else 0.0)
    assert {record.strength for record in kds.history} == {0.0, 0.3}
    assert all(torch.equal(c, cond.repeat_interleave(4)) for c in network.conds)
    if quantize:
        assert all(t.dtype == torch.int64 for t in network.timesteps)
    # The gate opens exactly at training timestep 300 of 1000.
    denoiser = KDSDenoiser(model, kds)
    cond = cond.repeat_interleave(4)
    for timestep, steered in [(299, False), (300, True)]:
        sigma = model.sigmas[timestep].expand(8)
        out, plain = denoiser(x, sigma, cond=cond), model(x, sigma, cond=cond)
        assert int(network.timesteps[-1][0]) == timestep
        assert torch.equal(out, plain) is not steered


def test_items_at_different_noise_levels_are_gated_separately(model):
    kds = KDS(num_particles=4, bandwidth=1.0)
    denoiser = KDSDenoiser(model, kds)
    x = particle_noise(2, 4, (2,), 1.0, seed=19)
    sigma = torch.cat([model.sigmas[300].expand(4), model.sigmas[299].expand(4)])  # item 0 steered, item 1 not
    out, plain = denoiser(x, sigma), model(x, sigma)
    # Item 0 is steered as on its own (to rounding: the batch differs), not as one ensemble with item 1.
    pooled = KDS(num_particles=8, bandwidth=1.0).steer_x0(plain, t_frac=0.3)
    assert_equal_to_rounding(out[:4], kds.steer_x0(plain[:4], t_frac=0.3), leaked=pooled[:4])
    assert not torch.equal(out[:4], plain[:4])
    assert torch.equal(out[4:], plain[4:])
    mixed = torch.cat([model.sigmas[300].expand(3), model.sigmas[299].expand(5)])
    with pytest.raises(ValueError, match="same noise level"):
        denoiser(x, mixed)


def test_v_denoiser_is_continuous_time_and_takes_its_own_time_map():
    network = RecordingNetwork()
    model = kd.external.VDenoiser(network)
    with pytest.raises(ValueError, match="VDenoiser has sigma_to_t but no discrete schedule"):
        KDSDenoiser(model, KDS(num_particles=4))
    sigmas = kd.sampling.get_sigmas_karras(6, 0.05, 20.0)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=20)
    cond = torch.tensor([1.0, -2.0])
    with pytest.raises(ValueError, match="continuous-time"):
        sample(kd.sampling.sample_euler, model, x, sigmas, KDS(num_particles=4), {"cond": cond}, disable=True)
    kds = KDS(num_particles=4, bandwidth=1.0, record=True)
    denoiser = KDSDenoiser(model, kds, sigma_to_t_frac=model.sigma_to_t)
    sample(kd.sampling.sample_euler, denoiser, x, sigmas, kds, {"cond": cond}, disable=True)
    assert len(kds.history) == len(network.timesteps) == 6
    for record, t in zip(kds.history, network.timesteps):  # VDenoiser's t already runs over [0, 1]
        assert record.t_frac == float(t[0]) and record.strength == (0.3 if float(t[0]) >= 0.3 else 0.0)
    assert {record.strength for record in kds.history} == {0.0, 0.3}


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
    cfg = CFGDenoiser(model)  # the docs' recipe
    denoiser = KDSDenoiser(cfg, kds)  # t/T found on cfg.inner_model, a discrete schedule
    uncond, cond = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    extra = {"uncond": uncond.repeat_interleave(4, 0), "cond": cond.repeat_interleave(4, 0), "cond_scale": 3.0}
    x = particle_noise(2, 4, (2,), 2.0, seed=15)
    sigma = model.sigmas[600].expand(8)
    guided = cfg(x, sigma, **extra)
    steered = denoiser(x, sigma, **extra)
    assert torch.equal(steered, kds.steer_x0(guided, t_frac=0.6))  # Algorithm 3: KDS after guidance
    assert not torch.equal(steered, guided)
    # The other order steers the unconditional and conditional predictions one by one: not the paper's method.
    inside = CFGDenoiser(KDSDenoiser(model, KDS(num_particles=4, bandwidth=1.0)))(x, sigma, **extra)
    assert not torch.allclose(inside, steered)
    with pytest.raises(ValueError, match="already a KDSDenoiser"):
        sample(kd.sampling.sample_euler, CFGDenoiser(KDSDenoiser(model, kds)), x, model.get_sigmas(3), kds, extra)

    model.calls, model.sigmas_seen, kds.history[:] = 0, [], []
    sigmas = model.get_sigmas(5)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=16)
    extra = {"uncond": uncond, "cond": cond, "cond_scale": 3.0}  # per item: sample() repeats them
    result = sample(kd.sampling.sample_dpmpp_2m, denoiser, x, sigmas, kds, extra, return_all=True, disable=True)
    assert len(kds.history) == model.calls == 5  # one guided (double-batch) evaluation per step
    assert [len(s) for s in model.sigmas_seen] == [16] * 5  # the inner model sees 2*B*N rows
    assert result.sample.shape == (2, 2)


def test_docs_cfg_recipe_runs_with_a_compvis_model():
    """The docs' CFG usage block, run as written with a CompVis-like network inside CompVisDenoiser."""
    network = RecordingNetwork(sd_alphas_cumprod())
    kds = KDS(num_particles=4, bandwidth=1.0, record=True)
    sigmas = kd.sampling.get_sigmas_karras(5, 0.1, 10.0)
    namespace = {
        "torch": torch, "K": kd.sampling, "CompVisDenoiser": kd.external.CompVisDenoiser, "ldm": network,
        "CFGDenoiser": CFGDenoiser, "KDSDenoiser": KDSDenoiser, "sample": sample, "kds": kds, "sigmas": sigmas,
        "uncond": torch.zeros(3), "cond": torch.tensor([1.0, 2.0, 3.0]),
        "x": particle_noise(3, 4, (2, 2, 2), sigmas[0], seed=21),
    }
    exec(doc_code_blocks("Classifier-free guidance")[1], namespace)
    assert namespace["images"].shape == (3, 2, 2, 2)
    assert len(kds.history) == len(network.timesteps) == 5
    expected_cond = torch.cat([torch.zeros(12), torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(4)])
    assert all(torch.equal(c, expected_cond) for c in network.conds)  # 2*B*N rows: uncond, then cond
    assert {record.strength for record in kds.history} == {0.0, 0.3}  # gated by the CompVisDenoiser's t/T


# --------------------------------------------------------------------------------------- the paper's Figure 2


def test_figure2_kds_moves_particles_toward_their_modes(model):
    """Paired over seeds: KDS (paper's gate, N=50, patch = the whole 2-D vector) vs the plain exact sampler.

    Items never interact (tested above), so all seeds run as one batch: seed s owns items 4s ... 4s+3.
    """
    mixture, seeds, items, n = model.mixture, 8, 4, 50
    sigmas = model.get_sigmas(20)
    x = torch.cat([particle_noise(items, n, (2,), sigmas[0], seed=100 + seed) for seed in range(seeds)])
    kds = KDS(num_particles=n, record=True)
    plain = kd.sampling.sample_euler(model, x, sigmas, disable=True)
    steered = sample(kd.sampling.sample_euler, model, x, sigmas, kds, return_all=True, disable=True).particles
    assert {record.strength for record in kds.history} == {0.0, 0.3}  # the gate closes during sampling

    def distance_to_nearest_mode(particles):  # mean per seed
        distance = torch.cdist(particles.double(), mixture.means).min(dim=1).values
        return distance.reshape(seeds, items * n).mean(dim=1)

    differences = distance_to_nearest_mode(steered) - distance_to_nearest_mode(plain)
    mean, standard_error = differences.mean(), differences.std() / seeds**0.5
    # Measured: mean -0.015, standard error 0.001 (plain: 0.56 from the nearest mode).
    assert mean < -5 * standard_error and mean < -0.005


# ----------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs(model):
    kds = KDS(num_particles=4)
    sigmas = model.get_sigmas(3)
    x = particle_noise(2, 4, (2,), sigmas[0], seed=17)
    with pytest.raises(ValueError, match="divisible|contiguous particles"):
        sample(kd.sampling.sample_euler, model, x[:7], sigmas, kds, disable=True)
    with pytest.raises(ValueError, match=r"extra_args\['cond'\] has batch size 3"):
        sample(kd.sampling.sample_euler, model, x, sigmas, kds, {"cond": torch.zeros(3, 2)}, disable=True)
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
    with pytest.raises(ValueError, match="steer every evaluation twice"):
        KDSDenoiser(KDSDenoiser(model, kds), kds)
    with pytest.raises(TypeError, match="takes neither sigmas nor sigma_min"):
        sample(lambda model, x, steps: x, model, x, sigmas, kds)
    with pytest.raises(ValueError, match="sample_euler needs sigmas"):
        sample(kd.sampling.sample_euler, model, x, None, kds)


def test_wrapper_forwards_attributes_and_module_calls(model):
    denoiser = KDSDenoiser(model, KDS(num_particles=2))
    assert denoiser.sigmas is model.sigmas and torch.equal(denoiser.get_sigmas(4), model.get_sigmas(4))
    assert denoiser.inner_model is model and denoiser.mixture is model.mixture
    denoiser.to(torch.float64).eval()
    assert model.sigmas.dtype == torch.float64 and not model.training
    with pytest.raises(AttributeError):
        denoiser.no_such_attribute
    twin = copy.deepcopy(denoiser)  # the copy's gate reads the copy's own schedule
    assert twin.inner_model is not model and twin.sigma_to_t_frac.schedule is twin.inner_model
    assert torch.equal(twin.get_sigmas(4), denoiser.get_sigmas(4))


def test_docs_runnable_example_runs_as_written():
    """The docs page's example, run by a fresh interpreter from the repository root, as a user would."""
    code = doc_code_blocks("A runnable example")[0]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=DOC.parents[1], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "(4, 2)"
    pattern = r"mean distance to the nearest mode: plain ([0-9.]+), KDS ([0-9.]+)"
    plain, steered = map(float, re.fullmatch(pattern, lines[1]).groups())
    assert steered < plain
    shown = re.search(pattern, doc_section("A runnable example").rsplit("```", 1)[1])  # what the page says
    assert shown and [float(v) for v in shown.groups()] == pytest.approx([plain, steered], abs=0.002)
