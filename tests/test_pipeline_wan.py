"""run() on a video pipeline: Wan text-to-video (WanPipeline), tiny and random (kds_hook.testing).

Video latents (B, C, F, H, W) are already spatial (three spatial dims): the mean shift cuts patches across frames
and space, and selection compares whole clips. Wan runs the conditional and unconditional passes as two
transformer calls (no doubled batch); its VAE denormalises with per-channel latents_mean/latents_std, undone
before selection. The output is ``frames``.
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
from kds_hook.testing import tiny_wan_pipeline  # noqa: E402

from pipeline_checks import (  # noqa: E402
    check_chunking,
    check_inputs_never_mix,
    check_one_decode_per_input_and_selection,
    check_strength_zero_and_one_particle,
    seeded,
)

N = 3
STEPS = 4
STRONG = dict(num_particles=N, bandwidth="auto", strength=0.5)
# 5 frames of 32x32: a (16, 2, 4, 4) latent per clip
COMMON = dict(height=32, width=32, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")


@functools.lru_cache(maxsize=None)
def wan(scheduler: str = "euler"):
    return tiny_wan_pipeline(scheduler)


def embeds(seed: int = 5):
    return dict(prompt_embeds=torch.randn(2, 8, 32, generator=seeded(seed)),
                negative_prompt_embeds=torch.randn(2, 8, 32, generator=seeded(seed + 1)))


def expanded(seed: int = 5):
    return {k: v.repeat_interleave(N, dim=0) for k, v in embeds(seed).items()}


def test_strength_zero_and_one_particle_are_the_plain_pipeline():
    check_strength_zero_and_one_particle(wan(), N, embeds(), expanded(), embeds(), **COMMON)


def test_one_decode_per_input_and_selection_of_whole_clips():
    pipe = wan()
    check_one_decode_per_input_and_selection(pipe, KDS(**STRONG), embeds(), items=2, **COMMON)
    out = run(pipe, KDS(**STRONG), generator=seeded(), return_particles=True, **embeds(), **COMMON)
    assert out.particles.shape == (2, N, 16, 2, 4, 4)
    assert out.images.shape == (2, 5, 32, 32, 3)  # one clip of 5 frames per input
    steered_rows = KDS(**STRONG).select(out.particles.flatten(0, 1)).index
    assert torch.equal(out.index, steered_rows)


def test_inputs_never_mix_and_prompts_work():
    changed = embeds()
    changed["prompt_embeds"][1] = -changed["prompt_embeds"][1]
    check_inputs_never_mix(wan(), KDS(**STRONG), embeds(), changed, **COMMON)
    out = run(wan(), KDS(**STRONG), prompt=["a red cat", "a blue dog"], negative_prompt="blurry",
              generator=seeded(), max_sequence_length=16, **COMMON)
    assert out.images.shape == (2, 5, 32, 32, 3)


def test_chunking_agrees_to_rounding():
    # two transformer calls per step (conditional, unconditional), each of 2 x 3 rows
    assert check_chunking(wan(), KDS(**STRONG), embeds(), expanded(), 4, **COMMON) == [2 * N] * 2 * STEPS


def test_unipc_flow_scheduler():
    """Wan 2.1's own scheduler, UniPC in flow-matching mode: strength 0 is the plain pipeline bit for bit."""
    check_strength_zero_and_one_particle(wan("unipc"), N, embeds(), expanded(), embeds(), **COMMON)
