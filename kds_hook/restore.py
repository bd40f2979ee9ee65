"""``kds-hook upscale`` and ``kds-hook inpaint``: restore image files with a diffusers pipeline and KDS.

Everything the user gave is checked before any model is loaded or any file written: the KDS settings, the inputs
(they exist and are images, the mask matches), the outputs (none exists unless ``--overwrite``), and the model
(a local pipeline directory, or a hub id that is cached or can be downloaded). An error prints one line
``kds-hook: error: ...`` and exits 2 when found up front (nothing written), 1 when a model run fails (outputs of
earlier images stay). diffusers, huggingface_hub and PIL are imported inside the commands so ``kds-hook --help``
and ``import kds_hook`` stay light. Reference: ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, NamedTuple, Sequence

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
    kds.add_argument("--threshold", type=float, default=0.3, help="steer while t/T >= threshold (default 0.3)")
    kds.add_argument(
        "--no-kds", action="store_true",
        help="same seed and particles without steering (strength 0); the output is chosen the same way",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim, dpmpp (DPM-Solver++) or euler")
    sampling.add_argument("--eta", type=float, default=0.0, help="DDIM eta, the same with and without KDS (default 0)")
    sampling.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    sampling.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
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

    run.__doc__ = command.__doc__
    return run


# ---------------------------------------------------------------------------------------------------- commands


def upscale_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook upscale`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem
    (``register`` installs it with the error reporting that turns that into a message and an exit code)."""
    kds = _build_kds(args)
    sources = [Path(p) for p in args.inputs]
    images = [_open_image(p, "input") for p in sources]
    outputs = _check_outputs(_output_paths(sources, Path(args.output), "_upscaled"), images, args)
    model_sources = _model_sources(args.model)
    device, dtype = _device_and_dtype(args.device, args.dtype)

    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
        LDMSuperResolutionPipeline,
    )

    pipe = _load_pipeline(LDMSuperResolutionPipeline, args.model, model_sources, device, dtype)
    _set_sampler(pipe, args.sampler)
    # The UNet halves the latent (= low-res image) size at every down block but the last; the VQ decoder doubles
    # it at every block but the last: both factors come from the configs, not from the "4x" in the model name.
    multiple = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    scale = 2 ** (len(pipe.vqvae.config.block_out_channels) - 1)

    def restore(image):
        import numpy as np
        import torch

        rgb, alpha, gray = _split_channels(image)
        padded = _pad_to_multiple(np.asarray(rgb), multiple)
        # A tensor input skips the pipeline's own preprocessing, which would crop to a multiple of 32.
        low_res = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        result = _run(pipe, kds, args, device, image=low_res, eta=args.eta)
        want = (scale * padded.shape[1], scale * padded.shape[0])
        if result.images[0].size != want:
            raise CommandError(f"the model returned {result.images[0].size} for a {padded.shape[1::-1]} input, "
                               f"not {scale}x as its config says", EXIT_RUN_FAILED)
        box = (0, 0, scale * image.width, scale * image.height)
        finish = lambda im: _join_channels(im.crop(box), alpha, gray)  # noqa: E731
        return result, finish

    return _restore_all(sources, images, outputs, restore, args, kds, verb="upscaled")


