"""kds_hook.diffusers.apply_patch on bare diffusers schedulers, driven by a pipeline-like denoising loop.

The "model" is the exact denoiser of a per-pixel Gaussian mixture (two modes in channel space), so predictions
have a realistic scale and particles cluster. Every scheduler runs in float64 where it allows it, which lets
the steered x0 be compared with the literal reference mean shift at a tight tolerance.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from kds_hook import KDS  # noqa: E402
from kds_hook.analytic import GaussianMixture  # noqa: E402
from kds_hook.diffusers import SUPPORTED_SCHEDULERS, apply_patch, patched_kds, remove_patch  # noqa: E402
from reference import reference_mean_shift  # noqa: E402

# diffusers' own deprecations (numpy 2 copy keyword, the deprecated "dpmsolver" algorithm) are not ours to see
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
]

N = 3  # particles per item
ITEMS = 2
SHAPE = (2, 4, 3)  # channels, height, width: width 3 leaves a smaller last tile for patch_size 2
STEPS = 6
BANDWIDTH = 0.5

# id -> (class name, constructor config); prediction types are crossed with these below.
CONFIGS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "sde_dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_3": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "single_dpmpp": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "single_dpm": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "single_sde_dpmpp": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_eps": ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
}
CASES = [
    pytest.param(name, prediction, id=f"{name}-{prediction}")
    for name, (cls, _) in CONFIGS.items()
    for prediction in SUPPORTED_SCHEDULERS[cls].prediction_types
]
MIXTURE = GaussianMixture(means=[[-1.0, -1.0], [1.0, 1.0]], stds=[0.3, 0.3], weights=[0.6, 0.4])


def make(name: str, prediction: str = "epsilon", **extra):
    cls_name, config = CONFIGS[name]
    return getattr(diffusers, cls_name)(prediction_type=prediction, **{**config, **extra})


def model(scheduler, x_vp: torch.Tensor, t) -> torch.Tensor:
    """Exact prediction of the scheduler's type for x_vp = sqrt(a) x0 + sqrt(1 - a) eps (a = alphas_cumprod[t])."""
    a = scheduler.alphas_cumprod[int(round(float(t)))].double()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    pixels = (x_vp / alpha).movedim(1, -1)  # variance-exploding, one 2-D point per pixel
    x0 = MIXTURE.denoise(pixels.reshape(-1, SHAPE[0]), sigma / alpha).reshape(pixels.shape).movedim(-1, 1)
    x0 = x0.to(x_vp.dtype)
    eps = (x_vp - alpha * x0) / sigma
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


