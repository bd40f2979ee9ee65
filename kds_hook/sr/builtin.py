"""The built-in weights that ship inside the package (``kds_hook/sr/builtin/``), and loading a saved pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["BUILTIN_DIR", "WEIGHTS_FILE", "builtin_path", "load_builtin", "load_pipeline"]

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
WEIGHTS_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")
_FILES = ("model_index.json", os.path.join("unet", "config.json"), os.path.join("scheduler", "scheduler_config.json"))


def builtin_path() -> Path:
    """The folder of the shipped pipeline (``save_pretrained`` layout, with ``MODEL_CARD.md``)."""
    return BUILTIN_DIR


def load_pipeline(
    path: Union[str, os.PathLike],
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
):
    """A :class:`~kds_hook.sr.KDSSuperResolutionPipeline` from a local ``save_pretrained`` folder, in ``dtype``
    (float32 by default, whatever the stored precision) on ``device`` (default CPU), in eval mode.

    Raises ``ValueError`` naming the missing file when the folder lacks the weights or a config.
    """
    folder = Path(path)
    missing = [name for name in (WEIGHTS_FILE,) + _FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"no super-resolution model weights in {folder}: missing {', '.join(missing)}. For the built-in model, "
            "reinstall kds-hook (the weights ship in the package) or regenerate them with "
            "`python benchmarks/train_sr.py --out kds_hook/sr/builtin` (see docs/sr-model.md)"
        )
    from diffusers.utils import logging as diffusers_logging

    from .pipeline import KDSSuperResolutionPipeline

    # quietly: no "Loading pipeline components" bar, no advice to install accelerate
    bar, verbosity = diffusers_logging.is_progress_bar_enabled(), diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = KDSSuperResolutionPipeline.from_pretrained(str(folder))
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bar:
            diffusers_logging.enable_progress_bar()
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe.unet.to(dtype=dtype)
    return pipe.to(device or "cpu")


def load_builtin(device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32):
    """The built-in 4x super-resolution pipeline that ships with kds-hook, offline: DDIM (``v_prediction``),
    float32 on ``device`` (default CPU), progress bar off (``pipe.set_progress_bar_config(disable=False)`` turns
    it on). Raises ``ValueError`` when the shipped weights are missing."""
    return load_pipeline(BUILTIN_DIR, device=device, dtype=dtype)