def inpaint_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook inpaint`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem."""
    kds = _build_kds(args)
    source = Path(args.image)
    image = _open_image(source, "image")
    mask = _open_image(Path(args.mask), "mask")
    if mask.size != image.size:
        raise CommandError(
            f"mask {args.mask} is {mask.width}x{mask.height} but image {args.image} is {image.width}x{image.height}; "
            "they must be the same size"
        )
    outputs = _check_outputs(_output_paths([source], Path(args.output), "_inpainted"), [image], args)
    model_sources = _model_sources(args.model)
    device, dtype = _device_and_dtype(args.device, args.dtype)

    from diffusers import StableDiffusionInpaintPipeline

    pipe = _load_pipeline(StableDiffusionInpaintPipeline, args.model, model_sources, device, dtype)
    _set_sampler(pipe, args.sampler)
    multiple = math.lcm(8, pipe.vae_scale_factor)  # the pipeline insists on multiples of 8

    def restore(image):
        import numpy as np
        from PIL import Image

        rgb, alpha, gray = _split_channels(image)
        padded = Image.fromarray(_pad_to_multiple(np.asarray(rgb), multiple))
        # Padding is black in the mask: the mirrored border is context to keep, not something to repaint.
        padded_mask = Image.new("L", padded.size, 0)
        padded_mask.paste(mask.convert("L"), (0, 0))
        result = _run(
            pipe, kds, args, device,
            prompt=args.prompt, negative_prompt=args.negative_prompt, image=padded, mask_image=padded_mask,
            height=padded.height, width=padded.width, guidance_scale=args.guidance_scale, eta=args.eta,
        )
        box = (0, 0, image.width, image.height)
        finish = lambda im: _join_channels(im.crop(box), alpha, gray)  # noqa: E731
        return result, finish

    return _restore_all([source], [image], outputs, restore, args, kds, verb="inpainted")


# ---------------------------------------------------------------------------------------------- shared steps


class _Output(NamedTuple):
    path: Path
    particles: List[Path]  # filled only with --save-particles


def _build_kds(args: argparse.Namespace):
    from . import KDS

    for name in ("steps", "max_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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


def _open_image(path: Path, role: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise CommandError(f"{role} {path} does not exist")
    if not path.is_file():
        raise CommandError(f"{role} {path} is not a file")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise CommandError(f"{role} {path} is not a readable image ({error})") from None
    return ImageOps.exif_transpose(image)  # camera photos: work on the pixels as viewers show them


def _output_paths(sources: Sequence[Path], output: Path, suffix: str) -> List[Path]:
    """One input: OUTPUT itself, unless it is an existing directory; several: OUTPUT is a directory."""
    as_directory = len(sources) > 1 or output.is_dir() or str(output).endswith(("/", os.sep))
    if not as_directory:
        return [output]
    if output.exists() and not output.is_dir():
        raise CommandError(f"output {output} is a file; give a directory for {len(sources)} inputs")
    paths = [output / f"{source.stem}{suffix}.png" for source in sources]
    seen = {}
    for source, path in zip(sources, paths):
        if path in seen:
            raise CommandError(f"inputs {seen[path]} and {source} would both be written to {path}; "
                               "rename one or run them separately")
        seen[path] = source
    return paths


def _check_outputs(paths: Sequence[Path], images, args: argparse.Namespace) -> List[_Output]:
    from PIL import Image

    outputs = []
    for path, image in zip(paths, images):
        image_format = Image.registered_extensions().get(path.suffix.lower())
        if image_format is None:
            raise CommandError(f"output {path}: unknown image extension {path.suffix!r}; use .png, .jpg, .webp, ...")
        if image_format == "JPEG" and _has_alpha(image):
            raise CommandError(f"output {path}: JPEG cannot hold the input's alpha channel; use .png or .webp")
        width = len(str(args.particles - 1))
        particles = [
            path.with_name(f"{path.stem}_particle{k:0{width}d}{path.suffix}") for k in range(args.particles)
        ] if args.save_particles else []
        for target in [path] + particles:
            if target.is_dir():
                raise CommandError(f"output {target} is a directory")
            if target.exists() and not args.overwrite:
                raise CommandError(f"output {target} exists; pass --overwrite to replace it")
        outputs.append(_Output(path, particles))
    return outputs


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


def _model_sources(model: str) -> List[dict]:
    """``from_pretrained`` arguments to try in turn for ``--model``, checked without waiting on an absent network."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CommandError(f"--model {model} is a directory without model_index.json, not a diffusers pipeline "
                               "(write one with pipe.save_pretrained(DIR))")
        return [dict(pretrained_model_name_or_path=str(path), local_files_only=True)]
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise CommandError(f"--model {model}: no such directory")
    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    if not cached and constants.HF_HUB_OFFLINE:
        raise CommandError(f"model {model} is not in the local Hugging Face cache and the hub is offline "
                           f"(HF_HUB_OFFLINE); {_download_hint(model)}")
    # Cached: load without touching the network; online and not (fully) cached: download.
    sources = [dict(pretrained_model_name_or_path=model, local_files_only=True)] if cached else []
    if not constants.HF_HUB_OFFLINE:
        sources.append(dict(pretrained_model_name_or_path=model))
    return sources


def _download_hint(model: str) -> str:
    return (f"download it once on a machine with network (`hf download {model}` or `huggingface-cli download "
            f"{model}`) into the Hugging Face cache, or pass --model a local pipeline directory")


