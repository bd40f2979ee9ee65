"""``kds-hook upscale`` / ``kds-hook inpaint`` driven through the real CLI with tiny random-weight pipelines.

The pipelines are saved with ``save_pretrained`` into temp directories (the fixtures ``sr_dir`` and ``inpaint_dir``
in conftest.py) and loaded by the CLI with ``--model DIR``.
Outputs are compared exactly with the plain diffusers pipeline where the math makes them equal (one particle;
``--no-kds`` particles), and every error case is checked for its message, its exit code and for writing nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from cli_helpers import CPU, FAST, assert_one_line_error, cli, pixels, write_image  # noqa: E402

from kds_hook.cli.inpaint import DEFAULT_INPAINT_MODEL  # noqa: E402


def plain_ldm_sr(model: Path, image: Path, seed: int, rows: int = 1) -> list:
    """The unpatched pipeline on ``image`` repeated ``rows`` times, noise from one seeded CPU generator."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
        LDMSuperResolutionPipeline,
    )

    pipe = LDMSuperResolutionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    low_res = torch.from_numpy(pixels(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(low_res.repeat(rows, 1, 1, 1), num_inference_steps=2, eta=0.0, generator=generator)
    return [np.asarray(im) for im in out.images]


# ---------------------------------------------------------------------------------------------------- upscale


@pytest.mark.parametrize(
    "width, height, mode",
    [(13, 10, "RGB"), (9, 7, "L"), (10, 6, "RGBA"), (5, 3, "LA")],  # none a multiple of the tiny UNet's 4
)
def test_upscale_output_is_exactly_4x_in_the_input_mode(capsys, tmp_path, sr_dir, width, height, mode):
    source = write_image(tmp_path / "in.png", width, height, mode)
    out = tmp_path / "out.png"
    code, stdout, _ = cli(capsys, "upscale", source, "-o", out, "--model", sr_dir, *FAST)
    assert code == 0
    with Image.open(out) as result:
        assert result.size == (4 * width, 4 * height)
        assert result.mode == mode
        if "A" in mode:  # alpha is not restored by the model: it is the input's alpha, Lanczos-resized
            with Image.open(source) as original:
                expected = original.getchannel("A").resize(result.size, Image.LANCZOS)
            assert np.array_equal(np.asarray(result.getchannel("A")), np.asarray(expected))
    # One summary line: sizes, time, particles, the selected particle, the seed to repeat the run.
    assert re.fullmatch(rf"upscaled {re.escape(str(source))} -> {re.escape(str(out))} \({width}x{height} -> "
                        rf"{4 * width}x{4 * height}\) in \d+\.\d s: KDS, 2 particles, selected particle [01], seed 3\n",
                        stdout), stdout


def test_one_particle_is_bit_identical_to_the_plain_pipeline(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 8, 8)  # a multiple of 4: no padding, so the plain pipeline takes it
    out = tmp_path / "out.png"
    code, _, _ = cli(capsys, "upscale", source, "-o", out, "--model", sr_dir, "--steps", "2", "--particles", "1",
                     "--seed", "11")
    assert code == 0
    assert np.array_equal(pixels(out), plain_ldm_sr(sr_dir, source, seed=11)[0])


def test_no_kds_gives_the_plain_particles_and_differs_from_kds(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 8, 8)
    # Random weights scatter the particles' x0 far beyond h = 0.3, where steering barely moves them; the median
    # heuristic's bandwidth moves them visibly.
    common = ["--model", sr_dir, "--steps", "2", "--particles", "3", "--seed", "5", "--save-particles",
              "--bandwidth", "auto"]
    code, plain_stdout, _ = cli(capsys, "upscale", source, "-o", tmp_path / "plain.png", "--no-kds", *common)
    assert code == 0 and "plain (no KDS)" in plain_stdout
    code, kds_stdout, _ = cli(capsys, "upscale", source, "-o", tmp_path / "kds.png", *common)
    assert code == 0 and ": KDS, " in kds_stdout

    # --no-kds: the N particles are the unpatched pipeline's, from the same seeded noise as the KDS run.
    expected = plain_ldm_sr(sr_dir, source, seed=5, rows=3)
    for k in range(3):
        assert np.array_equal(pixels(tmp_path / f"plain_particle{k}.png"), expected[k])
        assert not np.array_equal(pixels(tmp_path / f"kds_particle{k}.png"), expected[k])
    # The output is the particle the summary names, in both runs.
    for name, stdout in (("plain", plain_stdout), ("kds", kds_stdout)):
        index = int(stdout.split("selected particle ")[1].split(",")[0])
        assert np.array_equal(pixels(tmp_path / f"{name}.png"), pixels(tmp_path / f"{name}_particle{index}.png"))
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "kds.png"))


