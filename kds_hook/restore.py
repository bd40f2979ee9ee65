"""``kds-hook upscale`` and ``kds-hook inpaint``: restore image files with a diffusers pipeline and KDS.

Everything the user gave is checked before any model is loaded or any file written: the numeric settings, the
inputs (they exist, are images, convert to RGB, the mask matches), the outputs (a writable image format for the
result, a writable place, none exists unless ``--overwrite``, none is an input), and the model (a local pipeline
directory of the right kind, or a hub id that is cached or can be downloaded). An error prints one line
``kds-hook: error: ...`` and exits 2 when found up front (nothing written), 1 when a model run or a write fails
(outputs of earlier images stay). Outputs are written so that an existing file is never replaced without
``--overwrite`` (not even one that appears while the model runs) and no half-written file is left behind.
diffusers, huggingface_hub and PIL are imported inside the commands so ``kds-hook --help`` and ``import kds_hook``
stay light. Reference: ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence

__all__ = [
    "DEFAULT_INPAINT_MODEL",
    "DEFAULT_UPSCALE_MODEL",
    "CommandError",
    "inpaint_command",
    "register",
    "upscale_command",
]

DEFAULT_UPSCALE_MODEL = "CompVis/ldm-super-resolution-4x-openimages"
# stabilityai/stable-diffusion-2-inpainting was taken down in 2025; this is the community mirror of its weights.
DEFAULT_INPAINT_MODEL = "sd2-community/stable-diffusion-2-inpainting"
SAMPLERS = ("ddim", "dpmpp", "euler")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2  # the same code argparse uses for usage errors
TRACEBACK_VARIABLE = "KDS_HOOK_TRACEBACK"  # set it to see the traceback of an unexpected error

# model_index.json class names each command can load (the inpainting pipeline also runs plain SD checkpoints).
_UPSCALE_PIPELINES = ("LDMSuperResolutionPipeline",)
_INPAINT_PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# PIL modes whose values mean the same after conversion to RGB or L, so the input's colour profile still applies.
_PROFILE_KEEPING_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "F")


class CommandError(Exception):
    """A problem reported as one line ``kds-hook: error: ...`` with exit code ``code`` (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def register(commands) -> None:
    """Adds the ``upscale`` and ``inpaint`` sub-commands to an argparse sub-parsers object."""
    upscale = commands.add_parser(
        "upscale",
        help="4x super-resolution of image files (LDM-SR) with KDS",
        description="Upscale images 4x with a latent-diffusion super-resolution pipeline, steered by KDS. "
        "The output is exactly 4x the input in each dimension, for any input size.",
    )
    upscale.add_argument("inputs", nargs="+", metavar="INPUT", help="input image file(s)")
    upscale.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT",
        help="output file for one input; a directory for several inputs (written as STEM_upscaled.png)",
    )
    upscale.add_argument(
        "--model", default=DEFAULT_UPSCALE_MODEL,
        help=f"hub id or local pipeline directory (default {DEFAULT_UPSCALE_MODEL})",
    )
    _add_common_options(upscale)
    upscale.set_defaults(func=_reporting_errors(upscale_command))

    inpaint = commands.add_parser(
        "inpaint",
        help="inpaint an image under a mask (Stable Diffusion inpainting) with KDS",
        description="Repaint the white part of MASK in IMAGE with a Stable Diffusion inpainting pipeline, steered "
        "by KDS. The output has the size of IMAGE.",
    )
    inpaint.add_argument("image", metavar="IMAGE", help="image file to inpaint")
    inpaint.add_argument("mask", metavar="MASK", help="mask file of the same size: white = repaint, black = keep")
    inpaint.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT",
        help="output file, or an existing directory (written as STEM_inpainted.png)",
    )
    inpaint.add_argument("--prompt", default="", help='text prompt (default "")')
    inpaint.add_argument("--negative-prompt", default=None, help="negative prompt (default none)")
    inpaint.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    inpaint.add_argument(
        "--model", default=DEFAULT_INPAINT_MODEL,
        help=f"hub id or local pipeline directory (default {DEFAULT_INPAINT_MODEL})",
    )
    _add_common_options(inpaint)
    inpaint.set_defaults(func=_reporting_errors(inpaint_command))


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    kds = parser.add_argument_group("KDS")
    kds.add_argument("--particles", type=int, default=10, help="N, particles per image (default 10)")
    kds.add_argument(
        "--bandwidth", type=_bandwidth, default=0.3, help='kernel bandwidth h, or "auto" (default 0.3)'
    )
    kds.add_argument("--patch-size", type=int, default=1, help="latent patch side (default 1)")
    kds.add_argument("--strength", type=float, default=0.3, help="steering strength delta in [0, 1] (default 0.3)")
    kds.add_argument(
        "--threshold", type=float, default=0.3, help="steer while t/T >= threshold, in [0, 1] (default 0.3)"
    )
    kds.add_argument(
        "--no-kds", action="store_true",
        help="same seed and particles without steering (strength 0); the output is chosen the same way",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim, dpmpp (DPM-Solver++) or euler")
    sampling.add_argument("--eta", type=float, default=0.0, help="DDIM eta, the same with and without KDS (default 0)")
    sampling.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    sampling.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, else mps, else cpu"
    )
    sampling.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on cuda, else float32")
    sampling.add_argument(
        "--max-batch-size", type=int, default=None,
        help="largest batch per model call (default: all particles of an image at once)",
    )
    files = parser.add_argument_group("files")
    files.add_argument(
        "--save-particles", action="store_true",
        help="also write every particle as OUTSTEM_particleK.EXT next to the output",
    )
    files.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _bandwidth(text: str):
    return text if text == "auto" else float(text)


