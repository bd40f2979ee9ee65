"""The KDS, sampling and file options shared by the restoring commands, and what they turn into: the checked
:class:`~kds_hook.KDS`, the device and the dtype. Numeric options are checked here, before any file is read or
model loaded, so a typo never costs a model load."""

from __future__ import annotations

import argparse
import math
import re
from typing import Optional

from .errors import CommandError

SAMPLERS = ("ddim", "dpmpp", "euler")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def add_common_options(
    parser: argparse.ArgumentParser, particles_help: Optional[str] = None, steps_help: Optional[str] = None
) -> None:
    """Adds the option groups "KDS", "sampling" and "files" to a restoring command's parser.

    ``particles_help`` / ``steps_help``: for a command whose defaults depend on the model; the option then
    defaults to None, which the command resolves, and its help says how."""
    kds = parser.add_argument_group("KDS")
    kds.add_argument("--particles", type=int, metavar="N", default=None if particles_help else 10,
                     help=particles_help or "N, particles per image (default 10)")
    kds.add_argument(
        "--bandwidth", type=_bandwidth, metavar="H", default=0.3, help='kernel bandwidth h, or "auto" (default 0.3)'
    )
    kds.add_argument("--patch-size", type=int, metavar="P", default=1, help="latent patch side (default 1)")
    kds.add_argument(
        "--strength", type=float, metavar="DELTA", default=0.3, help="steering strength delta in [0, 1] (default 0.3)"
    )
    kds.add_argument(
        "--threshold", type=float, metavar="T", default=0.3,
        help="steer while t/T >= threshold, in [0, 1] (default 0.3)",
    )
    kds.add_argument(
        "--no-kds", action="store_true",
        help="same seed and particles without steering (strength 0); the output is chosen the same way",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, metavar="S", default=None if steps_help else 50,
                          help=steps_help or "sampler steps (default 50)")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim, dpmpp (DPM-Solver++) or euler")
    sampling.add_argument(
        "--eta", type=float, metavar="E", default=0.0, help="DDIM eta, the same with and without KDS (default 0)"
    )
    sampling.add_argument(
        "--seed", type=int, metavar="SEED", default=None, help="random seed (default: random, printed)"
    )
    sampling.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda, else mps, else cpu")
    sampling.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on cuda, else float32")
    sampling.add_argument(
        "--max-batch-size", type=int, metavar="B", default=None,
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


def build_kds(args: argparse.Namespace, process_group=None):
    """The KDS the run uses, after checking every numeric option (over ``process_group`` under torchrun)."""
    from .. import KDS

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
            strength=args.strength, threshold=args.threshold, process_group=process_group,
        )
    except (TypeError, ValueError) as error:
        raise CommandError(f"invalid KDS setting: {_with_flag_names(str(error))}") from None
    if args.no_kds:  # validated the user's strength above; the comparison run uses the same KDS at strength 0
        kds = KDS(num_particles=args.particles, patch_size=args.patch_size, bandwidth=args.bandwidth, strength=0.0,
                  process_group=process_group)
    return kds


# The core's argument names in its messages -> the options they come from here.
_FLAGS = {"num_particles": "--particles", "patch_size": "--patch-size", "bandwidth": "--bandwidth",
          "strength": "--strength", "threshold": "--threshold"}
_CORE_NAME = re.compile(r"(?<![\w-])(" + "|".join(_FLAGS) + r")(?!\w)")


def _with_flag_names(message: str) -> str:
    """A core error message with the library's argument names replaced by the command's options."""
    return _CORE_NAME.sub(lambda match: _FLAGS[match.group(1)], message)


def device_and_dtype(device: str, dtype: str):
    """(device name, torch dtype) for ``--device`` and ``--dtype``, resolving "auto" and checking availability."""
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
