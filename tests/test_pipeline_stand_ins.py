"""The stand-ins of the pipeline families run() drives (and Chroma, the recipe's) take the real call arguments,
prompt strings included, at their default sizes, through ``stand_ins()`` and ``from_pretrained`` as the docs'
examples do; and run() drives each of them (the recipe for Chroma)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import run  # noqa: E402
from kds_hook.testing import STAND_IN_REPOS, STAND_INS, stand_in_image, stand_ins  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PICTURE = dict(image=stand_in_image(32))
INPAINT = dict(image=stand_in_image(32), mask_image=stand_in_image(32, mask=True))
CASES = {
    "StableDiffusionUpscalePipeline": ("stabilityai/stable-diffusion-x4-upscaler", PICTURE),
    "StableDiffusionXLPipeline": ("stabilityai/stable-diffusion-xl-base-1.0", {}),
    "StableDiffusionXLImg2ImgPipeline": ("stabilityai/stable-diffusion-xl-refiner-1.0", dict(PICTURE, strength=0.6)),
    "StableDiffusionXLInpaintPipeline": ("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", INPAINT),
    "StableDiffusion3Pipeline": ("stabilityai/stable-diffusion-3.5-medium", {}),
    "FluxPipeline": ("black-forest-labs/FLUX.1-dev", {}),
    "FluxImg2ImgPipeline": ("black-forest-labs/FLUX.1-dev", dict(PICTURE, strength=0.6)),
    "FluxFillPipeline": ("black-forest-labs/FLUX.1-Fill-dev", INPAINT),
    "ChromaPipeline": ("lodestones/Chroma1-HD", {}),
    # the real default (81 frames of 480x832) is far too large for a CPU: a short, small clip
    "WanPipeline": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dict(height=32, width=32, num_frames=5)),
}


def test_every_new_family_is_registered():
    assert set(CASES) <= set(STAND_INS)
    for name, (repo, _) in CASES.items():
        if name not in ("FluxImg2ImgPipeline",):  # FLUX.1-dev's model_index names FluxPipeline
            assert STAND_IN_REPOS[repo] == name


@pytest.mark.parametrize("name", sorted(CASES))
def test_stand_in_takes_prompts_at_its_default_size(name):
    repo, extra = CASES[name]
    with stand_ins():
        pipe = getattr(diffusers, name).from_pretrained(repo)
    assert type(pipe).__name__ == name
    common = dict(prompt="a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np", **extra)
    if name != "FluxFillPipeline":  # the one without negative prompts
        common["negative_prompt"] = "blurry"
    if name == "ChromaPipeline":  # run() does not drive it: the docs' recipe does (tests/test_pipeline_recipe.py)
        images = pipe(**common).images
        assert images.shape[0] == 1
        return
    out = run(pipe, KDS(num_particles=2, bandwidth="auto"), **common)
    assert out.index.shape == (1,)
    assert len(out.images) == 1