def test_same_seed_same_output_other_seed_other_output(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 6, 5)
    args = ["--model", sr_dir, "--steps", "2", "--particles", "2"]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert cli(capsys, "upscale", source, "-o", tmp_path / f"{name}.png", "--seed", seed, *args)[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_several_inputs_go_to_a_directory(capsys, tmp_path, sr_dir):
    sources = [write_image(tmp_path / "x.png", 4, 4), write_image(tmp_path / "y.jpg", 6, 4, seed=1)]
    Image.open(sources[1]).save(sources[1], icc_profile=b"a colour profile")
    out = tmp_path / "results"
    code, stdout, _ = cli(capsys, "upscale", *sources, "-o", out, "--model", sr_dir, *FAST,
                          "--sampler", "dpmpp", "--max-batch-size", "1")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["x_upscaled.png", "y_upscaled.png"]
    assert Image.open(out / "y_upscaled.png").size == (24, 16)
    assert Image.open(out / "y_upscaled.png").info.get("icc_profile") == b"a colour profile"  # colours kept
    assert stdout.count("selected particle") == 2


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(capsys, tmp_path, sr_dir):
    levels = np.random.default_rng(4).integers(0, 256, (6, 7), dtype=np.uint16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit PNG: PIL opens it as I;16
    Image.fromarray(levels.astype(np.uint8), "L").save(tmp_path / "flat.png")
    for name in ("deep", "flat"):
        assert cli(capsys, "upscale", tmp_path / f"{name}.png", "-o", tmp_path / f"{name}_x4.png", "--model", sr_dir,
                   *FAST)[0] == 0
    # PIL's own conversion would clip every level above 255 to white: the model would see a blank image.
    assert np.array_equal(pixels(tmp_path / "deep_x4.png"), pixels(tmp_path / "flat_x4.png"))
    assert Image.open(tmp_path / "deep_x4.png").mode == "L"


def test_bfloat16_and_max_batch_size(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 5, 7)
    common = ["--model", sr_dir, "--steps", "2", "--particles", "3", "--seed", "2", "--bandwidth", "auto"]
    # The pipeline's own PIL conversion cannot take bfloat16; the command converts the images itself.
    code, stdout, _ = cli(capsys, "upscale", source, "-o", tmp_path / "bf16.png", *common, "--dtype", "bfloat16")
    assert code == 0 and Image.open(tmp_path / "bf16.png").size == (20, 28)

    outputs = {}
    for name, extra in (("whole", []), ("chunked", ["--max-batch-size", "1"]), ("plain", ["--no-kds"])):
        code, stdout, _ = cli(capsys, "upscale", source, "-o", tmp_path / f"{name}.png", *common, *extra)
        assert code == 0
        outputs[name] = (pixels(tmp_path / f"{name}.png").astype(int), stdout.split("selected particle ")[1][0])
    # One particle per UNet call gives the same run, up to float rounding of differently batched convolutions.
    assert outputs["whole"][1] == outputs["chunked"][1]
    tolerance = 2  # levels of 255
    assert np.abs(outputs["whole"][0] - outputs["chunked"][0]).max() <= tolerance
    # Chunks that lost the ensemble (each particle steered alone, or not at all) would give the plain run, which
    # lies far outside that tolerance.
    assert np.abs(outputs["whole"][0] - outputs["plain"][0]).max() > 10 * tolerance


def test_euler_scales_the_noisy_latent_but_not_the_low_res_image(sr_dir):
    from diffusers import EulerDiscreteScheduler

    from kds_hook.cli.sampling import scale_latent_channels_only

    reference = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    scheduler = EulerDiscreteScheduler.from_config(reference.config)
    for sched in (reference, scheduler):
        sched.set_timesteps(4)
    scale_latent_channels_only(scheduler, 3)
    sample = torch.randn(2, 6, 4, 4)
    t = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(sample, t)
    assert torch.equal(scaled[:, :3], reference.scale_model_input(sample[:, :3], t))
    assert not torch.equal(scaled[:, :3], sample[:, :3])  # sigma is large at the first step
    assert torch.equal(scaled[:, 3:], sample[:, 3:])  # the conditioning image goes to the UNet as it is


def test_the_command_runs_as_a_program(tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 7, 5)
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "kds_hook.cli", "upscale", str(source), "-o", str(out), "--model", str(sr_dir),
         "--sampler", "euler", *FAST, *CPU],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (28, 20)
    # stderr is a pipe, not a terminal: plain progress lines over the image and its steps, no bars.
    assert f"image 1/1, step 2/2 ({source})" in proc.stderr.splitlines()
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert "upscaled" in proc.stdout and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------- inpaint


def test_inpaint_keeps_the_size_and_alpha_and_kds_changes_the_result(capsys, tmp_path, inpaint_dir):
    image = write_image(tmp_path / "photo.png", 13, 10, "RGBA")  # not a multiple of 8: padded, then cropped
    mask = Image.new("L", (13, 10), 0)
    mask.paste(255, (3, 2, 10, 8))
    mask.save(tmp_path / "mask.png")
    common = ["--model", inpaint_dir, "--prompt", "a red square", "--bandwidth", "auto", *FAST]
    runs = {"kds": [], "kds-again": [], "plain": ["--no-kds"]}
    for name, extra in runs.items():
        code, stdout, _ = cli(capsys, "inpaint", image, tmp_path / "mask.png", "-o", tmp_path / f"{name}.png",
                              *common, *extra)
        assert code == 0 and "selected particle" in stdout
    with Image.open(tmp_path / "kds.png") as result:
        assert result.size == (13, 10) and result.mode == "RGBA"
        assert np.array_equal(np.asarray(result.getchannel("A")), pixels(image)[..., 3])
    assert np.array_equal(pixels(tmp_path / "kds.png"), pixels(tmp_path / "kds-again.png"))
    assert not np.array_equal(pixels(tmp_path / "kds.png"), pixels(tmp_path / "plain.png"))


def test_inpaint_into_an_existing_directory(capsys, tmp_path, inpaint_dir):
    image = write_image(tmp_path / "photo.png", 8, 8, "L")
    write_image(tmp_path / "mask.png", 8, 8, "L", seed=2)
    (tmp_path / "out").mkdir()
    code, _, _ = cli(capsys, "inpaint", image, tmp_path / "mask.png", "-o", tmp_path / "out", "--model",
                     inpaint_dir, *FAST, "--save-particles")
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["photo_inpainted.png", "photo_inpainted_particle0.png", "photo_inpainted_particle1.png"]
    assert Image.open(tmp_path / "out" / "photo_inpainted.png").mode == "L"


def test_inpaint_warns_when_the_safety_checker_blanks_the_result(capsys, tmp_path, inpaint_dir, monkeypatch):
    import dataclasses

    import kds_hook.diffusers.pipeline as pipeline

    run = pipeline.run
    # The tiny pipeline has no safety checker; stand in for one that flags the selected image.
    flagging = lambda *a, **k: dataclasses.replace(run(*a, **k), nsfw_content_detected=[True])  # noqa: E731
    monkeypatch.setattr(pipeline, "run", flagging)
    image = write_image(tmp_path / "photo.png", 8, 8)
    mask = write_image(tmp_path / "mask.png", 8, 8, "L")
    code, stdout, err = cli(capsys, "inpaint", image, mask, "-o", tmp_path / "out.png", "--model", inpaint_dir, *FAST)
    assert code == 0 and "selected particle" in stdout
    assert "warning: the model's safety checker flagged" in err and "out.png" in err


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_input_writes_nothing(capsys, tmp_path, sr_dir):
    present = write_image(tmp_path / "a.png", 4, 4)
    code, _, err = cli(capsys, "upscale", present, tmp_path / "gone.png", "-o", tmp_path / "out", "--model", sr_dir)
    assert_one_line_error(code, err, "gone.png", "does not exist")
    assert not (tmp_path / "out").exists()


def test_non_image_input(capsys, tmp_path, sr_dir):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    code, _, err = cli(capsys, "upscale", fake, "-o", tmp_path / "out.png", "--model", sr_dir)
    assert_one_line_error(code, err, "notes.png", "not a readable image")
    assert not (tmp_path / "out.png").exists()


def test_existing_output_is_kept_unless_overwrite(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    code, _, err = cli(capsys, "upscale", source, "-o", out, "--model", sr_dir, *FAST)
    assert_one_line_error(code, err, "out.png", "exists", "--overwrite")
    assert out.read_bytes() == b"precious"

    # A particle file in the way blocks the run too, before the main output is written.
    fresh = tmp_path / "fresh.png"
    (tmp_path / "fresh_particle1.png").write_bytes(b"also precious")
    code, _, err = cli(capsys, "upscale", source, "-o", fresh, "--model", sr_dir, *FAST, "--save-particles")
    assert_one_line_error(code, err, "fresh_particle1.png", "exists")
    assert not fresh.exists() and (tmp_path / "fresh_particle1.png").read_bytes() == b"also precious"

    assert cli(capsys, "upscale", source, "-o", out, "--model", sr_dir, *FAST, "--overwrite")[0] == 0
    assert Image.open(out).size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh_particle1.png", "in.png", "out.png"]  # no temp file


def test_outputs_are_checked_for_every_input_before_the_model_is_loaded(capsys, tmp_path):
    first, second = write_image(tmp_path / "a.png", 4, 4), write_image(tmp_path / "b.png", 4, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_upscaled.png").write_bytes(b"earlier result")
    # The model does not exist: the output of the *second* input is what stops the run, before any loading, and
    # the first input's output is not written either.
    code, _, err = cli(capsys, "upscale", first, second, "-o", out, "--model", tmp_path / "no-model")
    assert_one_line_error(code, err, "b_upscaled.png", "exists")
    assert [p.name for p in out.iterdir()] == ["b_upscaled.png"]
    assert (out / "b_upscaled.png").read_bytes() == b"earlier result"


def test_an_input_is_never_overwritten(capsys, tmp_path, sr_dir, inpaint_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    original = source.read_bytes()
    code, _, err = cli(capsys, "upscale", source, "-o", source, "--model", sr_dir, *FAST, "--overwrite")
    assert_one_line_error(code, err, "in.png", "one of the inputs")
    mask = write_image(tmp_path / "mask.png", 4, 4, "L")
    code, _, err = cli(capsys, "inpaint", source, mask, "-o", mask, "--model", inpaint_dir, *FAST, "--overwrite")
    assert_one_line_error(code, err, "mask.png", "one of the inputs")
    assert source.read_bytes() == original and Image.open(mask).size == (4, 4)


def test_a_file_that_appears_during_the_run_is_kept(capsys, tmp_path, sr_dir, monkeypatch):
    import kds_hook.cli.models as models

    source = write_image(tmp_path / "in.png", 4, 4)
    out = tmp_path / "out.png"
    load = models.load_pipeline

    def load_while_someone_writes_the_output(*args, **kwargs):
        pipe = load(*args, **kwargs)
        out.write_bytes(b"written meanwhile")  # after the up-front checks, before our write
        return pipe

    monkeypatch.setattr(models, "load_pipeline", load_while_someone_writes_the_output)
    code, _, err = cli(capsys, "upscale", source, "-o", out, "--model", sr_dir, *FAST)
    assert code == 1 and "appeared" in err and "Traceback" not in err
    assert out.read_bytes() == b"written meanwhile"


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--bandwidth", "-1", "--bandwidth"),
        ("--bandwidth", "nan", "--bandwidth"),
        ("--strength", "1.5", "--strength"),
        ("--particles", "0", "--particles"),
        ("--patch-size", "0", "--patch-size"),
        ("--steps", "0", "--steps"),
        ("--max-batch-size", "0", "--max-batch-size"),
        ("--threshold", "1.5", "--threshold"),
        ("--threshold", "nan", "--threshold"),
        ("--eta", "-1", "--eta"),
        ("--seed", "-1", "--seed"),
    ],
)
def test_bad_kds_values_are_rejected_before_loading(capsys, tmp_path, option, value, named):
    source = write_image(tmp_path / "in.png", 4, 4)
    # The model does not exist either: the settings are checked first, so that is not what gets reported.
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", tmp_path / "none", option,
                       value)
    assert_one_line_error(code, err, named)
    assert not any(name in err for name in ("num_particles", "patch_size"))  # the option, not the library's name
    assert not (tmp_path / "out.png").exists()


def test_mask_size_mismatch(capsys, tmp_path, inpaint_dir):
    image = write_image(tmp_path / "photo.png", 8, 8)
    mask = write_image(tmp_path / "mask.png", 8, 16, "L")
    code, _, err = cli(capsys, "inpaint", image, mask, "-o", tmp_path / "out.png", "--model", inpaint_dir)
    assert_one_line_error(code, err, "8x16", "8x8", "same size")
    assert not (tmp_path / "out.png").exists()


def test_directory_without_a_pipeline_or_its_weights(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", empty)
    assert_one_line_error(code, err, "model_index.json")

    broken = tmp_path / "broken"
    shutil.copytree(sr_dir, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", broken)
    assert_one_line_error(code, err, "cannot load LDMSuperResolutionPipeline", str(broken))
    assert not (tmp_path / "out.png").exists()


def test_model_that_is_no_pipeline_of_the_right_kind(capsys, tmp_path, sr_dir, inpaint_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    mask = write_image(tmp_path / "mask.png", 4, 4, "L")
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", inpaint_dir)
    assert_one_line_error(code, err, "StableDiffusionInpaintPipeline", "needs a LDMSuperResolutionPipeline")
    code, _, err = cli(capsys, "inpaint", source, mask, "-o", tmp_path / "out.png", "--model", sr_dir)
    assert_one_line_error(code, err, "LDMSuperResolutionPipeline", "StableDiffusionInpaintPipeline")
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", sr_dir / "model_index.json")
    assert_one_line_error(code, err, "is a file")
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", "not a hub id!")
    assert_one_line_error(code, err, "neither a directory nor a valid hub id")
    assert not (tmp_path / "out.png").exists()


def test_uncached_hub_id_offline_in_process(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = write_image(tmp_path / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", "someone/not-cached")
    assert_one_line_error(code, err, "someone/not-cached", "not in the local Hugging Face cache",
                          "hf download someone/not-cached", "--model")
    assert not (tmp_path / "out.png").exists()


def test_uncached_default_model_without_network_as_a_program(tmp_path):
    image = write_image(tmp_path / "photo.png", 8, 8)
    mask = write_image(tmp_path / "mask.png", 8, 8, "L")
    # Not HF_HUB_OFFLINE: a hub that cannot be reached, as on a machine without network (port 9 refuses at once).
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("HF_") and "proxy" not in key.lower()}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kds_hook.cli", "inpaint", str(image), str(mask), "-o", str(tmp_path / "out.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, DEFAULT_INPAINT_MODEL, "cannot be reached",
                          f"hf download {DEFAULT_INPAINT_MODEL}", "--model")
    assert not (tmp_path / "out.png").exists()


def test_unusable_output_names(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.xyz", "--model", sr_dir)
    assert_one_line_error(code, err, ".xyz")
    rgba = write_image(tmp_path / "alpha.png", 4, 4, "RGBA")
    for extension in (".jpg", ".ppm"):  # PIL's PPM writer would drop the alpha channel without a word
        code, _, err = cli(capsys, "upscale", rgba, "-o", tmp_path / f"out{extension}", "--model", sr_dir)
        assert_one_line_error(code, err, "alpha")
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "in.png" / "out.png", "--model", sr_dir)
    assert_one_line_error(code, err, "not a directory")
    (tmp_path / "file").write_bytes(b"x")
    code, _, err = cli(capsys, "upscale", source, rgba, "-o", tmp_path / "file", "--model", sr_dir)
    assert_one_line_error(code, err, "is a file")
    twin = tmp_path / "twin"
    twin.mkdir()
    write_image(twin / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, twin / "in.png", "-o", tmp_path / "out", "--model", sr_dir)
    assert_one_line_error(code, err, "in_upscaled.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.png", "file", "in.png", "twin"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(capsys, tmp_path, sr_dir):
    source = write_image(tmp_path / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", sr_dir, "--device", "cuda")
    assert_one_line_error(code, err, "cuda")


def test_an_unexpected_error_is_one_line_too(capsys, tmp_path, sr_dir, monkeypatch):
    import kds_hook.cli.errors as errors
    import kds_hook.cli.sampling as sampling

    def broken(*args, **kwargs):
        raise TypeError("something we did not foresee")

    monkeypatch.setattr(sampling, "set_sampler", broken)
    source = write_image(tmp_path / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", sr_dir, *FAST)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "unexpected TypeError: something we did not foresee" in err and errors.TRACEBACK_VARIABLE in err
    assert not (tmp_path / "out.png").exists()


def test_help_does_not_import_diffusers():
    code = (
        "import sys, kds_hook, kds_hook.cli; kds_hook.cli.build_parser();"
        "print(sorted(m for m in ('diffusers', 'transformers', 'PIL', 'huggingface_hub', 'torch', 'numpy') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_padding_mirrors_the_border_instead_of_adding_black():
    from kds_hook.cli.images import pad_to_multiple

    padded = pad_to_multiple(np.arange(6).reshape(2, 3, 1), 4)
    assert padded[..., 0].tolist() == [[0, 1, 2, 1], [3, 4, 5, 4], [0, 1, 2, 1], [3, 4, 5, 4]]
    one_pixel = pad_to_multiple(np.full((1, 1, 3), 7, dtype=np.uint8), 4)
    assert one_pixel.shape == (4, 4, 3) and (one_pixel == 7).all()


def test_samplers_are_built_from_the_pipeline_config():
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    from kds_hook.cli.sampling import set_sampler

    # Stable Diffusion checkpoints ship a PNDM config that does not mention clip_sample; DDIM's default (clip x0
    # to [-1, 1]) would damage latents.
    pipe = SimpleNamespace(scheduler=PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1))
    set_sampler(pipe, "ddim")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    set_sampler(pipe, "dpmpp")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    set_sampler(pipe, "euler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
