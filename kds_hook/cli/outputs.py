"""Output files: their names, the checks made before anything runs, and safe writing.

Before the model is loaded every output is checked: a format PIL can write that holds the result, a place that
can be written, no existing file unless ``--overwrite``, never an input, no two outputs with one name. Writing
then never replaces a file without ``--overwrite`` (not even one that appeared while the model ran) and leaves
no half-written file behind.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

from .errors import EXIT_RUN_FAILED, CommandError
from .images import Input, has_alpha


class Output(NamedTuple):
    path: Path
    particles: List[Path]  # filled only with --save-particles
    image_format: str  # PIL's format name, from the extension
    save_options: dict  # PIL save keywords (quality, colour profile)


def output_paths(sources: Sequence[Path], output: Path, suffix: str, from_directory: bool = False) -> List[Path]:
    """One input file: OUTPUT itself, unless it is an existing directory; several inputs, or inputs from a
    directory (``from_directory``): OUTPUT is a directory, holding STEM{suffix}.png for each."""
    as_directory = len(sources) > 1 or from_directory or output.is_dir() or str(output).endswith(("/", os.sep))
    if not as_directory:
        return [output]
    if output.exists() and not output.is_dir():
        given = f"{len(sources)} inputs" if len(sources) > 1 else "the images of an input directory"
        raise CommandError(f"output {output} is a file; give a directory for {given}")
    return [output / f"{source.stem}{suffix}.png" for source in sources]


def check_outputs(paths: Sequence[Path], inputs: Sequence[Input], protected: Sequence[Path],
                  args: argparse.Namespace) -> List[Output]:
    """The outputs, after checking that each can be written and none would replace a file it must not:
    an existing file without ``--overwrite``, an input (``protected``) even with it, or another output."""
    from PIL import Image

    outputs, claimed = [], {}
    for path, item in zip(paths, inputs):
        image_format = Image.registered_extensions().get(path.suffix.lower())
        if image_format is None or image_format not in Image.SAVE:
            raise CommandError(f"output {path}: {path.suffix!r} is not an image format PIL can write; "
                               "use .png, .jpg, .webp, ...")
        save_options = _save_options(image_format, item.icc_profile)
        _check_format_holds(path, image_format, item.output_mode, save_options)
        width = len(str(args.particles - 1))
        particles = [
            path.with_name(f"{path.stem}_particle{k:0{width}d}{path.suffix}") for k in range(args.particles)
        ] if args.save_particles else []
        for target in [path] + particles:
            key = os.path.normcase(os.path.abspath(target))
            if key in claimed:
                raise CommandError(f"two outputs would be written to {target}; rename an input or run them separately")
            claimed[key] = target
            if target.is_dir():
                raise CommandError(f"output {target} is a directory")
            if target.exists():
                if any(p.exists() and os.path.samefile(target, p) for p in protected):
                    raise CommandError(f"output {target} is one of the inputs; write the result elsewhere")
                if not args.overwrite:
                    raise CommandError(f"output {target} exists; pass --overwrite to replace it")
        _check_can_create(path)
        outputs.append(Output(path, particles, image_format, save_options))
    return outputs


def _save_options(image_format: str, icc_profile: Optional[bytes]) -> dict:
    options = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}  # PIL's default 75 is visibly lossy
    if icc_profile:
        options["icc_profile"] = icc_profile
    return options


def _check_format_holds(path: Path, image_format: str, mode: str, save_options: dict) -> None:
    from PIL import Image

    # The format's own writer decides, on a 1x1 image of the result's mode written to memory. Some writers drop
    # alpha without a word (PPM), so with alpha the image is read back too.
    buffer = io.BytesIO()
    try:
        Image.new(mode, (1, 1)).save(buffer, format=image_format, **save_options)
        holds = "A" not in mode or has_alpha(Image.open(io.BytesIO(buffer.getvalue())))
    except Exception:  # noqa: BLE001 - each PIL writer and reader fails in its own way (OSError, KeyError, ...)
        holds = False
    if not holds:
        what = "the input's alpha channel" if "A" in mode else f"{mode} images"
        raise CommandError(f"output {path}: {image_format} cannot store {what}; use .png")


def _check_can_create(path: Path) -> None:
    directory = Path(os.path.abspath(path)).parent
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"cannot write {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {path}: no permission to write in {existing}")


def save(image, output: Output, path: Path, overwrite: bool) -> None:
    """Writes ``image`` to ``path`` whole or not at all. Without ``overwrite`` the file is created exclusively,
    so a file that appeared since the checks is kept; with it, a temporary file replaces the old one only once
    it is complete."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            temporary = path.with_name(f".{path.name}.kds-hook-{os.getpid()}.tmp")
            try:
                image.save(temporary, format=output.image_format, **output.save_options)
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
            return
        try:
            handle = open(path, "xb")
        except FileExistsError:
            raise CommandError(f"output {path} appeared while the command ran; kept it "
                               "(pass --overwrite to replace it)", EXIT_RUN_FAILED) from None
        try:
            with handle:
                image.save(handle, format=output.image_format, **output.save_options)
        except BaseException:
            path.unlink(missing_ok=True)  # ours, and incomplete
            raise
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error}", EXIT_RUN_FAILED) from None
