"""run() on Stable Diffusion 3 (StableDiffusion3Pipeline), tiny and random (kds_hook.testing).

A flow-matching MMDiT with classifier-free guidance (the batch is doubled) and three text encoders (two pooled);
its VAE has a scaling_factor and a shift_factor, both undone before selection. Steering acts on the guided
velocity's x0 = sample - sigma * velocity.
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
from kds_hook.testing import tiny_sd3_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    check_chunking,
    check_flow_steering,
    check_inputs_never_mix,
    check_one_decode_per_input_and_selection,
    check_strength_zero_and_one_particle,
    denoiser_outputs,
    flow_steps,
    seeded,
)

N = 3
STEPS = 4
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)
PROMPTS = ["a red cat", "a blue dog"]
GUIDANCE = 5.0
COMMON = dict(height=32, width=32, num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=16,
              output_type="np")


@functools.lru_cache(maxsize=None)
def sd3():
    return tiny_sd3_pipeline()


def inputs(**extra):
    return {"prompt": list(PROMPTS), "negative_prompt": "blurry", **extra}


def expanded():
    return dict(prompt=[p for p in PROMPTS for _ in range(N)], negative_prompt=["blurry"] * (2 * N))


def test_strength_zero_and_one_particle_are_the_plain_pipeline():
    """Also: the particles are the pipeline's own final latents with scaling and shift undone."""
    check_strength_zero_and_one_particle(sd3(), N, inputs(), expanded(), inputs(), **COMMON)


def test_one_decode_per_input_and_selection_in_latent_space():
    check_one_decode_per_input_and_selection(sd3(), KDS(**STRONG), inputs(), items=2, **COMMON)


def test_steering_acts_on_the_guided_velocity():
    pipe = sd3()
    kds = KDS(num_particles=N, bandwidth=1.0, strength=0.5, record=True)

    def guided(outputs, i):
        uncond, text = outputs[i].chunk(2)  # the pipeline's CFG batch: unconditional half first
        return uncond + GUIDANCE * (text - uncond)

    with flow_steps(pipe) as steps, denoiser_outputs(pipe) as outputs:
        # 10 steps: with SD3's shift 3 the last sigmas fall below the gate's 0.3 (sigma is t/T)
        run(pipe, kds, generator=seeded(), **inputs(), **dict(COMMON, num_inference_steps=10))
    assert 0 < check_flow_steering(pipe, kds, steps, outputs, lambda x: x, guided) < 10


def test_inputs_never_mix():
    changed = inputs(prompt=[PROMPTS[0], "something else entirely"])
    check_inputs_never_mix(sd3(), KDS(**STRONG), inputs(), changed, **COMMON)


def test_chunking_agrees_to_rounding():
    # CFG doubles the 2 x 3 particle rows to a transformer batch of 12
    assert check_chunking(sd3(), KDS(**STRONG), inputs(), expanded(), 5, **COMMON) == [2 * 2 * N] * STEPS


def test_prompt_and_pooled_embeddings_are_repeated_per_input():
    pipe = sd3()
    embeds = dict(
        prompt_embeds=torch.randn(2, 8, 64, generator=seeded(5)),
        negative_prompt_embeds=torch.randn(2, 8, 64, generator=seeded(6)),
        pooled_prompt_embeds=torch.randn(2, 64, generator=seeded(7)),
        negative_pooled_prompt_embeds=torch.randn(2, 64, generator=seeded(8)),
    )
    common = dict(COMMON, output_type="latent")
    off = run(pipe, KDS(num_particles=N, strength=0.0), generator=seeded(), return_particles=True, **embeds, **common)
    plain = pipe(generator=seeded(), **{k: v.repeat_interleave(N, dim=0) for k, v in embeds.items()}, **common)
    torch.testing.assert_close(off.particles.flatten(0, 1), plain.images, rtol=1e-6, atol=1e-6)
