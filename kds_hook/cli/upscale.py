"""``kds-hook upscale``: 4x super-resolution of image files with an LDM-SR pipeline, or the small built-in model
(``--model builtin``, offline), steered by KDS.

Everything the user gave is checked before the model is loaded or any file written: the numeric settings
(:mod:`.options`), the inputs (:mod:`.images`), the outputs (:mod:`.outputs`) and the model (:mod:`.models`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import distributed, models, options, outputs, sampling
from .errors import EXIT_RUN_FAILED, CommandError, reporting_errors
from .extras import require
from .images import Input, expand_inputs, join_channels, pad_to_multiple, read_input, tensor_to_pil

DEFAULT_UPSCALE_MODEL = "CompVis/ldm-super-resolution-4x-openimages"
# model_index.json class names this command can load.
PIPELINES = ("LDMSuperResolutionPipeline", "KDSSuperResolutionPipeline")
BUILTIN = "builtin"  # --model value for the model that ships with kds-hook (kds_hook.sr.load_builtin)
# Defaults per model: the built-in pixel-space model runs its UNet at the output size. A 128x128 input (512x512
# out) with 4 particles and 6 steps (24 UNet evaluations at 512x512) took 98 s of CPU time with 2 threads, so
# about a minute on 2 idle CPU cores (136 s of wall time on the shared machine where it was measured).
BUILTIN_STEPS, BUILTIN_PARTICLES = 6, 4
HUB_STEPS, HUB_PARTICLES = 50, 10
_BUILTIN_HINT = f"or run offline with --model {BUILTIN}, the small model that ships with kds-hook"
# What the command imports (all from the diffusers extra), checked before anything else.
MODULES = ("torch", "numpy", "PIL", "diffusers", "huggingface_hub", "tqdm")


def register(commands) -> None:
    """Adds the ``upscale`` sub-command to an argparse sub-parsers object."""
    upscale = commands.add_parser(
        "upscale",
        help="4x super-resolution of image files (LDM-SR, or the built-in model offline) with KDS",
        description="Upscale images 4x with a latent-diffusion super-resolution pipeline, or with --model builtin "
        "the small pixel-space model that ships with kds-hook (no download), steered by KDS. The output is "
        "exactly 4x the input in each dimension, for any input size.",
    )
    upscale.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="input image file(s), or directories: their images (by extension, sorted, not in subdirectories)",
    )
    upscale.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT",
        help="output file for one input file; a directory for several inputs or a directory input (written as "
        "STEM_upscaled.png)",
    )
    upscale.add_argument(
        "--model", default=DEFAULT_UPSCALE_MODEL,
        help=f"hub id, local pipeline directory, or '{BUILTIN}': the small pixel-space model that ships with "
        f"kds-hook and works offline (default {DEFAULT_UPSCALE_MODEL})",
    )
    options.add_common_options(
        upscale,
        particles_help=f"N, particles per image (default {HUB_PARTICLES}; {BUILTIN_PARTICLES} with --model "
        f"{BUILTIN})",
        steps_help=f"sampler steps (default {HUB_STEPS}; {BUILTIN_STEPS} with --model {BUILTIN}: a 128x128 input "
        "then takes about a minute on 2 CPU cores)",
    )
    upscale.set_defaults(func=reporting_errors(upscale_command))


def upscale_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook upscale`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem
    (``register`` installs it with the error reporting that turns that into a message and an exit code)."""
    require("upscale", "diffusers", MODULES)
    builtin = args.model == BUILTIN
    if args.steps is None:
        args.steps = BUILTIN_STEPS if builtin else HUB_STEPS
    if args.particles is None:
        args.particles = BUILTIN_PARTICLES if builtin else HUB_PARTICLES
    kds = options.build_kds(args)
    sources, from_directory = expand_inputs([Path(p) for p in args.inputs], _report)
    inputs = [read_input(p, "input") for p in sources]
    paths = outputs.output_paths(sources, Path(args.output), "_upscaled", from_directory)
    targets = outputs.check_outputs(paths, inputs, sources, args)
    if builtin or _holds_builtin_kind(args.model):
        return _upscale_builtin(args, kds, sources, inputs, targets)
    try:
        model_sources = models.model_sources(args.model, PIPELINES[:1])
    except CommandError as error:
        raise _with_builtin_hint(error) from None
    device, dtype = options.device_and_dtype(args.device, args.dtype)
    kds, device = distributed.spread(args, kds, device)  # under torchrun: this rank's GPU and share of particles

    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import (
        LDMSuperResolutionPipeline,
    )

    try:
        pipe = models.load_pipeline(LDMSuperResolutionPipeline, args.model, model_sources, device, dtype)
    except CommandError as error:
        raise _with_builtin_hint(error) from None
    sampling.set_sampler(pipe, args.sampler)
    sampling.scale_latent_channels_only(pipe.scheduler, pipe.unet.config.in_channels // 2)
    # The UNet halves the latent (= low-res image) size at every down block but the last; the VQ decoder doubles
    # it at every block but the last: both factors come from the configs, not from the "4x" in the model name.
    multiple = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    scale = 2 ** (len(pipe.vqvae.config.block_out_channels) - 1)

    def restore(item: Input):
        import numpy as np
        import torch

        padded = pad_to_multiple(np.asarray(item.rgb), multiple)
        # A tensor input skips the pipeline's own preprocessing, which would crop to a multiple of 32.
        low_res = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        # "pt": the pipeline's own PIL conversion calls .numpy() on the model's dtype, which fails for bfloat16.
        result = sampling.run_pipeline(pipe, kds, args, device, image=low_res, eta=args.eta, output_type="pt")
        images = [tensor_to_pil(result.images[0])]
        if args.save_particles:
            images += [tensor_to_pil(particle) for particle in result.particle_images[0]]
        want = (scale * padded.shape[1], scale * padded.shape[0])
        if images[0].size != want:
            raise CommandError(f"the model returned {images[0].size} for a {padded.shape[1::-1]} input, "
                               f"not {scale}x as its config says", EXIT_RUN_FAILED)
        box = (0, 0, scale * item.rgb.width, scale * item.rgb.height)
        return [join_channels(image.crop(box), item) for image in images], int(result.index[0]), False

    return sampling.restore_all(pipe, sources, inputs, targets, restore, args, kds, verb="upscaled")


def _with_builtin_hint(error: CommandError) -> CommandError:
    """A model that cannot be had: the message also points to the model that needs no download."""
    return CommandError(f"{error}; {_BUILTIN_HINT}", error.code)


def _holds_builtin_kind(model: str) -> bool:
    """Whether ``model`` is a local directory holding a KDSSuperResolutionPipeline (a retrained built-in model)."""
    import json

    index = Path(model).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "KDSSuperResolutionPipeline"
    except (OSError, ValueError, AttributeError):
        return False  # model_sources reports what is wrong with it


def _upscale_builtin(args: argparse.Namespace, kds, sources, inputs, targets) -> int:
    """``upscale`` with a :class:`~kds_hook.sr.KDSSuperResolutionPipeline`: the shipped one (``--model builtin``) or
    one in a local directory. It pads odd sizes itself and scales only its noisy input for the sampler."""
    device, dtype = options.device_and_dtype(args.device, args.dtype)
    from ..sr import load_builtin, load_pipeline
    from ..sr.pipeline import preprocess

    try:
        pipe = load_builtin(device, dtype) if args.model == BUILTIN else load_pipeline(args.model, device, dtype)
    except ValueError as error:  # the weights are missing
        raise CommandError(str(error)) from None
    sampling.set_sampler(pipe, args.sampler)

    def restore(item: Input):
        # "pt": PIL conversion here, as for LDM-SR
        result = sampling.run_pipeline(pipe, kds, args, device, image=preprocess(item.rgb), eta=args.eta,
                                       output_type="pt")
        images = [tensor_to_pil(result.images[0])]
        if args.save_particles:
            images += [tensor_to_pil(particle) for particle in result.particle_images[0]]
        return [join_channels(image, item) for image in images], int(result.index[0]), False

    return sampling.restore_all(pipe, sources, inputs, targets, restore, args, kds, verb="upscaled")


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