_bandwidth.__name__ = "bandwidth"  # argparse names the type in its message: "invalid bandwidth value"


def _reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CommandError as error:
            print(f"kds-hook: error: {error}", file=sys.stderr)
            return error.code
        except KeyboardInterrupt:
            print("kds-hook: interrupted", file=sys.stderr)
            return 130  # the shell's code for SIGINT
        except Exception as error:  # noqa: BLE001 - a bug or a library failure we did not foresee: still one line
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            print(f"kds-hook: error: unexpected {type(error).__name__}: {_first_line(error)} "
                  f"(set {TRACEBACK_VARIABLE}=1 to see the traceback)", file=sys.stderr)
            return EXIT_RUN_FAILED

    run.__doc__ = command.__doc__
    return run


# ---------------------------------------------------------------------------------------------------- commands


def upscale_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook upscale`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem
    (``register`` installs it with the error reporting that turns that into a message and an exit code)."""
    kds = _build_kds(args)
    sources = [Path(p) for p in args.inputs]
    inputs = [_read_input(p, "input") for p in sources]
    outputs = _check_outputs(_output_paths(sources, Path(args.output), "_upscaled"), inputs, sources, args)
    model_sources = _model_sources(args.model, _UPSCALE_PIPELINES)
    device, dtype = _device_and_dtype(args.device, args.dtype)

    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
        LDMSuperResolutionPipeline,
    )

    pipe = _load_pipeline(LDMSuperResolutionPipeline, args.model, model_sources, device, dtype)
    _set_sampler(pipe, args.sampler)
    _scale_latent_channels_only(pipe.scheduler, pipe.unet.config.in_channels // 2)
    # The UNet halves the latent (= low-res image) size at every down block but the last; the VQ decoder doubles
    # it at every block but the last: both factors come from the configs, not from the "4x" in the model name.
    multiple = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    scale = 2 ** (len(pipe.vqvae.config.block_out_channels) - 1)

    def restore(item: _Input):
        import numpy as np
        import torch

        padded = _pad_to_multiple(np.asarray(item.rgb), multiple)
        # A tensor input skips the pipeline's own preprocessing, which would crop to a multiple of 32.
        low_res = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        # "pt": the pipeline's own PIL conversion calls .numpy() on the model's dtype, which fails for bfloat16.
        result = _run(pipe, kds, args, device, image=low_res, eta=args.eta, output_type="pt")
        images = [_tensor_to_pil(result.images[0])]
        if args.save_particles:
            images += [_tensor_to_pil(particle) for particle in result.particle_images[0]]
        want = (scale * padded.shape[1], scale * padded.shape[0])
        if images[0].size != want:
            raise CommandError(f"the model returned {images[0].size} for a {padded.shape[1::-1]} input, "
                               f"not {scale}x as its config says", EXIT_RUN_FAILED)
        box = (0, 0, scale * item.rgb.width, scale * item.rgb.height)
        return [_join_channels(image.crop(box), item) for image in images], int(result.index[0]), False

    return _restore_all(sources, inputs, outputs, restore, args, kds, verb="upscaled")


def inpaint_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook inpaint`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem."""
    kds = _build_kds(args)
    source, mask_path = Path(args.image), Path(args.mask)
    item = _read_input(source, "image")
    mask = _read_mask(mask_path)
    if mask.size != item.rgb.size:
        raise CommandError(
            f"mask {args.mask} is {mask.width}x{mask.height} but image {args.image} is "
            f"{item.rgb.width}x{item.rgb.height}; they must be the same size"
        )
    outputs = _check_outputs(
        _output_paths([source], Path(args.output), "_inpainted"), [item], [source, mask_path], args
    )
    model_sources = _model_sources(args.model, _INPAINT_PIPELINES)
    device, dtype = _device_and_dtype(args.device, args.dtype)

    with _quiet_transformers():  # its import-time advice (torchvision, ...) is meant for library users
        from diffusers import StableDiffusionInpaintPipeline

        pipe = _load_pipeline(StableDiffusionInpaintPipeline, args.model, model_sources, device, dtype)
    _set_sampler(pipe, args.sampler)
    multiple = math.lcm(8, pipe.vae_scale_factor)  # the pipeline insists on multiples of 8

    def restore(item: _Input):
        import numpy as np
        from PIL import Image

        padded = Image.fromarray(_pad_to_multiple(np.asarray(item.rgb), multiple))
        # Padding is black in the mask: the mirrored border is context to keep, not something to repaint.
        padded_mask = Image.new("L", padded.size, 0)
        padded_mask.paste(mask, (0, 0))
        result = _run(
            pipe, kds, args, device,
            prompt=args.prompt, negative_prompt=args.negative_prompt, image=padded, mask_image=padded_mask,
            height=padded.height, width=padded.width, guidance_scale=args.guidance_scale, eta=args.eta,
        )
        images = [result.images[0]] + (list(result.particle_images[0]) if args.save_particles else [])
        box = (0, 0, item.rgb.width, item.rgb.height)
        flagged = bool((getattr(result, "nsfw_content_detected", None) or [False])[0])
        return [_join_channels(image.crop(box), item) for image in images], int(result.index[0]), flagged

    return _restore_all([source], [item], outputs, restore, args, kds, verb="inpainted")


# ------------------------------------------------------------------------------------------------- settings


def _build_kds(args: argparse.Namespace):
    """The KDS the run uses, after checking every numeric option (so a typo never costs a model load)."""
    from . import KDS

    for name in ("steps", "max_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 <= args.threshold <= 1.0:  # also rejects NaN
        raise CommandError(f"--threshold must lie in [0, 1] (a fraction t/T), got {args.threshold}")
    if not 0.0 <= args.eta < math.inf:
        raise CommandError(f"--eta must be a finite number >= 0, got {args.eta}")
    if not math.isfinite(getattr(args, "guidance_scale", 0.0)):
        raise CommandError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if args.seed is not None and not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise CommandError(f"--seed must lie in [0, 2**64), got {args.seed}")
    try:
        kds = KDS(
            num_particles=args.particles, patch_size=args.patch_size, bandwidth=args.bandwidth,
            strength=args.strength, threshold=args.threshold,
        )
    except (TypeError, ValueError) as error:
        raise CommandError(f"invalid KDS setting: {error}") from None
    if args.no_kds:  # validated the user's strength above; the comparison run uses the same KDS at strength 0
        kds = KDS(num_particles=args.particles, patch_size=args.patch_size, bandwidth=args.bandwidth, strength=0.0)
    return kds


def _device_and_dtype(device: str, dtype: str):
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available to torch")
    elif device == "mps" and not mps_available:
        raise CommandError("--device mps: the MPS backend is not available to torch")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


# ------------------------------------------------------------------------------------------------ input files


class _Input(NamedTuple):
    """An input image split for the model: RGB pixels, plus what is needed to give the result the input's form."""

    rgb: Any  # PIL image, mode RGB: what the model sees
    alpha: Any  # PIL image, mode L, or None: the input's alpha channel
    gray: bool  # the input is grayscale: the result is written as L (LA with alpha)
    icc_profile: Optional[bytes]  # the input's colour profile, where it still describes the converted pixels

    @property
    def output_mode(self) -> str:
        return ("L" if self.gray else "RGB") + ("A" if self.alpha is not None else "")


