"""The command line as a person meets it: a light ``--help``, one-line usage errors with a hint, every default in
``--help``, missing extras named with their ``pip install`` line, directories as inputs, and progress that reads
well on a terminal and in a log."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
from cli_helpers import FAST, assert_one_line_error, cli, write_image  # noqa: E402

from kds_hook.cli import build_parser, main  # noqa: E402
from kds_hook.cli.progress import PlainSteps  # noqa: E402


def test_help_and_usage_errors_import_neither_torch_nor_the_extras():
    script = """
import contextlib, io, json, sys
import kds_hook
imported = {"import kds_hook": "torch" in sys.modules}
from kds_hook.cli import main
for argv in (["--help"], ["upscale", "--help"], ["inpaint", "--help"], ["demo", "--help"], [], ["upscale"],
             ["upscale", "a.png", "-o", "b.png", "--particles", "many"], ["upscal"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
heavy = ("torch", "numpy", "PIL", "diffusers", "transformers", "huggingface_hub", "matplotlib", "tqdm")
after = sorted(module for module in heavy if module in sys.modules)
print(json.dumps({"import kds_hook": imported["import kds_hook"], "after": after}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"import kds_hook": False, "after": []}
    # ... while the names are there when asked for.
    import kds_hook

    assert kds_hook.KDS.__module__ == "kds_hook.kds" and set(kds_hook.__all__) <= set(dir(kds_hook))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kds_hook.nothing  # noqa: B018


@pytest.mark.parametrize(
    "argv, message, hint",
    [
        (["upscale", "a.png", "-o", "b.png", "--particles", "many"], "argument --particles: invalid int value: 'many'",
         "kds-hook upscale --help"),
        (["upscale", "a.png"], "the following arguments are required: -o/--output", "kds-hook upscale --help"),
        (["inpaint", "a.png", "-o", "b.png", "--sampler", "plms"], "argument --sampler: invalid choice: 'plms'",
         "kds-hook inpaint --help"),
        (["upscal"], "argument COMMAND: invalid choice: 'upscal'", "kds-hook --help"),
        ([], "the following arguments are required: COMMAND", "kds-hook --help"),
    ],
)
def test_usage_errors_are_one_line_with_a_hint(capsys, argv, message, hint):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "usage:" not in err, err  # one line, not the whole usage
    assert err.startswith(f"kds-hook: error: {message}") and err.rstrip().endswith(f"(try '{hint}')"), err


def test_help_shows_every_default():
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices  # argparse's sub-parsers
    for name, parser in commands.items():
        # One block per option: its line and the indented lines of its help below it.
        blocks = re.split(r"\n(?=  -)", parser.format_help())
        for action in parser._actions:
            # Positionals and required options have no default; flags (--help, --no-kds, ...) are off unless given.
            if not action.option_strings or action.required or action.nargs == 0:
                continue
            block = next(b for b in blocks if b.lstrip().startswith(action.option_strings[0]))
            assert "default" in " ".join(block.split()), f"kds-hook {name}: {block}"
    text = " ".join(commands["upscale"].format_help().split())
    assert "--sampler {ddim,dpmpp,euler} ddim, dpmpp (DPM-Solver++) or euler (default ddim)" in text
    assert "--device {auto,cpu,cuda,mps} auto: cuda, else mps, else cpu (default auto)" in text
    assert text.count("(default 0.3)") == 3 and text.count("default") == 13  # each option's default, once


@pytest.mark.parametrize(
    "command, blocked, named, extra",
    [
        (["upscale", "a.png", "-o", "b.png"], ["PIL", "diffusers"], "pillow, diffusers", "diffusers"),
        (["inpaint", "a.png", "m.png", "-o", "b.png"], ["transformers"], "transformers", "diffusers"),
        (["demo", "--quick"], ["matplotlib"], "matplotlib", "demo"),
    ],
)
def test_a_missing_extra_is_named_with_its_pip_line(capsys, monkeypatch, tmp_path, command, blocked, named, extra):
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module that cannot be imported
    monkeypatch.chdir(tmp_path)  # the demo would write ./kds-demo
    code = main(command)
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, f"kds-hook {command[0]} needs {named}", f"pip install 'kds-hook[{extra}]'")
    assert out == "" and list(tmp_path.iterdir()) == []  # checked before anything runs


def test_a_directory_input_gives_its_images_sorted_with_plain_progress_in_a_log(capsys, tmp_path, sr_dir):
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("b.png", "a.JPG", "c.webp"):
        write_image(shots / name, 4, 4)
    (shots / "notes.txt").write_text("not an image")
    (shots / ".hidden.png").write_bytes(b"hidden files are skipped")
    (shots / "deeper").mkdir()
    write_image(shots / "deeper" / "d.png", 4, 4)  # not searched
    code, out, err = cli(capsys, "upscale", shots, "-o", tmp_path / "out", "--model", sr_dir, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_upscaled.png", "b_upscaled.png", "c_upscaled.png"]
    assert re.findall(r"^upscaled \S+/(\w)\.\w+ ->", out, flags=re.M) == ["a", "b", "c"]  # in sorted order
    # capsys's stderr is not a terminal: plain lines, no bars, carriage returns or escape codes.
    assert "\r" not in err and "\x1b" not in err
    assert err.splitlines() == [f"kds-hook: found 3 images in {shots}"] + [
        f"image {k}/3, step {step}/2 ({shots / name})"
        for k, name in enumerate(["a.JPG", "b.png", "c.webp"], start=1) for step in (1, 2)]

    # A directory with one image still writes into OUTPUT as a directory; the line says "1 image".
    single = tmp_path / "single"
    single.mkdir()
    write_image(single / "only.png", 4, 4)
    code, _, err = cli(capsys, "upscale", single, "-o", tmp_path / "out1", "--model", sr_dir, *FAST)
    assert code == 0 and f"found 1 image in {single}" in err
    assert [p.name for p in (tmp_path / "out1").iterdir()] == ["only_upscaled.png"]


def test_a_directory_without_images_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    (empty / "sub").mkdir()
    write_image(empty / "sub" / "in.png", 4, 4)
    code, _, err = cli(capsys, "upscale", empty, "-o", tmp_path / "out", "--model", tmp_path / "no-model")
    assert_one_line_error(code, err, f"input directory {empty} holds no images", ".png", "subdirectories")
    assert not (tmp_path / "out").exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_and_one_particle_reads_singular(capsys, monkeypatch, tmp_path, sr_dir):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    source = write_image(tmp_path / "in.png", 4, 4)
    code, out, _ = cli(capsys, "upscale", source, "-o", tmp_path / "out.png", "--model", sr_dir, "--steps", "2",
                       "--particles", "1", "--seed", "0")
    bars = terminal.getvalue()
    assert code == 0, bars
    assert "\r" in bars and "images" in bars and "steps" in bars  # tqdm's bars, redrawn in place
    assert "image 1/1, step" not in bars  # ... instead of the plain lines
    assert re.search(r": KDS, 1 particle, selected particle 0, seed 0$", out.strip()), out


@pytest.mark.parametrize("total, reported", [(50, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]), (3, [1, 2, 3])])
def test_plain_step_lines_come_at_each_tenth_of_the_run(total, reported):
    seen = []
    with PlainSteps(lambda done, all_steps: seen.append((done, all_steps)), total=total) as steps:
        for _ in range(total):
            steps.update()
    assert seen == [(done, total) for done in reported]
    seen.clear()
    assert list(PlainSteps(lambda done, all_steps: seen.append((done, all_steps)), iterable=range(total))) == list(
        range(total))
    assert seen == [(done, total) for done in reported]
