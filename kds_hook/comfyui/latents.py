"""Choosing one particle per image in a ComfyUI LATENT (a dict whose ``"samples"`` holds the B·N latents)."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .._checks import check_num_particles
from ..selection import SELECTION_METHODS, select_particles

__all__ = ["select_latent"]


def select_latent(latent: Dict[str, Any], num_particles: int, method: str = "mean") -> Dict[str, Any]:
    """Returns a new LATENT with the selected particle of each of the B groups of ``num_particles`` latents.

    ``latent["samples"]`` has B·N rows, the N particles of each image contiguous (what KDSSteer sampled). The
    choice is :func:`kds_hook.select_particles` with ``method`` (``"mean"``: closest to the group's mean, the
    paper's Eq. 9; ``"density"``; ``"medoid"``), in latent space. The other keys follow the chosen rows:
    ``noise_mask`` keeps its one shared mask, or (with one mask per row, fewer cycled as ComfyUI does) the chosen
    rows' masks; ``batch_index`` keeps the chosen rows' entries, so noise drawn later for them stays each row's
    own; any other tensor, list or tuple with B·N entries along its first dim is indexed the same way; everything
    else is kept as is. The input LATENT is not modified.
    """
    if not isinstance(latent, dict) or "samples" not in latent:
        raise TypeError(f"latent must be a ComfyUI LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"latent['samples'] must be a torch.Tensor, got {type(samples).__name__}")
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    num_particles = check_num_particles(num_particles)
    rows = samples.shape[0] if samples.ndim else 0
    if rows % num_particles:
        raise ValueError(
            f"KDSSelect: the LATENT holds {rows} latents, not a multiple of num_particles={num_particles}; "
            "give it the batch that KDSSteer sampled, with the same num_particles"
        )
    chosen = select_particles(samples, num_particles, method)  # validates num_particles and samples
    picked = torch.arange(chosen.index.shape[0]) * num_particles + chosen.index.cpu()

    out = dict(latent)
    out["samples"] = chosen.sample
    for key, value in latent.items():
        if key == "samples":
            continue
        if key == "noise_mask" and isinstance(value, torch.Tensor):
            out[key] = _pick_masks(value, rows, picked)
        elif key == "batch_index":
            if len(value) != rows:
                raise ValueError(f"KDSSelect: batch_index has {len(value)} entries for {rows} latents")
            out[key] = [value[int(i)] for i in picked]
        elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows and rows > 1:
            out[key] = value[picked.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == rows and rows > 1:
            out[key] = type(value)(value[int(i)] for i in picked)
    return out


def _pick_masks(masks: torch.Tensor, rows: int, picked: torch.Tensor) -> torch.Tensor:
    if masks.ndim < 3 or masks.shape[0] == 1:  # one mask shared by every latent (ComfyUI broadcasts it)
        return masks.clone()
    if masks.shape[0] != rows:  # ComfyUI cycles fewer masks over the batch and ignores extra ones
        masks = masks.repeat((math.ceil(rows / masks.shape[0]),) + (1,) * (masks.ndim - 1))[:rows]
    return masks[picked.to(masks.device)]