def initial_noise(seed: int, items: int = ITEMS, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(items * N, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def step_kwargs(scheduler, seed: int) -> dict:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


def sample(scheduler, noise: torch.Tensor, seed: int = 0, steps: int = STEPS) -> torch.Tensor:
    """A pipeline's denoising loop (one generator for the whole run, as pipelines pass it)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    kwargs = step_kwargs(scheduler, seed)
    for t in scheduler.timesteps:
        out = model(scheduler, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def kds(**options) -> KDS:
    options.setdefault("num_particles", N)
    options.setdefault("bandwidth", BANDWIDTH)
    return KDS(**options)


def particle_spread(x: torch.Tensor) -> torch.Tensor:
    """Per item, the mean squared distance of its particles to their mean."""
    grouped = x.reshape(-1, N, *x.shape[1:]).double()
    return (grouped - grouped.mean(1, keepdim=True)).square().flatten(2).sum(-1).mean(1)


def patched_method(scheduler) -> str:
    return SUPPORTED_SCHEDULERS[type(scheduler).__name__].method


# --------------------------------------------------------------------------------- bit identity, effect


@pytest.mark.parametrize("name, prediction", CASES)
def test_zero_strength_one_particle_and_removal_are_bit_identical(name, prediction):
    noise = initial_noise(1)
    plain = sample(make(name, prediction), noise)

    for closed in (kds(strength=0.0), kds(threshold=1.5), KDS(num_particles=1, bandwidth=BANDWIDTH)):
        scheduler = apply_patch(make(name, prediction), closed)
        assert torch.equal(sample(scheduler, noise), plain)

    scheduler = apply_patch(make(name, prediction), kds())
    steered = sample(scheduler, noise)
    assert (steered - plain).abs().max() > 1e-3  # the patch acts

    remove_patch(scheduler)
    method = patched_method(scheduler)
    assert method not in vars(scheduler) and patched_kds(scheduler) is None
    assert getattr(scheduler, method).__func__ is getattr(type(scheduler), method)
    assert torch.equal(sample(scheduler, noise), plain)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steering_contracts_each_ensemble(name):
    """Mean shift pulls particles toward their local mode: paired over seeds, the particles of an item end closer
    together than without KDS (strength 0.6 and a kernel as wide as the modes' separation make it visible).

    20 steps: with 6, the noise-prediction singlestep solver (dpmsolver, order 2-3) extrapolates the steered eps
    over so large a step that the ensemble spreads out instead (see docs/diffusers-schedulers.md)."""
    ratios = []
    for seed in range(3):
        noise = initial_noise(10 + seed)
        plain = particle_spread(sample(make(name), noise, seed, steps=20))
        steered = apply_patch(make(name), kds(strength=0.6, bandwidth=2.0, threshold=0.0))
        ratios.append(particle_spread(sample(steered, noise, seed, steps=20)) / plain)
    ratios = torch.cat(ratios)
    assert bool((ratios < 1).all()), ratios


# --------------------------------------------------------------------------------- exact x0 steering


def unsteered_and_steered_x0(twin, scheduler, t, x, out):
    """x0 of this step from the plain twin and from the patched scheduler (both in the same state)."""
    plain = twin.step(out, t, x, **step_kwargs(twin, 0))
    patched = scheduler.step(out, t, x, **step_kwargs(scheduler, 0))
    if patched_method(scheduler) == "step":
        return plain.pred_original_sample, patched.pred_original_sample, patched.prev_sample
    return stored_x0(twin, x), stored_x0(scheduler, x), patched.prev_sample


def stored_x0(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The x0 held in the multistep history for the step just taken (noise-prediction solvers store eps)."""
    stored = scheduler.model_outputs[-1]
    config = scheduler.config
    if getattr(config, "algorithm_type", None) != "dpmsolver" and getattr(config, "predict_x0", True):
        return stored
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
    return (x - sigma * stored) / alpha


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("name, prediction", CASES)
def test_steered_x0_is_the_reference_mean_shift_while_the_gate_is_open(name, prediction, patch_size):
    """Per step: where t/T >= threshold the x0 the scheduler continues from (DDIM/DDPM/Euler: the returned
    pred_original_sample; DPM-Solver/UniPC: the entry of the multistep history) is the literal Algorithm 2 mean
    shift of the unpatched x0; elsewhere it is exactly the unpatched one."""
    strength, threshold = 0.4, 0.3
    twin = make(name, prediction)
    scheduler = apply_patch(make(name, prediction), kds(strength=strength, threshold=threshold, patch_size=patch_size))
    twin.set_timesteps(STEPS)
    scheduler.set_timesteps(STEPS)
    x = initial_noise(2) * scheduler.init_noise_sigma
    # Euler's step computes x0 with the sample cast to float32, the rest of the solvers in float64
    tolerance = 1e-5 if "euler" in name else 1e-9
    opened = closed = 0
    for t in scheduler.timesteps:
        out = model(scheduler, scheduler.scale_model_input(x, t), t)
        twin.scale_model_input(x, t)
        plain, steered, x = unsteered_and_steered_x0(twin, scheduler, t, x, out)
        if float(t) / 1000 >= threshold:
            opened += 1
            expected = reference_mean_shift(plain, N, BANDWIDTH, patch_size, strength)
            torch.testing.assert_close(steered, expected.to(steered.dtype), rtol=tolerance, atol=tolerance)
            assert (steered - plain).abs().max() > 1e-4
        else:
            closed += 1
            assert torch.equal(steered, plain)
    assert opened and closed


def test_ddim_clips_after_steering():
    """The raw x0 is steered, then DDIM's own clip_sample applies to the steered prediction."""
    twin = make("ddim", clip_sample=True, clip_sample_range=0.8)
    raw = make("ddim")
    scheduler = apply_patch(make("ddim", clip_sample=True, clip_sample_range=0.8), kds(strength=0.4, threshold=0.0))
    for s in (twin, raw, scheduler):
        s.set_timesteps(STEPS)
    x = initial_noise(3)
    clipped_somewhere = False
    for t in scheduler.timesteps:
        out = model(scheduler, x, t)
        unclipped = raw.step(out, t, x).pred_original_sample
        clipped_somewhere |= bool((unclipped.abs() > 0.8).any())
        result = scheduler.step(out, t, x)
        expected = reference_mean_shift(unclipped, N, BANDWIDTH, 1, 0.4).clamp(-0.8, 0.8)
        torch.testing.assert_close(result.pred_original_sample, expected, rtol=1e-9, atol=1e-9)
        x = result.prev_sample
    assert clipped_somewhere


def test_dpmsolver_thresholds_after_steering():
    """DPM-Solver++ with dynamic thresholding: the history holds threshold(steer(raw x0))."""
    raw = make("dpmpp")
    scheduler = apply_patch(make("dpmpp", thresholding=True, sample_max_value=0.9), kds(strength=0.4, threshold=0.0))
    for s in (raw, scheduler):
        s.set_timesteps(STEPS)
    x = initial_noise(4)
    for t in scheduler.timesteps:
        out = model(scheduler, x, t)
        raw.step(out, t, x)
        x = scheduler.step(out, t, x).prev_sample
        expected = scheduler._threshold_sample(reference_mean_shift(raw.model_outputs[-1], N, BANDWIDTH, 1, 0.4))
        torch.testing.assert_close(scheduler.model_outputs[-1], expected, rtol=1e-9, atol=1e-9)


def test_ddpm_learned_variance_channels_pass_through():
    """A model with learned variance outputs 2*C channels: only the mean half is steered."""
    config = {"variance_type": "learned_range", "clip_sample": False}
    twin, scheduler = make("ddpm", **config), apply_patch(make("ddpm", **config), kds(strength=0.4, threshold=0.0))
    for s in (twin, scheduler):
        s.set_timesteps(STEPS)
    x = initial_noise(11)
    for t in scheduler.timesteps:
        out = torch.cat([model(scheduler, x, t), torch.tanh(x)], dim=1)
        plain = twin.step(out, t, x, generator=torch.Generator().manual_seed(0))
        steered = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0))
        expected = reference_mean_shift(plain.pred_original_sample, N, BANDWIDTH, 1, 0.4)
        torch.testing.assert_close(steered.pred_original_sample, expected, rtol=1e-9, atol=1e-9)
        x = steered.prev_sample
    assert torch.isfinite(x).all()


def test_euler_churn_is_refused_only_where_steered():
    x = initial_noise(12)
    sample(apply_patch(make("euler"), kds(threshold=2.0)), x)  # gate closed: churn is the scheduler's business
    scheduler = apply_patch(make("euler"), kds())
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="s_churn=0"):
        scheduler.step(model(scheduler, scheduler.scale_model_input(x, t), t), t, x, s_churn=1.0)


