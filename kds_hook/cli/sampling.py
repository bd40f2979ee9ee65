"""Sampler set-up and the run loop: the ``--sampler`` built from the pipeline's own scheduler config, the seeded
KDS run of one image, and the loop that restores, writes and reports each input in turn."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

from . import distributed
from .errors import EXIT_RUN_FAILED, CommandError, first_line
from .images import Input
from .outputs import Output, save
from .progress import Progress, count

# restore(input) -> (result and its particles, each in the input's form; selected index; whether the pipeline's
# safety checker blanked the result)
Restore = Callable[[Input], Tuple[list, int, bool]]


def set_sampler(pipe, sampler: str) -> None:
    """Replaces ``pipe.scheduler`` by the ``--sampler`` (ddim, dpmpp, euler), built from its config."""
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


def scale_latent_channels_only(scheduler, latent_channels: int) -> None:
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


def run_pipeline(pipe, kds, args: argparse.Namespace, device: str, **call_kwargs):
    """One KDS run of ``pipe`` (``kds_hook.diffusers.run``) from ``--seed``, with the sampling options."""
    import torch

    from ..diffusers.pipeline import run

    # A CPU generator draws the same noise on every device; each image starts from the same seed, so its result
    # does not depend on the other inputs.
    generator = torch.Generator("cpu").manual_seed(args.seed)
    # LDMSuperResolutionPipeline passes eta but not the generator to DDIM's step: with --eta > 0 its noise comes
    # from the global RNG, which must be seeded too for --no-kds and KDS runs to stay paired.
    torch.manual_seed(args.seed)
    if distributed.under_torchrun():  # each rank its own particles' noise: the same for any number of ranks
        generator = distributed.rank_generators(args.seed, kds)
        torch.manual_seed(distributed.rank_seed(args.seed, kds))
    try:
        return run(
            pipe, kds, max_batch_size=args.max_batch_size, return_particles=args.save_particles,
            num_inference_steps=args.steps, generator=generator, **call_kwargs,
        )
    except (RuntimeError, ValueError) as error:  # out of memory, NaN in x0 (float16), ...
        raise CommandError(f"the model run failed: {first_line(error)}", EXIT_RUN_FAILED) from None


def restore_all(pipe, sources: Sequence[Path], inputs: List[Input], outputs: List[Output], restore: Restore,
                args: argparse.Namespace, kds, verb: str) -> int:
    """Restores and writes each input in turn with ``pipe`` (see :data:`Restore`). One summary line per image on
    stdout; progress and warnings on stderr (:mod:`.progress`)."""
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    label = "plain (no KDS)" if args.no_kds else "KDS"
    writer = distributed.writes_files(kds)  # under torchrun rank 0 alone writes and prints
    with distributed.quiet_unless(writer) as stream, Progress(len(inputs), stream) as progress:
        progress.attach(pipe)
        for number, (source, item, output) in enumerate(zip(sources, inputs, outputs), start=1):
            progress.start(number, source)
            started = time.perf_counter()
            images, index, flagged = restore(item)
            if not writer:
                continue
            save(images[0], output, output.path, args.overwrite)
            for path, particle in zip(output.particles, images[1:]):
                save(particle, output, path, args.overwrite)
            elapsed = time.perf_counter() - started
            progress.write(
                f"{verb} {source} -> {output.path} ({item.rgb.width}x{item.rgb.height} -> "
                f"{images[0].width}x{images[0].height}) in {elapsed:.1f} s: {label}, "
                f"{count(kds.num_particles, 'particle')}, selected particle {index}, seed {args.seed}",
                file=sys.stdout,
            )
            if flagged:
                progress.write(f"kds-hook: warning: the model's safety checker flagged {output.path}; the pipeline "
                               "replaced it by a black image", file=sys.stderr)
            progress.finish()
    return 0
