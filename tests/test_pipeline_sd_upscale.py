"""run() on the Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline), tiny and random (kds_hook.testing).

The upscaler's UNet sees the noisy latent concatenated with the low-resolution image, which the pipeline first
noises with its low_res_scheduler at ``noise_level`` (one draw per row of the batch) and passes the level as the
UNet's class label. v-prediction DDIM with classifier-free guidance, as the real model.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# Tiny models: extra threads only spin (and on a shared machine make these tests several times slower).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import run  # noqa: E402
from kds_hook.testing import tiny_sd_upscale_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    assert_pristine,
    check_chunking,
    check_inputs_never_mix,
    check_one_decode_per_input_and_selection,
    check_strength_zero_and_one_particle,
    seeded,
)
from reference import reference_mean_shift  # noqa: E402

N = 3
STEPS = 3
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)
PROMPTS = ["a red cat", "a blue dog"]


@functools.lru_cache(maxsize=None)
def upscaler():
    return tiny_sd_upscale_pipeline()


def low_res(items: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(items, 3, 8, 8, generator=seeded(seed))  # in [0, 1], as the image processor expects


def inputs(**extra):
    return dict(prompt=list(PROMPTS), image=low_res(), **extra)


def expanded(**extra):
    return dict(prompt=[p for p in PROMPTS for _ in range(N)], image=low_res().repeat_interleave(N, dim=0), **extra)


COMMON = dict(num_inference_steps=STEPS, guidance_scale=5.0, noise_level=20, output_type="np")


def test_strength_zero_and_one_particle_are_the_plain_pipeline():
    pipe = upscaler()
    check_strength_zero_and_one_particle(pipe, N, inputs(), expanded(), inputs(), **COMMON)


def test_one_decode_per_input_and_selection_in_latent_space():
    pipe = upscaler()
    check_one_decode_per_input_and_selection(pipe, KDS(**STRONG), inputs(), items=2, **COMMON)
    out = run(pipe, KDS(**STRONG), generator=seeded(), **inputs(), **COMMON)
    assert out.images.shape == (2, 32, 32, 3)  # 4x the 8x8 input
    assert out.latents.shape == (2, 4, 8, 8)  # latents at the low-resolution size


def test_inputs_never_mix():
    changed = inputs()
    changed["image"][1] = 1 - changed["image"][1]
    check_inputs_never_mix(upscaler(), KDS(**STRONG), inputs(), changed, **COMMON)


def test_chunking_splits_the_class_labels_and_agrees_to_rounding():
    # CFG doubles the 2 x 3 particle rows to a UNet batch of 12; noise_level is a per-row class label, split too.
    assert check_chunking(upscaler(), KDS(**STRONG), inputs(), expanded(), 5, **COMMON) == [12] * STEPS


def test_steering_acts_on_the_guided_v_prediction_and_noise_level_is_used():
    """The x0 that DDIM continues from (its pred_original_sample) is the reference mean shift of the x0 of the
    guided v-prediction, on steps where the gate is open, and that x0 itself where it is closed."""
    pipe = upscaler()
    sched, guidance = pipe.scheduler, 5.0
    unet_out, seen = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: unet_out.append(output[0].detach()))
    step = type(sched).step

    def recording(self, model_output, timestep, sample, *args, **kwargs):
        result = step(self, model_output, timestep, sample, *args, **kwargs)
        seen.append((int(timestep), sample, result[1] if isinstance(result, tuple) else result.pred_original_sample))
        return result

    kds = KDS(num_particles=N, bandwidth=2.0, strength=0.3)
    sched.step = recording.__get__(sched)  # the patch wraps this instance method and restores it afterwards
    try:
        out = run(pipe, kds, generator=seeded(), **inputs(), **dict(COMMON, num_inference_steps=4))
        assert "step" in vars(sched) and sched.step.__func__ is recording
    finally:
        del sched.step
        hook.remove()
    assert_pristine(pipe)
    assert out.images.shape[0] == 2
    gated = 0
    for (t, sample, x0_seen), v in zip(seen, unet_out):
        uncond, text = v.chunk(2)
        v = (uncond + guidance * (text - uncond)).double()
        alpha_bar = sched.alphas_cumprod[t].double()
        x0 = alpha_bar.sqrt() * sample.double() - (1 - alpha_bar).sqrt() * v  # v-prediction
        if t / sched.config.num_train_timesteps >= kds.gate.threshold:
            gated += 1
            expected = reference_mean_shift(x0, N, 2.0, 1, 0.3)
            assert (expected - x0).abs().max() > 1e-2
        else:
            expected = x0
        torch.testing.assert_close(x0_seen.double(), expected, rtol=1e-4, atol=1e-4)
    assert 0 < gated < len(seen)

    other_level = run(pipe, KDS(**STRONG), generator=seeded(), **inputs(), **dict(COMMON, noise_level=150))
    same_level = run(pipe, KDS(**STRONG), generator=seeded(), **inputs(), **COMMON)
    assert not torch.equal(other_level.latents, same_level.latents)


def test_prompt_embeds_and_pil_images():
    """prompt_embeds instead of prompts, one PIL image serving one input: strength 0 is the plain pipeline on the
    expanded batch."""
    import PIL.Image

    pipe = upscaler()
    image = PIL.Image.fromarray((low_res(1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    embeds = torch.randn(1, 77, 32, generator=seeded(5))
    negative = torch.randn(1, 77, 32, generator=seeded(6))
    common = dict(COMMON, output_type="latent")
    off = run(pipe, KDS(num_particles=N, strength=0.0), prompt_embeds=embeds, negative_prompt_embeds=negative,
              image=image, generator=seeded(), return_particles=True, **common)
    plain = pipe(prompt_embeds=embeds.repeat(N, 1, 1), negative_prompt_embeds=negative.repeat(N, 1, 1),
                 image=[image] * N, generator=seeded(), **common).images
    assert torch.equal(off.particles[0], plain)