# --------------------------------------------------------------------------------- gate and records


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "dpmpp", "single_dpmpp", "unipc"])
def test_gate_reads_the_schedulers_own_timestep(name):
    """t/T = the scheduler's timestep over its num_train_timesteps (500 here, so a hard-coded 1000 would fail)."""
    steerer = kds(strength=0.3, threshold=0.45, record=True)
    scheduler = apply_patch(make(name, num_train_timesteps=500), steerer)
    sample(scheduler, initial_noise(5))
    assert float(scheduler.timesteps.max()) < 500
    t_fracs = [float(t) / 500 for t in scheduler.timesteps]
    assert [r.t_frac for r in steerer.history] == pytest.approx(t_fracs, abs=1e-7)
    assert [r.strength for r in steerer.history] == [0.3 if f >= 0.45 else 0.0 for f in t_fracs]
    assert 0.0 in [r.strength for r in steerer.history] and 0.3 in [r.strength for r in steerer.history]
    assert all((r.self_weight is None) == (r.strength == 0) for r in steerer.history)


# --------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp", "unipc"])
def test_items_never_mix(name):
    """Two items x N particles: changing item 1's noise leaves item 0's trajectory bit for bit unchanged."""
    noise = initial_noise(6)
    changed = noise.clone()
    changed[N:] = initial_noise(7)[N:]
    first = sample(apply_patch(make(name), kds()), noise)
    second = sample(apply_patch(make(name), kds()), changed)
    assert torch.equal(first[:N], second[:N])
    assert not torch.equal(first[N:], second[N:])


