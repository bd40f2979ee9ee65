"""KDSSteer and KDSSelect through ComfyUI's own sampling code (``comfy.sample.sample``) on a tiny random-weight
SD1.x-style model. Skips without a ComfyUI checkout in ``COMFYUI_PATH`` (see tests/comfyui_loader.py)."""

from __future__ import annotations

import pytest
import torch

from comfyui_loader import comfyui_imported, conditioning, sample, tiny_model
from kds_hook import PatchMeanShift, select_particles
from kds_hook.comfyui import WRAPPER_KEY, KDSSelect, KDSSteer, model_sampling_t_frac
from reference import reference_mean_shift

# torchsde warns when a float32 sigma_max is compared with its float64 copy (dpmpp_sde); harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Should have tb<=t1")

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc", "lcm"]
SCHEDULERS = ["normal", "karras"]
MATRIX = [(s, k) for s in SAMPLERS for k in SCHEDULERS]
N = 3  # particles per image
ITEMS = 2  # images per batch: two groups of N
LATENT = (4, 8, 8)
# The tiny model's guided x0 has a standard deviation of about 25: h = 30 gives self-weights of about 0.7,
# well inside (1/N, 1), so the shift is neither nothing nor a plain pull to the mean.
BANDWIDTH, STRENGTH, THRESHOLD = 30.0, 0.3, 0.6


@pytest.fixture(scope="module")
def comfy(one_torch_thread):
    with comfyui_imported() as modules:
        yield modules


@pytest.fixture(scope="module")
def base(comfy):
    return tiny_model(comfy)


def initial_noise(rows, seed=0):
    return torch.randn((rows,) + LATENT, generator=torch.Generator().manual_seed(seed))


def steer(model, **settings):
    options = dict(num_particles=N, bandwidth=BANDWIDTH, auto_bandwidth=False, patch_size=1, strength=STRENGTH,
                   threshold=THRESHOLD)  # fmt: skip
    options.update(settings)
    return KDSSteer().patch(model, **options)[0]


def recording_run(comfy, base, sampler, scheduler, **settings):
    """Samples with KDS and records, at every model evaluation, sigma, the guider's unsteered x0 (a post-CFG
    function: CFGGuider runs it last, just before KDS's wrapper returns) and the x0 the sampler got (a
    PREDICT_NOISE wrapper registered before KDSSteer's, hence outside it)."""
    seen, unsteered = [], []

    def outer(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((args[1].clone(), out.clone()))
        return out

    def post_cfg(args):
        unsteered.append(args["denoised"].clone())
        return args["denoised"]

    recorded = base.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test.outer", outer)
    model = steer(recorded, **settings)
    model.set_model_sampler_post_cfg_function(post_cfg)
    sample(comfy, model, initial_noise(ITEMS * N), sampler, scheduler)
    assert len(seen) == len(unsteered) > 0
    return [(sigma, before, after) for (sigma, after), before in zip(seen, unsteered)]


def t_frac_of(model, sigma):
    """t/T as ComfyUI defines it for a discrete model: its training index of sigma over the number of steps."""
    model_sampling = model.get_model_object("model_sampling")
    return int(model_sampling.timestep(sigma[:1])) / model_sampling.num_timesteps


# ---------------------------------------------------------------- bit-identity where nothing is steered


@pytest.mark.parametrize("sampler,scheduler", MATRIX)
def test_no_steering_is_bit_identical_to_the_unpatched_model(comfy, base, sampler, scheduler):
    noise = initial_noise(ITEMS * N)
    plain = sample(comfy, base, noise, sampler, scheduler)
    for settings in ({"strength": 0.0}, {"num_particles": 1}, {"threshold": 1.0}):  # t/T never reaches 1.0
        out = sample(comfy, steer(base, **settings), noise, sampler, scheduler)
        assert torch.equal(out, plain), settings


# ---------------------------------------------------------------- steering equals the reference mean shift


@pytest.mark.parametrize("sampler,scheduler", MATRIX)
def test_gated_evaluations_are_the_reference_mean_shift_and_others_unchanged(comfy, base, sampler, scheduler):
    opened = closed = 0
    for sigma, before, after in recording_run(comfy, base, sampler, scheduler):
        if t_frac_of(base, sigma) >= THRESHOLD:
            expected = reference_mean_shift(before, N, BANDWIDTH, 1, STRENGTH)
            scale = float(before.abs().max())
            torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5 * scale)
            assert float((after - before).abs().max()) > 100 * 1e-5 * scale  # a real shift, far above the tolerance
            opened += 1
        else:
            assert torch.equal(after, before)
            closed += 1
    assert opened and closed, (opened, closed)


