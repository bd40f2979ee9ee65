"""run() on Flux (text2img, img2img, Fill inpainting), tiny and random (kds_hook.testing).

Flux's scheduler steps on packed latents (B, h·w/4, 4·C); run() patches it with the packed 2x2 layout of the
call's height and width, so the mean shift sees the unpacked (B, C, h, w) latent: a steered step continues from
the literal reference mean shift of the unpacked x0. Selection happens there too, after undoing the VAE's
scaling_factor and shift_factor. The transformer's img_ids/txt_ids are per token, not per row, and are never
split by max_batch_size.
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
from kds_hook.diffusers.layouts import packed_2x2  # noqa: E402
from kds_hook.testing import tiny_flux_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    check_chunking,
    check_flow_steering,
    check_inputs_never_mix,
    check_one_decode_per_input_and_selection,
    check_strength_zero_and_one_particle,
    denoiser_batch_sizes,
    denoiser_outputs,
    flow_steps,
    seeded,
)

N = 3
STEPS = 4
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)
PROMPTS = ["a red cat", "a blue dog"]
# max_sequence_length 16: T5 pads every prompt to it (the real default, 512, only costs time here).
COMMON = dict(num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=16, output_type="np")


@functools.lru_cache(maxsize=None)
def flux(kind: str):
    return tiny_flux_pipeline(kind)


def inputs(kind: str, **extra):
    kwargs = dict(prompt=list(PROMPTS), height=32, width=32, **extra)
    if kind != "text2img":
        kwargs["image"] = torch.rand(2, 3, 32, 32, generator=seeded(2))
        kwargs["strength"] = 0.6 if kind == "img2img" else 1.0  # 0.6: starts at sigma 0.83 (0.9 still at 1)
    if kind == "fill":
        mask = torch.zeros(2, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1.0
        kwargs["mask_image"] = mask
    return kwargs


def expanded(kind: str, **extra):
    kwargs = inputs(kind, **extra)
    kwargs["prompt"] = [p for p in PROMPTS for _ in range(N)]
    for name in ("image", "mask_image"):
        if name in kwargs:
            kwargs[name] = kwargs[name].repeat_interleave(N, dim=0)
    return kwargs


@pytest.mark.parametrize("kind", ["text2img", "img2img", "fill"])
def test_strength_zero_and_one_particle_are_the_plain_pipeline(kind):
    """Also: the particles are the pipeline's own final latents, unpacked, with scaling and shift undone."""
    pipe = flux(kind)
    check_strength_zero_and_one_particle(pipe, N, inputs(kind), expanded(kind), inputs(kind), **COMMON)


def test_one_decode_per_input_and_selection_in_latent_space():
    pipe = flux("text2img")
    check_one_decode_per_input_and_selection(pipe, KDS(**STRONG), inputs("text2img"), items=2, **COMMON)
    out = run(pipe, KDS(**STRONG), generator=seeded(), return_particles=True, **inputs("text2img"),
              **dict(COMMON, output_type="latent"))
    assert out.particles.shape == (2, N, 4, 16, 16)  # unpacked: (B, N, C, h, w)
    assert out.images.shape == (2, 64, 16)  # output_type="latent": the pipeline's packed latents of the selected


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_steering_is_the_mean_shift_of_the_unpacked_x0(height, width):
    """A steered step continues from the reference mean shift of the unpacked x0. Patches of 4x4 latent pixels
    span 2x2 packed tokens, so they depend on how tokens are arranged (patches of 1 or 2 pixels would not): with a
    non-square size, a layout that swapped height and width would fail here."""
    pipe = flux("text2img")
    kds = KDS(num_particles=N, patch_size=4, bandwidth=3.0, strength=0.5, record=True)
    layout = packed_2x2(2 * (height // 4), 2 * (width // 4))
    call = dict(inputs("text2img"), height=height, width=width)
    with flow_steps(pipe) as steps, denoiser_outputs(pipe) as outputs:
        # 8 steps: the last sigmas fall below the gate's 0.3 (sigma is Flux's t/T)
        out = run(pipe, kds, generator=seeded(), return_particles=True, **call, **dict(COMMON, num_inference_steps=8))
    assert out.particles.shape[-2:] == (height // 2, width // 2)
    steered = check_flow_steering(pipe, kds, steps, outputs, layout.to_spatial, lambda outs, i: outs[i])
    assert 0 < steered < 8  # the gate opened and closed


def test_inputs_never_mix():
    changed = inputs("img2img")
    changed["image"][1] = 1 - changed["image"][1]
    check_inputs_never_mix(flux("img2img"), KDS(**STRONG), inputs("img2img"), changed, **COMMON)


def test_chunking_keeps_token_ids_whole():
    """max_batch_size on the Fill transformer (packed latent, masked-image latent and mask in one token), and a
    batch whose row count equals the token count: img_ids (tokens, 3) must still not be split."""
    assert check_chunking(flux("fill"), KDS(**STRONG), inputs("fill"), expanded("fill"), 4, **COMMON) == [2 * N] * STEPS
    pipe = flux("text2img")
    kds = KDS(num_particles=8, bandwidth="auto", strength=0.5)
    small = dict(inputs("text2img"), height=16, width=16)  # an 8x8 latent: 16 tokens, and 2 x 8 = 16 rows
    whole = run(pipe, kds, generator=seeded(), **small, **COMMON)
    with denoiser_batch_sizes(pipe) as seen:
        chunked = run(pipe, kds, generator=seeded(), max_batch_size=4, **small, **COMMON)
    assert seen == [4] * 4 * STEPS
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=0.0, atol=1e-4 * float(whole.latents.abs().max()))


def test_prompt_and_pooled_embeddings_and_true_cfg():
    """prompt_embeds (B, seq, 32) with pooled_prompt_embeds (B, 32), and their negatives with true_cfg_scale (two
    transformer passes per step), are expanded row by row: strength 0 is the plain pipeline on that batch."""
    pipe = flux("text2img")
    embeds = dict(
        prompt_embeds=torch.randn(2, 8, 32, generator=seeded(5)),
        pooled_prompt_embeds=torch.randn(2, 32, generator=seeded(6)),
        negative_prompt_embeds=torch.randn(2, 8, 32, generator=seeded(7)),
        negative_pooled_prompt_embeds=torch.randn(2, 32, generator=seeded(8)),
    )
    common = dict(COMMON, height=32, width=32, true_cfg_scale=4.0, output_type="latent")
    off = run(pipe, KDS(num_particles=N, strength=0.0), generator=seeded(), return_particles=True, **embeds, **common)
    plain = pipe(generator=seeded(), **{k: v.repeat_interleave(N, dim=0) for k, v in embeds.items()}, **common)
    unpacked = packed_2x2(16, 16).to_spatial(plain.images)
    torch.testing.assert_close(off.particles.flatten(0, 1), unpacked, rtol=1e-6, atol=1e-6)
    no_cfg = run(pipe, KDS(num_particles=N, strength=0.0), generator=seeded(), **embeds, **dict(common, true_cfg_scale=1.0))
    assert not torch.equal(no_cfg.latents, off.latents)  # the negatives are used
