"""kds_hook.diffusers.apply_patch on bare diffusers schedulers, driven by a pipeline-like denoising loop.

The model is exact for every family (tests/scheduler_harness.py), so predictions have a realistic scale and
particles cluster. Every scheduler runs in float64 where it allows it, which lets the steered x0 be compared
with the literal reference mean shift at a tight tolerance.
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
from kds_hook.diffusers import SUPPORTED_SCHEDULERS, apply_patch, patched_kds, remove_patch  # noqa: E402
from reference import reference_mean_shift  # noqa: E402
from scheduler_harness import (  # noqa: E402
    MARKS,
    BANDWIDTH,
    CONFIGS,
    N,
    SHAPE,
    STEPS,
    base_name,
    cases,
    initial_noise,
    kds,
    make,
    model,
    model_input,
    particle_spread,
    patched_method,
    sample,
    start,
    step_and_x0,
    timesteps,
    tolerance,
)

pytestmark = MARKS

CASES = [pytest.param(name, prediction, extra, id=case_id) for case_id, name, prediction, extra in cases()]


# --------------------------------------------------------------------------------- bit identity, effect


@pytest.mark.parametrize("name, prediction, extra", CASES)
def test_zero_strength_one_particle_reapply_and_removal_are_bit_identical(name, prediction, extra):
    noise = initial_noise(1)
    plain = sample(make(name, prediction, **extra), noise)

    for closed in (kds(strength=0.0), kds(threshold=1.5), KDS(num_particles=1, bandwidth=BANDWIDTH)):
        scheduler = apply_patch(make(name, prediction, **extra), closed)
        assert torch.equal(sample(scheduler, noise), plain)

    scheduler = apply_patch(make(name, prediction, **extra), kds())
    steered = sample(scheduler, noise)
    assert (steered - plain).abs().max() > 1e-3  # the patch acts

    apply_patch(scheduler, kds(strength=0.0))  # replaces, never stacks
    assert torch.equal(sample(scheduler, noise), plain)
    apply_patch(scheduler, kds())
    assert torch.equal(sample(scheduler, noise), steered)

    remove_patch(scheduler)
    method = patched_method(scheduler)
    assert method not in vars(scheduler) and patched_kds(scheduler) is None
    assert getattr(scheduler, method).__func__ is getattr(type(scheduler), method)
    assert torch.equal(sample(scheduler, noise), plain)


# 20 steps where 8 are too few: the noise-prediction solvers (dpmsolver singlestep, SA-Solver noise_prediction)
# extrapolate the steered eps over so large a step that the ensemble spreads out instead, and the stochastic
# SA-Solver, ancestral KDPM2 and CogVideoX's DPM inject so much noise per step that 2 seeds do not show it
# item by item (see docs/diffusers-schedulers.md).
CONTRACTION_STEPS = {"single_dpm": 20, "sa": 20, "sa_noise": 20, "kdpm2_a": 20, "cogvideox_dpm": 20}
NOISY = {"kdpm2_a": 0.95, "cogvideox_dpm": 0.97}  # these: the mean ratio over items and seeds is below this


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steering_contracts_each_ensemble(name):
    """Mean shift pulls particles toward their local mode: paired over seeds, the particles of an item end closer
    together than without KDS (strength 0.6 and a kernel as wide as the modes' separation make it visible; the
    paper's gate, t/T >= 0.3)."""
    steps = CONTRACTION_STEPS.get(name, 8)
    ratios = []
    for seed in range(2):
        noise = initial_noise(10 + seed)
        plain = particle_spread(sample(make(name), noise, seed, steps=steps))
        steered = apply_patch(make(name), kds(strength=0.6, bandwidth=2.0))
        ratios.append(particle_spread(sample(steered, noise, seed, steps=steps)) / plain)
    ratios = torch.cat(ratios)
    if name in NOISY:  # their noise scatters single items' ratios around a mean below 1
        assert float(ratios.mean()) < NOISY[name], ratios
    else:
        assert bool((ratios < 1).all()), ratios


# --------------------------------------------------------------------------------- exact x0 steering


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("name, prediction, extra", CASES)
def test_steered_x0_is_the_reference_mean_shift_while_the_gate_is_open(name, prediction, extra, patch_size):
    """Per model evaluation: where the gate is open the x0 the scheduler continues from (read back from its
    output: pred_original_sample, the multistep history entry, or derived from prev_sample) is the literal
    Algorithm 2 mean shift of the unpatched x0; elsewhere it is exactly the unpatched one. Second-order samplers
    have both of their evaluations steered."""
    strength = 0.4
    steerer = kds(strength=strength, threshold=0.3, patch_size=patch_size, record=True)
    twin = make(name, prediction, **extra)
    scheduler = apply_patch(make(name, prediction, **extra), steerer)
    x = start(scheduler, initial_noise(2))
    start(twin, initial_noise(2))
    tol = tolerance(scheduler)
    opened, closed, moved = {True: 0, False: 0}, 0, 0.0
    for t in timesteps(scheduler):
        out = model(scheduler, model_input(scheduler, x, t), t)
        model_input(twin, x, t)
        plain, _, _ = step_and_x0(twin, t, x, out)
        steered, x, first_order = step_and_x0(scheduler, t, x, out)
        if steerer.history[-1].strength > 0:
            opened[first_order] += 1
            expected = reference_mean_shift(plain, N, BANDWIDTH, patch_size, strength)
            torch.testing.assert_close(steered.double(), expected, rtol=tol, atol=tol)
            moved = max(moved, float((steered - plain).abs().max()))
        else:
            closed += 1
            if base_name(scheduler) == "FlowMatchHeunDiscreteScheduler" and not first_order:
                # read back through each scheduler's own saved first-order state, which steering changed
                torch.testing.assert_close(steered, plain, rtol=tol, atol=tol)
            else:
                assert torch.equal(steered, plain)
    assert len(steerer.history) == len(timesteps(scheduler))  # one record per model evaluation
    assert opened[True] and closed and moved > 1e-3
    if SUPPORTED_SCHEDULERS[base_name(scheduler)].evaluations == "both" and base_name(scheduler) != (
        "DPMSolverSinglestepScheduler"
    ):
        assert opened[False], "the second evaluation of a second-order step is steered too"


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


VP_NAMES = [n for n, (cls, _) in CONFIGS.items() if SUPPORTED_SCHEDULERS[cls].family in ("vp", "solver")]


@pytest.mark.parametrize("name", VP_NAMES)
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_items_never_mix(name):
    """Two items x N particles: changing item 1's noise leaves item 0's trajectory bit for bit unchanged (the same
    batch layout runs the same computation on item 0's rows)."""
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
        (lambda: diffusers.PNDMScheduler(), "PNDMScheduler; supported schedulers: DDIMScheduler, DDPM.*refused: "),
        (lambda: diffusers.AmusedScheduler(mask_token_id=0), "AmusedScheduler is refused: masked-token generation"),
        (lambda: diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample"), "epsilon, v_prediction$"),
        (lambda: diffusers.KDPM2DiscreteScheduler(prediction_type="sample"), "epsilon, v_prediction$"),
        (lambda: diffusers.EDMEulerScheduler(prediction_type="sample"), "epsilon, v_prediction$"),
        (lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "without use_flow_sigmas"),
        (lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True), "use_flow_sigmas=True with prediction"),
        (
            lambda: diffusers.SASolverScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, algorithm_type="noise_prediction"
            ),
            "noise-prediction algorithm",
        ),
        (lambda: diffusers.EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type='discrete'"),
        (lambda: diffusers.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler()), "solver_p"),
        (
            lambda: diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True, stochastic_sampling=True),
            "invert_sigmas=True with stochastic_sampling=True",
        ),
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