def test_patch_size_and_auto_bandwidth_reach_the_mean_shift(comfy, base):
    for sigma, before, after in recording_run(comfy, base, "euler", "normal", patch_size=2, auto_bandwidth=True):
        if t_frac_of(base, sigma) >= THRESHOLD:
            assert torch.equal(after, PatchMeanShift(patch_size=2, bandwidth="auto")(before, N, STRENGTH))
            assert not torch.equal(after, before)
    for sigma, before, after in recording_run(comfy, base, "euler", "normal", patch_size=2):
        if t_frac_of(base, sigma) >= THRESHOLD:
            expected = reference_mean_shift(before, N, BANDWIDTH, 2, STRENGTH)
            torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5 * float(before.abs().max()))


# ---------------------------------------------------------------- groups of N never mix


@pytest.mark.parametrize("sampler,scheduler", MATRIX)
def test_two_groups_in_one_batch_stay_independent(comfy, base, sampler, scheduler):
    """Changing the first group's noise leaves the second group's result alone (same batch layout, so only
    rounding could differ); sampling both groups as one group of 2N shows that a leak would be far larger."""
    noise = initial_noise(ITEMS * N)
    other = noise.clone()
    other[:N] = initial_noise(N, seed=7)

    def second_group(num_particles, x):
        return sample(comfy, steer(base, num_particles=num_particles), x, sampler, scheduler)[N:]

    together, changed = second_group(N, noise), second_group(N, other)
    tolerance = 1e-5 * float(together.abs().max())
    torch.testing.assert_close(changed, together, rtol=0, atol=tolerance)
    mixed, mixed_changed = second_group(2 * N, noise), second_group(2 * N, other)
    assert float((mixed_changed - mixed).abs().max()) > 100 * tolerance


def test_a_group_sampled_with_another_matches_it_sampled_alone(comfy, base):
    """Different batch sizes take different kernels: equal to rounding, and a leak would be far larger."""
    noise = initial_noise(ITEMS * N)
    together = sample(comfy, steer(base), noise, "euler", "normal")[N:]
    alone = sample(comfy, steer(base), noise[N:].clone(), "euler", "normal")
    tolerance = 1e-4 * float(alone.abs().max())
    torch.testing.assert_close(together, alone, rtol=0, atol=tolerance)
    leaked = sample(comfy, steer(base, num_particles=2 * N), noise, "euler", "normal")[N:]
    assert float((leaked - alone).abs().max()) > 100 * tolerance


# ---------------------------------------------------------------- the gate's t/T


def test_discrete_t_frac_is_the_training_index_over_the_number_of_steps(comfy, base):
    model_sampling = base.get_model_object("model_sampling")
    assert model_sampling.num_timesteps == 1000
    sigmas = model_sampling.sigmas
    for index in (0, 1, 299, 300, 599, 600, 999):
        assert float(model_sampling_t_frac(model_sampling, sigmas[index : index + 1])[0]) == index / 1000
    between = (sigmas[600].log() * 0.6 + sigmas[601].log() * 0.4).exp().reshape(1)  # nearer 600 in log sigma
    assert float(model_sampling_t_frac(model_sampling, between)[0]) == 0.6
    per_row = model_sampling_t_frac(model_sampling, sigmas[[999, 999, 300, 300]])
    assert per_row.dtype == torch.float64 and per_row.tolist() == [0.999, 0.999, 0.3, 0.3]


def test_flow_t_frac_is_sigma_and_gates_sampling(comfy):
    flow = tiny_model(comfy, flow=True)
    model_sampling = flow.get_model_object("model_sampling")
    assert isinstance(model_sampling, comfy.model_sampling.CONST)
    sigmas = torch.tensor([1.0, 0.75, 0.6, 0.3, 0.001])
    assert torch.equal(model_sampling_t_frac(model_sampling, sigmas), sigmas.double())
    opened = closed = 0
    for sigma, before, after in recording_run(comfy, flow, "euler", "normal"):
        if float(sigma[0]) >= THRESHOLD:
            expected = reference_mean_shift(before, N, BANDWIDTH, 1, STRENGTH)
            torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
            assert not torch.equal(after, before)
            opened += 1
        else:
            assert torch.equal(after, before)
            closed += 1
    assert opened and closed, (opened, closed)


def continuous_edm_sampling(comfy):
    class ContinuousEDM(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM):
        pass

    return ContinuousEDM()