def _load_pipeline(pipeline_class, model: str, sources: List[dict], device: str, dtype):
    """The first of ``sources`` that loads, moved to ``device`` and ``dtype``; else one clear error."""
    from diffusers.utils import logging as diffusers_logging

    pipe, error = None, None
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hide loading advice (accelerate, ...) meant for library users
    try:
        for kwargs in sources:
            try:
                with warnings.catch_warnings():
                    # diffusers >= 0.36 renamed torch_dtype to dtype; torch_dtype works in every version we support
                    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                    pipe = pipeline_class.from_pretrained(**kwargs, torch_dtype=dtype)
                break
            except Exception as caught:  # noqa: BLE001 - loading fails in many library-specific ways; report all
                error = caught
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if pipe is None:
        cause = (str(error).strip().splitlines() or [repr(error)])[0]
        cause = cause if len(cause) <= 300 else cause[:297] + "..."
        if Path(model).expanduser().is_dir():
            raise CommandError(f"cannot load {pipeline_class.__name__} from {model}: {cause}")
        cached = any(s.get("local_files_only") for s in sources)  # only a cached hub id is tried offline first
        where = "from the Hugging Face cache" if cached else "(not in the local Hugging Face cache) from the hub"
        raise CommandError(f"cannot load model {model} {where}: {cause}; {_download_hint(model)}")
    try:
        pipe = pipe.to(device)
    except (RuntimeError, ValueError) as caught:
        raise CommandError(f"cannot move the model to {device}: {caught}", EXIT_RUN_FAILED) from None
    pipe.set_progress_bar_config(desc="steps", leave=False)  # nested under the bar over images
    return pipe


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
        raise CommandError(f"the model run failed: {error}", EXIT_RUN_FAILED) from None


def _restore_all(sources, images, outputs: List[_Output], restore, args, kds, verb: str) -> int:
    from tqdm.auto import tqdm

    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    label = "plain (no KDS)" if args.no_kds else "KDS"
    bar = tqdm(total=len(images), desc="images", unit="image", file=sys.stderr)
    for source, image, output in zip(sources, images, outputs):
        started = time.perf_counter()
        result, finish = restore(image)
        final = finish(result.images[0])
        output.path.parent.mkdir(parents=True, exist_ok=True)
        final.save(output.path)
        if args.save_particles:
            for path, particle in zip(output.particles, result.particle_images[0]):  # the N particles of input 0
                finish(particle).save(path)
        index = int(result.index[0])
        elapsed = time.perf_counter() - started
        tqdm.write(
            f"{verb} {source} -> {output.path} ({image.width}x{image.height} -> {final.width}x{final.height}) in "
            f"{elapsed:.1f} s: {label}, {kds.num_particles} particles, selected particle {index}, seed {args.seed}",
            file=sys.stdout,
        )
        bar.update(1)
    bar.close()
    return 0


# ------------------------------------------------------------------------------------------- image handling


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _split_channels(image):
    """(RGB image for the model, alpha channel or None, whether to return grayscale)."""
    gray = image.mode in ("1", "L", "LA", "La", "I", "I;16", "F")
    alpha = image.convert("RGBA").getchannel("A") if _has_alpha(image) else None
    return image.convert("RGB"), alpha, gray


def _join_channels(rgb, alpha, gray: bool):
    out = rgb.convert("L") if gray else rgb
    if alpha is not None:
        from PIL import Image

        # Alpha is not something the model restores: a plain Lanczos resize is the faithful upscale of it.
        out.putalpha(alpha if alpha.size == out.size else alpha.resize(out.size, Image.LANCZOS))
    return out


def _pad_to_multiple(array, multiple: int):
    """Pads an (H, W, C) array at the bottom and right to multiples of ``multiple`` by mirroring, not zeros, so
    the model sees plausible content at the borders of what is kept."""
    import numpy as np

    height, width = array.shape[:2]
    return np.pad(array, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