def _open_image(path: Path, role: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise CommandError(f"{role} {path} does not exist")
    if not path.is_file():
        raise CommandError(f"{role} {path} is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()
            # Camera photos: work on the pixels as viewers show them.
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some
        raise CommandError(f"{role} {path} is not a readable image ({_first_line(error)})") from None
    except Image.DecompressionBombError as error:
        raise CommandError(f"{role} {path}: {error}") from None
    return image


def _read_input(path: Path, role: str) -> _Input:
    image = _open_image(path, role)
    try:
        base = _eight_bit(image)
        gray = base.mode in ("1", "L", "LA", "La")
        rgb = base.convert("RGB")
        alpha = image.convert("RGBA").getchannel("A") if _has_alpha(image) else None
    except (ValueError, OSError) as error:
        raise CommandError(f"{role} {path}: cannot convert its {image.mode} pixels to RGB ({error})") from None
    keeps_profile = image.mode in _PROFILE_KEEPING_MODES or image.mode.startswith("I;16")
    return _Input(rgb, alpha, gray, image.info.get("icc_profile") or None if keeps_profile else None)


def _read_mask(path: Path):
    image = _open_image(path, "mask")
    try:
        return _eight_bit(image).convert("L")
    except (ValueError, OSError) as error:
        raise CommandError(f"mask {path}: cannot convert its {image.mode} pixels to grayscale ({error})") from None


def _eight_bit(image):
    """``image`` with 16- and 32-bit grayscale mapped to 8-bit L; other modes as they are. PIL's own conversion
    clips those values at 255 (a 16-bit PNG would turn white) instead of scaling them."""
    import numpy as np
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)  # integer levels 0..65535 (16-bit PNG and TIFF)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return image.convert("L")  # PIL's convention for float images: levels 0..255
    return image


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


# ----------------------------------------------------------------------------------------------- output files


class _Output(NamedTuple):
    path: Path
    particles: List[Path]  # filled only with --save-particles
    image_format: str  # PIL's format name, from the extension
    save_options: dict  # PIL save keywords (quality, colour profile)


def _output_paths(sources: Sequence[Path], output: Path, suffix: str) -> List[Path]:
    """One input: OUTPUT itself, unless it is an existing directory; several: OUTPUT is a directory."""
    as_directory = len(sources) > 1 or output.is_dir() or str(output).endswith(("/", os.sep))
    if not as_directory:
        return [output]
    if output.exists() and not output.is_dir():
        raise CommandError(f"output {output} is a file; give a directory for {len(sources)} inputs")
    return [output / f"{source.stem}{suffix}.png" for source in sources]


def _check_outputs(paths: Sequence[Path], inputs: Sequence[_Input], protected: Sequence[Path],
                   args: argparse.Namespace) -> List[_Output]:
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
        outputs.append(_Output(path, particles, image_format, save_options))
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
        holds = "A" not in mode or _has_alpha(Image.open(io.BytesIO(buffer.getvalue())))
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


def _save(image, output: _Output, path: Path, overwrite: bool) -> None:
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


# --------------------------------------------------------------------------------------------------- models


def _model_sources(model: str, pipeline_classes: Sequence[str]) -> List[dict]:
    """``from_pretrained`` arguments to try in turn for ``--model``, checked without waiting on an absent network.

    ``pipeline_classes``: the ``model_index.json`` class names the command can load, checked where that file is
    at hand (a local directory, a cached hub id)."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CommandError(f"--model {model} is a directory without model_index.json, not a diffusers pipeline "
                               "(write one with pipe.save_pretrained(DIR))")
        _check_pipeline_class(path / "model_index.json", model, pipeline_classes)
        return [dict(pretrained_model_name_or_path=str(path), local_files_only=True)]
    if path.exists():
        raise CommandError(f"--model {model} is a file; give a pipeline directory (with model_index.json, as "
                           "save_pretrained writes it) or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise CommandError(f"--model {model}: no such directory")
    try:
        cached_index = try_to_load_from_cache(model, "model_index.json")
    except ValueError:  # huggingface_hub's HFValidationError: not of the form OWNER/NAME
        raise CommandError(f"--model {model} is neither a directory nor a valid hub id (OWNER/NAME)") from None
    cached = isinstance(cached_index, str)
    if cached:
        _check_pipeline_class(Path(cached_index), model, pipeline_classes)
    if not cached and constants.HF_HUB_OFFLINE:
        raise CommandError(f"model {model} is not a local directory and not in the local Hugging Face cache, and "
                           f"the hub is offline (HF_HUB_OFFLINE); {_download_hint(model)}")
    # Cached: load without touching the network; online and not (fully) cached: download.
    sources = [dict(pretrained_model_name_or_path=model, local_files_only=True)] if cached else []
    if not constants.HF_HUB_OFFLINE:
        sources.append(dict(pretrained_model_name_or_path=model))
    return sources


def _check_pipeline_class(index: Path, model: str, pipeline_classes: Sequence[str]) -> None:
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise CommandError(f"--model {model}: cannot read its model_index.json ({_first_line(error)})") from None
    if class_name not in pipeline_classes:
        raise CommandError(f"--model {model} holds a {class_name}, but this command needs a "
                           f"{' or '.join(pipeline_classes)}")


def _download_hint(model: str) -> str:
    return (f"download it once on a machine with network (`hf download {model}` or `huggingface-cli download "
            f"{model}`) into the Hugging Face cache, or pass --model a local pipeline directory")


def _load_pipeline(pipeline_class, model: str, sources: List[dict], device: str, dtype):
    """The first of ``sources`` that loads, moved to ``device`` and ``dtype``; else one clear error."""
    from diffusers.utils import logging as diffusers_logging

    pipe, errors = None, []
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hide loading advice (accelerate, ...) meant for library users
    diffusers_logging.disable_progress_bar()  # the bar over components; hub downloads keep their own bars
    try:
        for kwargs in sources:
            try:
                with warnings.catch_warnings():
                    # diffusers >= 0.36 renamed torch_dtype to dtype; torch_dtype works in every version we support
                    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                    pipe = pipeline_class.from_pretrained(**kwargs, torch_dtype=dtype)
                break
            except Exception as caught:  # noqa: BLE001 - loading fails in many library-specific ways; report all
                errors.append(caught)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    if pipe is None:
        raise _load_error(pipeline_class.__name__, model, sources, errors)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, ValueError) as caught:
        raise CommandError(f"cannot move the model to {device}: {_first_line(caught)}", EXIT_RUN_FAILED) from None
    pipe.set_progress_bar_config(desc="steps", leave=False)  # nested under the bar over images
    return pipe


def _load_error(class_name: str, model: str, sources: List[dict], errors: List[BaseException]) -> CommandError:
    cause = _first_line(errors[-1])
    if Path(model).expanduser().is_dir():
        return CommandError(f"cannot load {class_name} from {model} (missing or broken weights?): {cause}")
    if any(_caused_by(e, _is_network_error) for e in errors):
        return CommandError(f"model {model} is not (fully) in the local Hugging Face cache and the hub cannot be "
                            f"reached ({_first_line(_root_cause(errors[-1]))}); {_download_hint(model)}")
    if any(_caused_by(e, _is_missing_repo) for e in errors):
        return CommandError(f"model {model} is not on the Hugging Face hub, or is private or gated (accept its "
                            "terms on the hub and log in with `hf auth login`); check the id, or pass --model a "
                            "local pipeline directory")
    cached = any(s.get("local_files_only") for s in sources)  # only a cached hub id is tried offline first
    where = "from the Hugging Face cache" if cached else "(not in the local Hugging Face cache) from the hub"
    return CommandError(f"cannot load model {model} {where}: {cause}; {_download_hint(model)}")


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _caused_by(error: BaseException, test: Callable[[BaseException], bool]) -> bool:
    return any(test(e) for e in _exception_chain(error))


def _root_cause(error: BaseException) -> BaseException:
    return list(_exception_chain(error))[-1]


def _is_network_error(error: BaseException) -> bool:
    # requests, httpx and huggingface_hub each have their own classes; these names cover them all.
    name = type(error).__name__
    return isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)) or any(
        word in name for word in ("ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled")
    )


def _is_missing_repo(error: BaseException) -> bool:
    return type(error).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the pipeline import below then reports what is missing
        yield
        return
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _set_sampler(pipe, sampler: str) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = pipe.scheduler.config
    if sampler == "ddim":
        # DDIM clips x0 to [-1, 1] unless told otherwise: right for pixels, wrong for latents, so a config that
        # does not say (PNDM's of Stable Diffusion) gets no clipping.
        clipping = {} if "clip_sample" in config else {"clip_sample": False}
        pipe.scheduler = DDIMScheduler.from_config(config, **clipping)
    elif sampler == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    else:
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)


def _scale_latent_channels_only(scheduler, latent_channels: int) -> None:
    """Makes ``scheduler.scale_model_input`` scale only the first ``latent_channels`` channels.

    LDMSuperResolutionPipeline hands the scheduler the noisy latent concatenated with the low-resolution image;
    samplers whose input scaling is not the identity (Euler: 1/sqrt(sigma^2 + 1)) would scale the image too,
    which the model never saw in training (LDM concatenates its conditioning unscaled). For DDIM and
    DPM-Solver++ the scaling is the identity and this changes nothing.
    """
    import torch

    scale = scheduler.scale_model_input

    def scale_model_input(sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        latents = scale(sample[:, :latent_channels], *args, **kwargs)
        return torch.cat([latents, sample[:, latent_channels:]], dim=1)

    scheduler.scale_model_input = scale_model_input


# ---------------------------------------------------------------------------------------------------- running


def _run(pipe, kds, args: argparse.Namespace, device: str, **call_kwargs):
    import torch

    from .diffusers.pipeline import run

    # A CPU generator draws the same noise on every device; each image starts from the same seed, so its result
    # does not depend on the other inputs.
    generator = torch.Generator("cpu").manual_seed(args.seed)
    # LDMSuperResolutionPipeline passes eta but not the generator to DDIM's step: with --eta > 0 its noise comes
    # from the global RNG, which must be seeded too for --no-kds and KDS runs to stay paired.
    torch.manual_seed(args.seed)
    try:
        return run(
            pipe, kds, max_batch_size=args.max_batch_size, return_particles=args.save_particles,
            num_inference_steps=args.steps, generator=generator, **call_kwargs,
        )
    except (RuntimeError, ValueError) as error:  # out of memory, NaN in x0 (float16), ...
        raise CommandError(f"the model run failed: {_first_line(error)}", EXIT_RUN_FAILED) from None


def _restore_all(sources, inputs: List[_Input], outputs: List[_Output], restore, args, kds, verb: str) -> int:
    """Restores and writes each input in turn: ``restore(input)`` gives (result and its particles, each in the
    input's form; selected index; whether the pipeline's safety checker blanked the result). One summary line per
    image on stdout; progress bars and warnings on stderr."""
    from tqdm.auto import tqdm

    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    label = "plain (no KDS)" if args.no_kds else "KDS"
    with tqdm(total=len(inputs), desc="images", unit="image", file=sys.stderr) as bar:
        for source, item, output in zip(sources, inputs, outputs):
            started = time.perf_counter()
            images, index, flagged = restore(item)
            _save(images[0], output, output.path, args.overwrite)
            for path, particle in zip(output.particles, images[1:]):
                _save(particle, output, path, args.overwrite)
            elapsed = time.perf_counter() - started
            tqdm.write(
                f"{verb} {source} -> {output.path} ({item.rgb.width}x{item.rgb.height} -> "
                f"{images[0].width}x{images[0].height}) in {elapsed:.1f} s: {label}, {kds.num_particles} particles, "
                f"selected particle {index}, seed {args.seed}",
                file=sys.stdout,
            )
            if flagged:
                tqdm.write(f"kds-hook: warning: the model's safety checker flagged {output.path}; the pipeline "
                           "replaced it by a black image", file=sys.stderr)
            bar.update(1)
    return 0


# ------------------------------------------------------------------------------------------- image handling


def _tensor_to_pil(image):
    """A (3, H, W) tensor in [0, 1] as an RGB PIL image, rounded exactly as diffusers' ``numpy_to_pil``."""
    from PIL import Image

    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype("uint8"))


def _join_channels(rgb, item: _Input):
    out = rgb.convert("L") if item.gray else rgb
    if item.alpha is not None:
        from PIL import Image

        alpha = item.alpha
        # Alpha is not something the model restores: a plain Lanczos resize is the faithful upscale of it.
        out.putalpha(alpha if alpha.size == out.size else alpha.resize(out.size, Image.LANCZOS))
    return out


def _pad_to_multiple(array, multiple: int):
    """Pads an (H, W, C) array at the bottom and right to multiples of ``multiple`` by mirroring, not zeros, so
    the model sees plausible content at the borders of what is kept."""
    import numpy as np

    height, width = array.shape[:2]
    return np.pad(array, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [repr(error)])[0]
    return text if len(text) <= 300 else text[:297] + "..."
