"""run() on Stable Diffusion XL (text2img, img2img, inpaint), tiny and random (kds_hook.testing).

SDXL adds a second text encoder, pooled embeddings and size/crop "time ids" as added conditioning
(``added_cond_kwargs``, split per row by max_batch_size) and, on some VAEs, per-channel latent statistics that
selection must undo. Euler-discrete scheduling with classifier-free guidance, as SDXL's default.
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
from kds_hook.testing import tiny_sdxl_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    check_chunking,
    check_inputs_never_mix,
    check_one_decode_per_input_and_selection,
    check_strength_zero_and_one_particle,
    seeded,
)

N = 3
STEPS = 3
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)
PROMPTS = ["a red cat", "a blue dog"]
COMMON = dict(height=32, width=32, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")


@functools.lru_cache(maxsize=None)
def sdxl(kind: str, inpaint_channels: int = 9):
    return tiny_sdxl_pipeline(kind, inpaint_channels=inpaint_channels)


def inputs(kind: str, **extra):
    kwargs = dict(prompt=list(PROMPTS), **extra)
    if kind != "text2img":
        kwargs["image"] = torch.rand(2, 3, 32, 32, generator=seeded(2))
        kwargs["strength"] = 0.9
    if kind == "inpaint":
        mask = torch.zeros(2, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1.0
        kwargs["mask_image"] = mask
    return kwargs


def expanded(kind: str):
    kwargs = inputs(kind)
    kwargs["prompt"] = [p for p in PROMPTS for _ in range(N)]
    for name in ("image", "mask_image"):
        if name in kwargs:
            kwargs[name] = kwargs[name].repeat_interleave(N, dim=0)
    return kwargs


@pytest.mark.parametrize("kind, channels", [("text2img", 9), ("img2img", 9), ("inpaint", 9), ("inpaint", 4)])
def test_strength_zero_and_one_particle_are_the_plain_pipeline(kind, channels):
    """Also the 4-channel inpainting UNet, where the pipeline pastes the known region back after every step: the
    latents it decodes (and that run() selects among) are the pasted ones."""
    pipe = sdxl(kind, channels)
    check_strength_zero_and_one_particle(pipe, N, inputs(kind), expanded(kind), inputs(kind), **COMMON)


def test_selection_undoes_the_vae_latent_statistics():
    """A VAE config with latents_mean/latents_std (as Playground v2.5's): the decoder gets
    x * std / scaling_factor + mean, and run() selects in the scheduler's space x (the strength-0 check compares
    the particles with the scheduler's own latents)."""
    pipe = tiny_sdxl_pipeline("text2img")
    pipe.vae.register_to_config(latents_mean=[0.5, -0.2, 0.1, 0.0], latents_std=[0.6, 1.5, 0.8, 1.1])
    check_strength_zero_and_one_particle(pipe, N, inputs("text2img"), expanded("text2img"), inputs("text2img"),
                                         **COMMON)
    check_one_decode_per_input_and_selection(pipe, KDS(**STRONG), inputs("text2img"), items=2, **COMMON)


def test_inputs_never_mix_and_steering_is_active():
    pipe = sdxl("img2img")
    changed = inputs("img2img")
    changed["image"][1] = 1 - changed["image"][1]
    check_inputs_never_mix(pipe, KDS(**STRONG), inputs("img2img"), changed, **COMMON)
    steered = run(pipe, KDS(**STRONG), generator=seeded(), return_particles=True, **inputs("img2img"), **COMMON)
    off = run(pipe, KDS(**dict(STRONG, strength=0.0)), generator=seeded(), return_particles=True,
              **inputs("img2img"), **COMMON)
    assert (steered.particles - off.particles).abs().max() > 1e-3


def test_chunking_splits_the_added_conditioning():
    # CFG doubles the 2 x 3 particle rows; text_embeds and time_ids in added_cond_kwargs are split with them.
    calls = check_chunking(sdxl("inpaint"), KDS(**STRONG), inputs("inpaint"), expanded("inpaint"), 5, **COMMON)
    assert set(calls) == {2 * 2 * N}


def test_prompt_and_pooled_embeddings_are_repeated_per_input():
    """prompt_embeds (B, 77, 64) and pooled_prompt_embeds (B, 32), with their negatives, are expanded row by row:
    strength 0 gives the plain pipeline on the expanded batch; a second prompt and negative prompt are used."""
    pipe = sdxl("text2img")
    common = dict(COMMON, output_type="latent")
    embeds = dict(
        prompt_embeds=torch.randn(2, 77, 64, generator=seeded(5)),
        negative_prompt_embeds=torch.randn(2, 77, 64, generator=seeded(6)),
        pooled_prompt_embeds=torch.randn(2, 32, generator=seeded(7)),
        negative_pooled_prompt_embeds=torch.randn(2, 32, generator=seeded(8)),
    )
    off = KDS(num_particles=N, strength=0.0)
    out = run(pipe, off, generator=seeded(), return_particles=True, **embeds, **common)
    plain = pipe(generator=seeded(), **{k: v.repeat_interleave(N, dim=0) for k, v in embeds.items()}, **common)
    assert torch.equal(out.particles.flatten(0, 1), plain.images)

    base = run(pipe, off, prompt="a red cat", negative_prompt="blurry", generator=seeded(), **common)
    second = run(pipe, off, prompt="a red cat", prompt_2="oil painting", negative_prompt="blurry",
                 negative_prompt_2="dark", generator=seeded(), **common)
    assert not torch.equal(base.latents, second.latents)
    plain = pipe(prompt=["a red cat"] * N, prompt_2=["oil painting"] * N, negative_prompt=["blurry"] * N,
                 negative_prompt_2=["dark"] * N, generator=seeded(), **common).images
    assert torch.equal(run(pipe, off, prompt="a red cat", prompt_2="oil painting", negative_prompt="blurry",
                           negative_prompt_2="dark", generator=seeded(), return_particles=True,
                           **common).particles[0], plain)
