"""Helpers shared by the command-line tests (tests/test_cli*.py): image files, and ``kds-hook`` run in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kds_hook.cli import main

FAST = ["--steps", "2", "--particles", "2", "--seed", "3"]
CPU = ["--device", "cpu"]


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


def cli(capsys, *argv) -> tuple:
    """(exit code, stdout, stderr) of ``kds-hook ARGV`` run in-process, on the CPU unless ARGV names a device (the
    comparisons with the plain pipeline are exact in float32 on the CPU; --device auto would pick a GPU)."""
    argv = [str(a) for a in argv]
    code = main(argv if "--device" in argv else argv + ["--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("kds-hook: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
