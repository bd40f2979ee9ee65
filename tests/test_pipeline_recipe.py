"""The documented recipe for pipelines run() does not drive, on one of them: Chroma (packed latents, CFG).

apply_patch with the pipeline's latent layout, ``num_images_per_prompt=N``, ``output_type="latent"``,
``kds.select`` on the spatial view, then decode the chosen latent yourself with the family's scaling. The
function below is the recipe of docs/diffusers.md ("Other pipelines"), word for word in substance.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# Tiny models: extra threads only spin (and on a shared machine make these tests several times slower).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import apply_patch, remove_patch  # noqa: E402
from kds_hook.diffusers.layouts import packed_2x2  # noqa: E402
from kds_hook.testing import tiny_chroma_pipeline  # noqa: E402

from pipeline_checks import check_flow_steering, denoiser_outputs, flow_steps, seeded  # noqa: E402

N = 4
GUIDANCE = 5.0
# 10 steps: with shift 3 the last sigmas (Chroma's t/T) fall below the gate's 0.3
CALL = dict(prompt="a red cat", negative_prompt="blurry", height=32, width=40, num_inference_steps=10,
            guidance_scale=GUIDANCE, max_sequence_length=16)


@functools.lru_cache(maxsize=None)
def chroma():
    return tiny_chroma_pipeline()


def layout_of(pipe, height, width):
    grid = pipe.vae_scale_factor * 2
    return packed_2x2(2 * (height // grid), 2 * (width // grid))


def recipe(pipe, kds, **call):
    """(the chosen image as an array in [0, 1], the selection, all N packed latents)"""
    layout = layout_of(pipe, call["height"], call["width"])
    apply_patch(pipe, kds, layout=layout)
    try:
        latents = pipe(**call, num_images_per_prompt=kds.num_particles, output_type="latent").images
    finally:
        remove_patch(pipe)
    best = kds.select(layout.to_spatial(latents))  # (1, C, h, w), in the scheduler's latent space
    z = best.sample / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.no_grad():
        image = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="np")
    return image[0], best, latents


def test_strength_zero_recipe_is_the_plain_pipeline():
    pipe = chroma()
    _, _, latents = recipe(pipe, KDS(num_particles=N, strength=0.0), generator=seeded(), **CALL)
    plain = pipe(**CALL, num_images_per_prompt=N, output_type="latent", generator=seeded()).images
    assert torch.equal(latents, plain)


def test_recipe_steers_the_unpacked_x0_and_decodes_the_selected_particle():
    pipe = chroma()
    kds = KDS(num_particles=N, patch_size=2, bandwidth=1.5, strength=0.5, record=True)

    def guided(outputs, i):  # Chroma runs the conditional pass, then the unconditional one
        return outputs[2 * i + 1] + GUIDANCE * (outputs[2 * i] - outputs[2 * i + 1])

    with flow_steps(pipe) as steps, denoiser_outputs(pipe) as outputs:
        image, best, latents = recipe(pipe, kds, generator=seeded(), **CALL)
    assert 0 < check_flow_steering(pipe, kds, steps, outputs, layout_of(pipe, 32, 40).to_spatial, guided) < 10
    assert "step" not in vars(pipe.scheduler)  # remove_patch restored it

    plain = pipe(**CALL, num_images_per_prompt=N, output_type="latent", generator=seeded()).images
    assert (latents - plain).abs().max() > 1e-3  # steered
    # What the pipeline itself decodes for the chosen particle (a decoder batch of N instead of 1: to rounding).
    kds.reset_history()
    apply_patch(pipe, kds, layout=layout_of(pipe, 32, 40))
    try:
        decoded = pipe(**CALL, num_images_per_prompt=N, output_type="np", generator=seeded()).images
    finally:
        remove_patch(pipe)
    assert image.shape == (32, 40, 3)
    np.testing.assert_allclose(image, decoded[int(best.index[0])], rtol=0.0, atol=1e-4)
    assert np.abs(decoded - image).reshape(N, -1).max(axis=1).argmin() == int(best.index[0])
