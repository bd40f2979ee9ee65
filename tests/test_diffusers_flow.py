"""Flow-matching and continuous-time schedulers: the gate's t/T, FlowMatchEuler's options, the float32 step.

t/T is sigma for flow matching, sigma / (sigma + sigma_data) for EDM, the scheduler's own timestep for the cosine
schedule. The gate tests use a non-default number of training steps and a non-default shift, so a hard-coded
1000 or an unshifted sigma would fail.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from kds_hook.diffusers import apply_patch  # noqa: E402
from reference import reference_mean_shift  # noqa: E402
from scheduler_harness import (  # noqa: E402
    MARKS,
    BANDWIDTH,
    N,
    initial_noise,
    kds,
    make,
    model,
    model_input,
    sample,
    start,
    step_and_x0,
)

pytestmark = MARKS


def recorded(scheduler, steerer, **set_timesteps):
    """Runs the loop (with set_timesteps' extra arguments) and returns the recorded t/T and strengths."""
    x = initial_noise(5)
    scheduler.set_timesteps(**{"num_inference_steps": 6, **set_timesteps})
    x = x * (getattr(scheduler, "init_noise_sigma", None) or 1.0)
    for t in scheduler.timesteps:
        out = model(scheduler, model_input(scheduler, x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    assert torch.isfinite(x).all()
    return [r.t_frac for r in steerer.history], [r.strength for r in steerer.history]


def assert_gate(t_fracs, strengths, expected, threshold):
    assert t_fracs == pytest.approx(expected, abs=1e-6)
    assert strengths == [0.3 if f >= threshold else 0.0 for f in t_fracs]
    assert 0.0 in strengths and 0.3 in strengths


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
def test_flow_gate_reads_sigma_after_the_shift(name):
    """t/T = sigma, the shifted noise level: with 500 training steps and shift 3 the timestep is 500 * sigma."""
    steerer = kds(strength=0.3, threshold=0.6, record=True)
    scheduler = apply_patch(make(name, num_train_timesteps=500, shift=3.0), steerer)
    t_fracs, strengths = recorded(scheduler, steerer)
    sigmas = [float(scheduler.sigmas[i]) for i in range(len(scheduler.timesteps))]
    assert_gate(t_fracs, strengths, sigmas, 0.6)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 500)
    unshifted = torch.linspace(1, 0, 7)[:-1]  # what an unshifted schedule would give: t/T would differ
    assert (torch.tensor(sigmas[: len(unshifted)]) - unshifted).abs().max() > 0.05


@pytest.mark.parametrize("name", ["dpmpp", "single_dpmpp", "unipc", "deis", "sa"])
def test_flow_sigmas_in_multistep_solvers_gate_on_sigma(name):
    steerer = kds(strength=0.3, threshold=0.6, record=True)
    scheduler = apply_patch(
        make(name, "flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=500), steerer
    )
    t_fracs, strengths = recorded(scheduler, steerer)
    assert_gate(t_fracs, strengths, [float(s) for s in scheduler.sigmas[: len(t_fracs)]], 0.6)


def test_flow_match_euler_dynamic_shifting_and_custom_sigmas():
    """Flux passes mu (dynamic shifting) and its own sigmas: the gate reads the sigmas set_timesteps produced."""
    steerer = kds(strength=0.3, threshold=0.5, record=True)
    scheduler = apply_patch(make("flow_euler", use_dynamic_shifting=True, num_train_timesteps=800), steerer)
    custom = [1.0, 0.8, 0.6, 0.45, 0.3, 0.15]
    t_fracs, strengths = recorded(scheduler, steerer, sigmas=custom, mu=1.1)
    shifted = [float(s) for s in scheduler.sigmas[:-1]]
    assert_gate(t_fracs, strengths, shifted, 0.5)
    assert shifted != pytest.approx(custom, abs=1e-3)  # mu moved them: the gate follows the shifted values


def test_flow_match_euler_inverted_sigmas():
    """invert_sigmas (Mochi): s runs from noise (0) to data (1); x0 = x + (1 - s) v and t/T = 1 - s."""
    steerer = kds(strength=0.4, threshold=0.3, record=True)
    twin = make("flow_euler", invert_sigmas=True)
    scheduler = apply_patch(make("flow_euler", invert_sigmas=True), steerer)
    x = start(scheduler, initial_noise(3))
    start(twin, initial_noise(3))
    steered_steps = 0
    for t in scheduler.timesteps:
        s = scheduler.sigmas[scheduler.step_index or 0].double()
        x0 = x + 0.1 * torch.tanh(x)  # any model: this checks the algebra, not sampling quality
        v = (x0 - x) / (1 - s)
        plain = twin.step(v, t, x).prev_sample
        prev = scheduler.step(v, t, x).prev_sample
        s_next = scheduler.sigmas[scheduler.step_index].double()
        # prev = x + (s_next - s) v', and x0' = x + (1 - s) v'
        steered_x0 = x + (1 - s) * (prev.double() - x) / (s_next - s)
        if steerer.history[-1].strength > 0:
            steered_steps += 1
            assert steerer.history[-1].t_frac == pytest.approx(1 - float(s))
            expected = reference_mean_shift(x0, N, BANDWIDTH, 1, 0.4)
            torch.testing.assert_close(steered_x0, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(prev, plain)
        x = prev
    assert steered_steps


def test_per_token_timesteps_are_refused_only_where_steered():
    tokens = torch.randn(N, 12, 4, generator=torch.Generator().manual_seed(4))  # (B, tokens, features)
    for threshold, refused in ((2.0, False), (0.3, True)):
        scheduler = apply_patch(make("flow_euler"), kds(threshold=threshold))
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[0]
        per_token = torch.full(tokens.shape[:2], float(t))
        if refused:
            with pytest.raises(ValueError, match="per_token_timesteps"):
                scheduler.step(torch.zeros_like(tokens), t, tokens, per_token_timesteps=per_token)
        else:  # gate closed: the scheduler's own business
            scheduler.step(torch.zeros_like(tokens), t, tokens, per_token_timesteps=per_token)


@pytest.mark.parametrize("name", ["flow_euler", "flow_euler_sde", "flow_heun", "euler", "edm_euler"])
def test_float32_steps_get_the_steered_model_output_in_float32(name):
    """These steps compute in float32 and cast the result to the model output's dtype. A bf16 run gives exactly
    the float32 run's result cast to bf16: the steered model output is not rounded to 16 bits on the way."""
    low = initial_noise(7, dtype=torch.bfloat16)
    steered_low = apply_patch(make(name), kds(threshold=0.0))
    steered_high = apply_patch(make(name), kds(threshold=0.0))
    x_low = start(steered_low, low)
    start(steered_high, low.float())
    for t in steered_low.timesteps:
        out = model(steered_low, model_input(steered_low, x_low, t), t)
        model_input(steered_high, x_low.float(), t)
        high = steered_high.step(out.float(), t, x_low.float(), generator=torch.Generator().manual_seed(0))
        x_low = steered_low.step(out, t, x_low, generator=torch.Generator().manual_seed(0)).prev_sample
        assert x_low.dtype == torch.bfloat16
        assert torch.equal(x_low, high.prev_sample.to(torch.bfloat16))
    assert torch.isfinite(x_low.float()).all()


def test_edm_and_cosine_gates():
    """EDM: t/T = sigma / (sigma + sigma_data) (sigma_data 0.7 here); cosine: its own timestep, 2/pi atan(sigma)."""
    steerer = kds(strength=0.3, threshold=0.5, record=True)
    scheduler = apply_patch(make("edm_euler", sigma_data=0.7, sigma_max=20.0), steerer)
    t_fracs, strengths = recorded(scheduler, steerer)
    sigmas = scheduler.sigmas[:-1].double()
    assert_gate(t_fracs, strengths, (sigmas / (sigmas + 0.7)).tolist(), 0.5)

    steerer = kds(strength=0.3, threshold=0.5, record=True)
    scheduler = apply_patch(make("cosine_dpm", sigma_max=50.0), steerer)
    t_fracs, strengths = recorded(scheduler, steerer)
    expected = (scheduler.sigmas[:-1].double().atan() * 2 / torch.pi).tolist()
    assert_gate(t_fracs, strengths, expected, 0.5)


def test_edm_euler_steers_a_given_pred_original_sample():
    """EDMEulerScheduler.step(..., pred_original_sample=x0) continues from that x0: it is what gets steered."""
    scheduler = apply_patch(make("edm_euler"), kds(strength=0.4, threshold=0.0))
    scheduler.set_timesteps(4)
    x = initial_noise(8)
    t = scheduler.timesteps[0]
    x0 = torch.tanh(x)
    result = scheduler.step(torch.full_like(x, float("nan")), t, x, pred_original_sample=x0)
    torch.testing.assert_close(result.pred_original_sample.double(), reference_mean_shift(x0, N, BANDWIDTH, 1, 0.4))


def test_second_order_steps_record_each_evaluation():
    """Heun-type samplers call step twice per step: both calls are recorded and, with the gate open, steered."""
    for name in ("heun", "flow_heun", "kdpm2", "dpm_sde"):
        steerer = kds(threshold=0.0, record=True)
        scheduler = apply_patch(make(name), steerer)
        sample(scheduler, initial_noise(9), steps=3)
        assert len(steerer.history) == len(scheduler.timesteps) == 5, name
        assert all(r.strength > 0 for r in steerer.history), name


def test_flow_match_euler_rejects_nothing_it_supports():
    """The options FlowMatchEulerDiscreteScheduler offers (shift terminal, Karras/exponential/beta sigmas) patch."""
    for extra in ({"shift_terminal": 0.1}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}):
        scheduler = apply_patch(diffusers.FlowMatchEulerDiscreteScheduler(**extra), kds())
        assert torch.isfinite(sample(scheduler, initial_noise(11))).all()
