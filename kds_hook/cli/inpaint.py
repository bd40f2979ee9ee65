"""``kds-hook inpaint``: repaint the white part of a mask with a Stable Diffusion inpainting pipeline, steered by
KDS (with classifier-free guidance, KDS steers the guided prediction)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import distributed, models, options, outputs, sampling
from .errors import CommandError, reporting_errors
from .extras import require
from .images import Input, join_channels, pad_to_multiple, read_input, read_mask

# stabilityai/stable-diffusion-2-inpainting was taken down in 2025; this is the community mirror of its weights.
DEFAULT_INPAINT_MODEL = "sd2-community/stable-diffusion-2-inpainting"
# model_index.json class names this command can load (the inpainting pipeline also runs plain SD checkpoints).
PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# What the command imports (all from the diffusers extra), checked before anything else.
MODULES = ("torch", "numpy", "PIL", "diffusers", "transformers", "huggingface_hub", "tqdm")


def register(commands) -> None:
    """Adds the ``inpaint`` sub-command to an argparse sub-parsers object."""
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
    options.add_common_options(inpaint)
    inpaint.set_defaults(func=reporting_errors(inpaint_command))


def inpaint_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook inpaint`` on parsed arguments and returns 0; raises :class:`CommandError` on a problem."""
    require("inpaint", "diffusers", MODULES)
    kds = options.build_kds(args)
    source, mask_path = Path(args.image), Path(args.mask)
    item = read_input(source, "image")
    mask = read_mask(mask_path)
    if mask.size != item.rgb.size:
        raise CommandError(
            f"mask {args.mask} is {mask.width}x{mask.height} but image {args.image} is "
            f"{item.rgb.width}x{item.rgb.height}; they must be the same size"
        )
    targets = outputs.check_outputs(
        outputs.output_paths([source], Path(args.output), "_inpainted"), [item], [source, mask_path], args
    )
    model_sources = models.model_sources(args.model, PIPELINES)
    device, dtype = options.device_and_dtype(args.device, args.dtype)
    kds, device = distributed.spread(args, kds, device)  # under torchrun: this rank's GPU and share of particles

    with models.quiet_transformers():
        from diffusers import StableDiffusionInpaintPipeline

        pipe = models.load_pipeline(StableDiffusionInpaintPipeline, args.model, model_sources, device, dtype)
    sampling.set_sampler(pipe, args.sampler)
    multiple = math.lcm(8, pipe.vae_scale_factor)  # the pipeline insists on multiples of 8

    def restore(item: Input):
        import numpy as np
        from PIL import Image

        padded = Image.fromarray(pad_to_multiple(np.asarray(item.rgb), multiple))
        # Padding is black in the mask: the mirrored border is context to keep, not something to repaint.
        padded_mask = Image.new("L", padded.size, 0)
        padded_mask.paste(mask, (0, 0))
        result = sampling.run_pipeline(
            pipe, kds, args, device,
            prompt=args.prompt, negative_prompt=args.negative_prompt, image=padded, mask_image=padded_mask,
            height=padded.height, width=padded.width, guidance_scale=args.guidance_scale, eta=args.eta,
        )
        images = [result.images[0]] + (list(result.particle_images[0]) if args.save_particles else [])
        box = (0, 0, item.rgb.width, item.rgb.height)
        flagged = bool((getattr(result, "nsfw_content_detected", None) or [False])[0])
        return [join_channels(image.crop(box), item) for image in images], int(result.index[0]), flagged

    return sampling.restore_all(pipe, [source], [item], targets, restore, args, kds, verb="inpainted")
