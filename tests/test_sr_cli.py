"""``kds-hook upscale --model builtin``: the shipped model through the real command line, offline.

Inputs are a few pixels and runs 2 steps, so each call is about a second on one thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from cli_helpers import assert_one_line_error, cli, pixels, write_image  # noqa: E402
from kds_hook import KDS  # noqa: E402
from kds_hook.cli import main  # noqa: E402
from kds_hook.cli.upscale import BUILTIN_PARTICLES, BUILTIN_STEPS, DEFAULT_UPSCALE_MODEL  # noqa: E402
from kds_hook.sr import builtin_path, load_builtin  # noqa: E402

FAST = ["--steps", "2", "--particles", "2", "--seed", "3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("width,height,mode", [(5, 3, "RGB"), (4, 4, "L")])
def test_builtin_upscales_any_size_offline(capsys, tmp_path, monkeypatch, width, height, mode):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = write_image(tmp_path / "in.png", width, height, mode)
    out = tmp_path / "out.png"
    code, stdout, err = cli(capsys, "upscale", source, "-o", out, "--model", "builtin", *FAST)
    assert code == 0, err
    with Image.open(out) as result:
        assert result.size == (4 * width, 4 * height) and result.mode == mode
    assert "2 particles" in stdout and "seed 3" in stdout


def test_builtin_no_kds_is_the_plain_pipeline_and_kds_differs(capsys, tmp_path):
    source = write_image(tmp_path / "in.png", 4, 3)
    common = ["--model", "builtin", "--bandwidth", "auto", "--strength", "0.5", *FAST]
    assert cli(capsys, "upscale", source, "-o", tmp_path / "plain.png", "--no-kds", *common)[0] == 0
    assert cli(capsys, "upscale", source, "-o", tmp_path / "kds.png", *common)[0] == 0
    # the plain pipeline on the input repeated twice, noise from one CPU generator with the seed, Eq. 9 selection
    pipe = load_builtin()
    low_res = torch.from_numpy(pixels(source)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    particles = pipe(low_res.repeat(2, 1, 1, 1), num_inference_steps=2,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    chosen = KDS(num_particles=2).select(particles).sample
    image = (pipe.decoder.decode(chosen[..., :12, :16], pipe.upsample(low_res)) + 1) / 2  # the padding cropped
    expected = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(pixels(tmp_path / "plain.png"), expected)
    assert not np.array_equal(pixels(tmp_path / "kds.png"), expected)


def test_builtin_defaults_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'builtin'" in text and f"{BUILTIN_STEPS} with --model builtin" in text
    assert f"{BUILTIN_PARTICLES} with --model builtin" in text and "about a minute on 2 CPU cores" in text


def test_offline_default_model_points_to_builtin(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = write_image(tmp_path / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png")
    assert_one_line_error(code, err, DEFAULT_UPSCALE_MODEL, "not in the local Hugging Face cache", "--model builtin")
    assert not (tmp_path / "out.png").exists()


def test_a_saved_builtin_kind_directory_and_missing_weights(capsys, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(builtin_path(), model)
    source = write_image(tmp_path / "in.png", 3, 3)
    assert cli(capsys, "upscale", source, "-o", tmp_path / "a.png", "--model", model, *FAST)[0] == 0
    assert cli(capsys, "upscale", source, "-o", tmp_path / "b.png", "--model", "builtin", *FAST)[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "c.png", "--model", model, *FAST)
    assert_one_line_error(code, err, "no super-resolution model weights", "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "c.png").exists()
