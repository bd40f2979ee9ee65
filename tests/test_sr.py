"""The built-in super-resolution model (kds_hook.sr): pipeline, save/load, any input size, KDS patching, the shipped
weights, the photo split and the training script's determinism.

Random-weight pipelines have the built-in architecture; inputs are a few pixels, so every call is milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers")

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import apply_patch, remove_patch  # noqa: E402
from kds_hook.sr import (  # noqa: E402
    HELD_OUT_PHOTOS,
    PHOTOS,
    TRAIN_PHOTOS,
    KDSSuperResolutionPipeline,
    bicubic_downsample,
    bicubic_upsample,
    build_pipeline,
    builtin_path,
    load_builtin,
    load_pipeline,
    quantize,
)
from kds_hook.sr.data import EXCLUDED_PHOTOS  # noqa: E402
from kds_hook.sr.model import RESIDUAL_SCALE, SCHEDULER_CONFIG, UNET_CONFIG  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_res(items: int = 1, height: int = 4, width: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(items, 3, height, width, generator=seeded(seed)) * 2 - 1


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def test_pipeline_builds_from_config(pipe):
    assert isinstance(pipe, KDSSuperResolutionPipeline)
    assert pipe.unet.config.in_channels == 6 and pipe.unet.config.out_channels == 3
    assert tuple(pipe.unet.config.block_out_channels) == UNET_CONFIG["block_out_channels"]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.residual_scale == RESIDUAL_SCALE
    assert pipe.size_multiple == 8
    # the same seed gives the same weights, another seed others
    again, other = build_pipeline(seed=0), build_pipeline(seed=1)
    weights = pipe.unet.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in again.unet.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in other.unet.state_dict().items())


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "KDSSuperResolutionPipeline" and index["residual_scale"] == RESIDUAL_SCALE
    loaded = load_pipeline(tmp_path)
    assert isinstance(loaded, KDSSuperResolutionPipeline) and loaded.residual_scale == RESIDUAL_SCALE
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert {k: loaded.scheduler.config[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.unet.state_dict().items())
    image = low_res()
    a = pipe(image, num_inference_steps=2, generator=seeded(), output_type="pt").images
    b = loaded(image, num_inference_steps=2, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same weights; convolution algorithms may differ in rounding
    c = loaded(image, num_inference_steps=2, generator=seeded(1), output_type="pt").images
    assert (a - c).abs().max() > 1e-2  # the tolerance above would catch different noise


@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (4, 4), (7, 6)])
def test_any_input_size(pipe, height, width):
    out = pipe(low_res(2, height, width), num_inference_steps=2, generator=seeded(), output_type="pt").images
    assert out.shape == (2, 3, 4 * height, 4 * width)
    assert out.min() >= 0 and out.max() <= 1
    latents = pipe(low_res(1, height, width), num_inference_steps=1, output_type="latent").images
    multiple = pipe.size_multiple
    assert latents.shape[-2:] == (-(-4 * height // multiple) * multiple, -(-4 * width // multiple) * multiple)


def test_input_and_output_forms_agree(pipe):
    array = (np.random.default_rng(0).random((5, 3, 3)) * 255).astype(np.uint8)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1
    call = dict(num_inference_steps=2)
    pt = pipe(as_tensor, generator=seeded(), output_type="pt", **call).images
    from_array = pipe(array, generator=seeded(), output_type="pt", **call).images
    from_pil = pipe(PIL.Image.fromarray(array), generator=seeded(), output_type="np", **call).images
    pil = pipe([PIL.Image.fromarray(array)], generator=seeded(), **call).images
    assert torch.equal(pt, from_array)
    np.testing.assert_array_equal(from_pil, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (12, 20)
    with pytest.raises(ValueError, match="output_type"):
        pipe(as_tensor, output_type="jpeg")
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(as_tensor, latents=torch.zeros(1, 3, 20, 12))
    with pytest.raises(TypeError, match="uint8"):
        pipe(array.astype(np.float32))
    with pytest.raises(ValueError, match="share their size"):
        pipe([PIL.Image.new("RGB", (3, 3)), PIL.Image.new("RGB", (4, 3))])
    with pytest.raises(ValueError, match="residual_scale"):
        KDSSuperResolutionPipeline(unet=pipe.unet, scheduler=pipe.scheduler, residual_scale=0.0)


def test_output_is_bicubic_plus_scaled_residual(pipe):
    image = low_res(1, 2, 3)
    latents = pipe(image, num_inference_steps=2, generator=seeded(), output_type="latent").images[..., :8, :12]
    out = pipe(image, num_inference_steps=2, generator=seeded(), output_type="pt").images
    expected = ((bicubic_upsample(image) + latents / RESIDUAL_SCALE).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_apply_patch_strength_zero_is_bit_identical(pipe):
    n = 3
    image = low_res(2, 3, 3).repeat_interleave(n, dim=0)  # two inputs, N particles each, contiguous
    call = dict(num_inference_steps=4, output_type="latent")
    plain = pipe(image, generator=seeded(), **call).images
    kds_off = KDS(num_particles=n, strength=0.0, record=True)
    apply_patch(pipe, kds_off)
    try:
        off = pipe(image, generator=seeded(), **call).images
    finally:
        remove_patch(pipe)
    assert torch.equal(off, plain)
    assert len(kds_off.history) == 4
    kds = KDS(num_particles=n, bandwidth="auto", strength=0.5, record=True)
    apply_patch(pipe, kds)
    try:
        steered = pipe(image, generator=seeded(), **call).images
    finally:
        remove_patch(pipe)
    assert [r.strength for r in kds.history] == [0.5, 0.5, 0.5, 0.0]  # trailing DDIM: t/T = 0.999 ... 0.249
    assert (steered - plain).abs().max() > 1e-3
    assert torch.equal(pipe(image, generator=seeded(), **call).images, plain)  # removed: plain again


def test_builtin_weights_load_and_upscale():
    torch.set_num_threads(1)
    pipe = load_builtin()
    assert pipe.unet.dtype == torch.float32 and not pipe.unet.training
    size = os.path.getsize(builtin_path() / "unet" / "diffusion_pytorch_model.safetensors")
    assert size <= 10 * 2**20
    rng = np.random.default_rng(0)
    crop = PIL.Image.fromarray((rng.random((6, 5, 3)) * 255).astype(np.uint8))
    out = pipe(crop, num_inference_steps=2, generator=seeded(), output_type="np").images
    assert out.shape == (1, 24, 20, 3) and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    # a trained residual model stays near bicubic on a smooth input
    smooth = torch.linspace(-0.5, 0.5, 8).repeat(1, 3, 8, 1)
    result = pipe(smooth, num_inference_steps=4, generator=seeded(), output_type="pt").images * 2 - 1
    assert (result - bicubic_upsample(smooth)).abs().mean() < 0.05


def test_missing_weights_give_a_clear_error(tmp_path):
    shutil.copytree(builtin_path(), tmp_path / "model")
    (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no super-resolution model weights .*diffusion_pytorch_model.safetensors"):
        load_pipeline(tmp_path / "model")
    with pytest.raises(ValueError, match="missing"):
        load_pipeline(tmp_path / "nowhere")


def test_held_out_photos_are_disjoint_from_training():
    assert set(TRAIN_PHOTOS).isdisjoint(HELD_OUT_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(HELD_OUT_PHOTOS) == set(PHOTOS)
    assert set(EXCLUDED_PHOTOS).isdisjoint(PHOTOS)
    assert len(HELD_OUT_PHOTOS) >= 4 and all(PHOTOS[name].license for name in PHOTOS)
    assert not any(PHOTOS[name].gray for name in HELD_OUT_PHOTOS)


def test_resampling():
    image = low_res(1, 8, 12)
    small = bicubic_downsample(image)
    assert small.shape == (1, 3, 2, 3)
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(bicubic_downsample(flat), torch.full((1, 3, 2, 2), 0.25))
    torch.testing.assert_close(bicubic_upsample(torch.full((1, 3, 2, 2), 0.25)), torch.full((1, 3, 8, 8), 0.25))
    levels = (quantize(image) + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 4"):
        bicubic_downsample(low_res(1, 6, 8))
    with pytest.raises(TypeError):
        bicubic_upsample(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def _train_module():
    spec = importlib.util.spec_from_file_location("train_sr", REPO / "benchmarks" / "train_sr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    """Three tiny steps on stand-in photos; again, stopped after the first step and resumed; and with another seed."""
    torch.set_num_threads(1)
    train = _train_module()
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train.npz", **{name: (rng.random((40, 48, 3)) * 255).astype(np.uint8) for name in TRAIN_PHOTOS})
    # no decay phase: the learning rate of a step does not depend on the planned step count
    common = ["--data", str(data), "--batch-size", "2", "--crop", "16", "--warmup", "1", "--decay-fraction", "0",
              "--no-eval"]

    def weights(out):
        from safetensors.torch import load_file

        return load_file(str(tmp_path / out / "unet" / "diffusion_pytorch_model.safetensors"))

    assert train.main(common + ["--steps", "3", "--out", str(tmp_path / "a"),
                                "--checkpoint-dir", str(tmp_path / "a-ckpt")]) == 0
    train.main(common + ["--steps", "1", "--out", str(tmp_path / "c"), "--checkpoint-dir", str(tmp_path / "c-ckpt")])
    train.main(common + ["--steps", "3", "--resume", "--out", str(tmp_path / "c"),
                         "--checkpoint-dir", str(tmp_path / "c-ckpt")])
    train.main(common + ["--steps", "3", "--seed", "1", "--out", str(tmp_path / "d"),
                         "--checkpoint-dir", str(tmp_path / "d-ckpt")])
    a, c, d = weights("a"), weights("c"), weights("d")
    assert all(torch.equal(a[k], c[k]) for k in a)  # a fresh run, stopped and resumed, equals the uninterrupted one
    assert not all(torch.equal(a[k], d[k]) for k in a)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps_done"] == 3 and (tmp_path / "a" / "loss_curve.png").is_file()
    assert "--steps 3" in (tmp_path / "a" / "MODEL_CARD.md").read_text()


def test_decoder_pairs_selected_rows_with_their_bicubic_image(pipe):
    upsampled = torch.rand(6, 3, 8, 8) * 2 - 1
    upsampled[1], upsampled[2], upsampled[4], upsampled[5] = upsampled[0], upsampled[0], upsampled[3], upsampled[3]
    latents = torch.randn(6, 3, 8, 8) * 0.1
    all_rows = pipe.decoder.decode(latents, upsampled)
    chosen = pipe.decoder.decode(latents[[2, 4]], upsampled)  # one particle of each of 2 inputs with N = 3
    torch.testing.assert_close(chosen, all_rows[[2, 4]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot pair"):
        pipe.decoder.decode(latents[:4], upsampled)


def test_api_page_lists_every_public_name():
    import re

    import kds_hook.sr

    text = (REPO / "docs" / "api.md").read_text()
    section = text.split("## `kds_hook.sr`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", "\n".join(
        line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))))
    assert set(kds_hook.sr.__all__) <= listed, sorted(set(kds_hook.sr.__all__) - listed)


def test_run_selects_and_decodes_like_the_plain_pipeline(pipe):
    from kds_hook.diffusers import run

    n, image = 3, low_res(2, 3, 5)
    call = dict(image=image, num_inference_steps=3)
    plain = pipe(image.repeat_interleave(n, dim=0), num_inference_steps=3, generator=seeded(4),
                 output_type="latent").images
    off = run(pipe, KDS(num_particles=n, strength=0.0), output_type="pt", generator=seeded(4), **call)
    torch.testing.assert_close(off.latents, plain.reshape(2, n, *plain.shape[1:])[torch.arange(2), off.index])
    expected = (pipe.decoder.decode(off.latents[..., :12, :20], pipe.upsample(image)) + 1) / 2  # pointwise
    assert torch.equal(off.images, expected)
    assert torch.equal(off.index, KDS(num_particles=n).select(plain).index)
    one = run(pipe, KDS(num_particles=1), output_type="pt", generator=seeded(4), **call)
    alone = pipe(image, num_inference_steps=3, generator=seeded(4), output_type="pt").images
    assert torch.equal(one.images, alone)
    steered = run(pipe, KDS(num_particles=n, bandwidth="auto", strength=0.5), output_type="pt",
                  return_particles=True, max_batch_size=2, generator=seeded(4), **call)
    assert steered.particles.shape == (2, n, 3, 16, 24) and steered.particle_images.shape == (2, n, 3, 12, 20)
    assert (steered.latents - off.latents).abs().max() > 1e-3
    pil = run(pipe, KDS(num_particles=n), image=PIL.Image.new("RGB", (3, 2)), num_inference_steps=2)
    assert pil.images[0].size == (12, 8)