def test_model_sampling_without_training_steps_is_refused(comfy, base):
    edm = base.clone()
    edm.add_object_patch("model_sampling", continuous_edm_sampling(comfy))
    with pytest.raises(ValueError, match="neither a discrete-time model .* nor a flow model"):
        KDSSteer().patch(edm, 3, 0.3, False, 1, 0.3, 0.3)
    # t/T is read when sampling, so a model-sampling node applied after KDSSteer is seen (and here refused).
    later = steer(base).clone()
    later.add_object_patch("model_sampling", continuous_edm_sampling(comfy))
    with pytest.raises(ValueError, match="cannot read t/T"):
        sample(comfy, later, initial_noise(N), "euler", "normal")


# ---------------------------------------------------------------- the node's contract


def test_batch_not_a_multiple_of_num_particles_is_refused(comfy, base):
    with pytest.raises(ValueError, match=r"5 images, not a multiple of num_particles=3.*RepeatLatentBatch"):
        sample(comfy, steer(base), initial_noise(5), "euler", "normal")


def test_input_model_is_not_modified_and_double_steering_is_refused(comfy, base):
    predict_noise = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
    options_before = repr(base.model_options)
    noise = initial_noise(ITEMS * N)
    plain = sample(comfy, base, noise, "euler", "normal")
    steered = steer(base)
    assert not torch.equal(sample(comfy, steered, noise, "euler", "normal"), plain)
    assert torch.equal(sample(comfy, base, noise, "euler", "normal"), plain)  # sampling the input: as before
    assert steered is not base and steered.model is base.model  # a clone shares the weights, nothing else
    assert base.get_wrappers(predict_noise, WRAPPER_KEY) == [] and repr(base.model_options) == options_before
    assert len(steered.get_wrappers(predict_noise, WRAPPER_KEY)) == 1
    with pytest.raises(ValueError, match="already steered"):
        steer(steered.clone())
    with pytest.raises(ValueError, match="strength must lie in"):
        steer(base, strength=1.5)
    with pytest.raises(TypeError, match="needs a ComfyUI MODEL"):
        KDSSteer().patch(object())


def test_kdsselect_picks_what_select_particles_picks(comfy, base):
    latents = sample(comfy, steer(base), initial_noise(ITEMS * N), "dpmpp_2m", "karras")
    for method in ("mean", "density", "medoid"):
        (picked,) = KDSSelect().select({"samples": latents, "batch_index": list(range(ITEMS * N))}, N, method)
        expected = select_particles(latents, N, method)
        assert torch.equal(picked["samples"], expected.sample)
        assert picked["batch_index"] == (torch.arange(ITEMS) * N + expected.index).tolist()


# ---------------------------------------------------------------- why the PREDICT_NOISE wrapper


def test_dual_cfg_guider_steers_the_final_prediction_not_the_post_cfg_one(comfy, base):
    """DualCFGGuider adds its second guidance term after cfg_function, where post-CFG functions run: a post-CFG
    hook would steer an x0 the sampler never uses. KDSSteer's wrapper steers the guider's final x0."""
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    predict_noise = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
    post_cfg, final, steered = [], [], []

    def recorder(store):
        def wrapper(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            store.append((args[1].clone(), out.clone()))
            return out

        return wrapper

    outer = base.clone()
    outer.add_wrapper_with_key(predict_noise, "test.outer", recorder(steered))
    model = steer(outer)
    model.add_wrapper_with_key(predict_noise, "test.inner", recorder(final))  # registered after: inside KDS's
    model.set_model_sampler_post_cfg_function(lambda args: post_cfg.append(args["denoised"].clone()) or args["denoised"])

    positive, negative = conditioning()
    middle = conditioning(seed=2)[0]
    guider = Guider_DualCFG(model)
    guider.set_conds(positive, middle, negative)
    guider.set_cfg(4.0, 2.0, nested=False)
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 4)
    with torch.inference_mode():
        guider.sample(initial_noise(ITEMS * N), torch.zeros((ITEMS * N,) + LATENT),
                      comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)  # fmt: skip
    assert len(post_cfg) == len(final) == len(steered) == 4
    gated = 0
    for partial, (sigma, x0), (_, out) in zip(post_cfg, final, steered):
        assert float((x0 - partial).abs().max()) > 1e-4 * float(x0.abs().max())  # post-CFG sees another x0
        if t_frac_of(base, sigma) >= THRESHOLD:
            expected = reference_mean_shift(x0, N, BANDWIDTH, 1, STRENGTH)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(x0.abs().max()))
            gated += 1
        else:
            assert torch.equal(out, x0)
    assert gated