@pytest.mark.parametrize("threshold", [0.0, 2.0], ids=["gate-open", "gate-closed"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp"])
def test_batch_not_divisible_by_particles_is_an_error(name, threshold):
    scheduler = apply_patch(make(name), kds(threshold=threshold))
    with pytest.raises(ValueError, match="not divisible by num_particles=3"):
        sample(scheduler, torch.randn(N + 1, *SHAPE, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp"])
def test_low_precision_keeps_the_schedulers_dtype(name):
    noise = initial_noise(8, dtype=torch.bfloat16)
    plain = sample(make(name), noise)
    steered = sample(apply_patch(make(name), kds()), noise)
    assert steered.dtype == plain.dtype == torch.bfloat16
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)


# --------------------------------------------------------------------------------- the patch itself


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patched_methods_keep_their_signature(name):
    scheduler = make(name)
    before = {m: inspect.signature(getattr(scheduler, m)) for m in ("step", patched_method(scheduler))}
    apply_patch(scheduler, kds())
    assert {m: inspect.signature(getattr(scheduler, m)) for m in before} == before
    if name == "ddim":  # what pipelines look for before passing eta and generator
        assert {"eta", "generator"} <= set(inspect.signature(scheduler.step).parameters)


def test_apply_twice_replaces_and_accepts_a_pipeline():
    class Pipe:
        scheduler = make("ddim")

    first, second = kds(record=True), kds(record=True)
    assert apply_patch(Pipe(), first) is Pipe.scheduler
    apply_patch(Pipe.scheduler, second)
    assert patched_kds(Pipe()) is second
    assert Pipe.scheduler.step.__wrapped__ is type(Pipe.scheduler).step  # wraps the original, not the first patch
    sample(Pipe.scheduler, initial_noise(9))
    assert first.history == [] and len(second.history) == STEPS
    remove_patch(Pipe())
    assert "step" not in vars(Pipe.scheduler)
    remove_patch(Pipe())  # removing twice is a no-op


@pytest.mark.parametrize("name", ["ddim", "dpmpp"])
def test_remove_restores_a_previous_instance_attribute(name):
    """A user's own (*args, **kwargs) override on the instance is wrapped, steered through, and put back."""
    scheduler = make(name)
    method = patched_method(scheduler)
    calls = []
    original = getattr(scheduler, method)

    def own(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(scheduler, method, own)
    steerer = kds(threshold=0.0)
    apply_patch(scheduler, steerer)
    noise = initial_noise(9)
    steered = sample(scheduler, noise, steps=2)
    assert len(calls) == 2  # ours wraps the user's method
    assert torch.equal(steered, sample(apply_patch(make(name), kds(threshold=0.0)), noise, steps=2))
    remove_patch(scheduler)
    assert getattr(scheduler, method) is own
    assert torch.equal(sample(scheduler, noise, steps=2), sample(make(name), noise, steps=2))


@pytest.mark.parametrize("name", ["euler", "dpmpp"])
def test_a_deep_copy_steers_itself(name):
    """Pipelines deepcopy schedulers: the copy's patched method must drive the copy, not the original."""
    scheduler = apply_patch(make(name), kds())
    scheduler.set_timesteps(STEPS)
    copied = copy.deepcopy(scheduler)
    assert patched_kds(copied) is not None and copied.step_index is None
    assert torch.equal(sample(copied, initial_noise(13)), sample(apply_patch(make(name), kds()), initial_noise(13)))
    assert scheduler.step_index is None  # the original was not advanced by the copy's steps


def test_subclasses():
    class Renamed(diffusers.DDIMScheduler):
        pass

    class OwnStep(diffusers.DDIMScheduler):
        def step(self, *args, **kwargs):
            return super().step(*args, **kwargs)

    apply_patch(Renamed(), kds())
    with pytest.raises(ValueError, match="OwnStep overrides DDIMScheduler.step"):
        apply_patch(OwnStep(), kds())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: diffusers.PNDMScheduler(), "PNDMScheduler; supported schedulers: DDIMScheduler, DDPMScheduler"),
        (lambda: diffusers.LMSDiscreteScheduler(), "LMSDiscreteScheduler; supported schedulers"),
        (lambda: diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample"), "epsilon, v_prediction$"),
        (lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "flow_prediction"),
        (lambda: diffusers.EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type='discrete'"),
        (lambda: diffusers.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler()), "solver_p"),
    ],
)
def test_unsupported_configurations_fail_at_apply_time(build, message):
    scheduler = build()
    with pytest.raises(ValueError, match=message):
        apply_patch(scheduler, kds())
    assert "step" not in vars(scheduler) and "convert_model_output" not in vars(scheduler)


def test_unsupported_algorithm_names_the_supported_ones():
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    supported = "supported: dpmsolver\\+\\+, sde-dpmsolver\\+\\+, dpmsolver$"
    with pytest.raises(ValueError, match="'sde-dpmsolver'; " + supported):
        apply_patch(scheduler, kds())


def test_bad_arguments():
    with pytest.raises(TypeError, match="kds_hook.KDS"):
        apply_patch(make("ddim"), object())
    with pytest.raises(TypeError, match="pipeline"):
        apply_patch(object(), kds())


def test_importing_kds_hook_does_not_import_diffusers():
    code = "import sys, kds_hook, kds_hook.diffusers, kds_hook.diffusers.patch; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
