"""The two ComfyUI nodes: ``KDSSteer`` (MODEL -> steered MODEL) and ``KDSSelect`` (B·N latents -> B).

They follow ComfyUI's node interface (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``); ComfyUI is
imported only when a node runs.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..kds import KDS
from ..selection import SELECTION_METHODS
from .latents import select_latent
from .steering import WRAPPER_KEY, KDSPredictNoiseWrapper
from .timesteps import model_sampling_t_frac

__all__ = ["KDSSteer", "KDSSelect"]

CATEGORY = "sampling/kds"
_MAX_PARTICLES = 4096  # EmptyLatentImage's own batch limit

_PARTICLES = (
    "INT",
    {
        "default": 10,
        "min": 1,
        "max": _MAX_PARTICLES,
        "tooltip": "N, the particles sampled together per image; the latent batch must be a multiple of N, "
        "each image's N particles contiguous (EmptyLatentImage batch_size=N, or RepeatLatentBatch amount=N).",
    },
)


class KDSSteer:
    """Steers every model evaluation of any sampler with Kernel Density Steering (KDS)."""

    DESCRIPTION = (
        "Kernel Density Steering: at every model evaluation, each particle's predicted clean latent moves toward "
        "the dense regions of its N-particle ensemble (patch-wise mean shift), while t/T >= threshold. Sample a "
        "batch of N particles per image, then pick one with KDSSelect."
    )
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A copy of the model whose every x0 prediction is steered (the input model is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, Tuple[Any, ...]]]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to steer (discrete-time or flow)."}),
                "num_particles": _PARTICLES,
                "bandwidth": (
                    "FLOAT",
                    {
                        "default": 0.3,
                        "min": 0.001,
                        "max": 100.0,
                        "step": 0.001,
                        "tooltip": "Kernel standard deviation h in latent units (ignored with auto_bandwidth).",
                    },
                ),
                "auto_bandwidth": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Choose h per image and step by the median heuristic."},
                ),
                "patch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 64, "tooltip": "Side of the latent patches (1: each pixel)."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.3,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Step size delta of the mean shift while the gate is open; 0 turns KDS off.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.3,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Steer while t/T >= threshold (t/T: 1 at pure noise, 0 at the clean image).",
                    },
                ),
            }
        }

    def patch(
        self,
        model: Any,
        num_particles: int = 10,
        bandwidth: float = 0.3,
        auto_bandwidth: bool = False,
        patch_size: int = 1,
        strength: float = 0.3,
        threshold: float = 0.3,
    ) -> Tuple[Any]:
        """Returns ``(clone,)``: ``model.clone()`` with a KDS ``PREDICT_NOISE`` wrapper; ``model`` is untouched."""
        from comfy.patcher_extension import WrappersMP

        kds = KDS(
            num_particles=num_particles,
            patch_size=patch_size,
            bandwidth="auto" if auto_bandwidth else bandwidth,
            strength=strength,
            threshold=threshold,
        )
        for needed in ("clone", "add_wrapper_with_key", "get_wrappers", "get_model_object"):
            if not callable(getattr(model, needed, None)):
                raise TypeError(
                    f"KDSSteer needs a ComfyUI MODEL (a ModelPatcher with {needed}), got {type(model).__name__}; "
                    "an older ComfyUI without model wrappers is not supported"
                )
        if model.get_wrappers(WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
            raise ValueError(
                "KDSSteer: this model is already steered by a KDSSteer node upstream; steering twice would shift "
                "every prediction twice. Use one KDSSteer per model"
            )
        model_sampling = model.get_model_object("model_sampling")
        model_sampling_t_frac(model_sampling, torch.as_tensor([float(model_sampling.sigma_max)]))  # refuse early
        steered = model.clone()
        steered.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, KDSPredictNoiseWrapper(kds))
        return (steered,)


class KDSSelect:
    """Keeps one particle per image: the closest to its group's mean (the paper's Eq. 9), or by density or medoid."""

    DESCRIPTION = (
        "Picks one latent from each group of num_particles (what KDSSteer sampled): by default the one closest to "
        "its group's mean (the paper's rule). noise_mask and batch_index follow the chosen latents."
    )
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("One latent per image: B latents from B x num_particles.",)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, Tuple[Any, ...]]]:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The B x num_particles latents sampled with KDSSteer."}),
                "num_particles": _PARTICLES,
                "method": (
                    list(SELECTION_METHODS),
                    {
                        "default": "mean",
                        "tooltip": "mean: closest to the group mean (paper); density: in the densest region; "
                        "medoid: smallest total distance to the others.",
                    },
                ),
            }
        }

    def select(self, samples: Dict[str, Any], num_particles: int = 10, method: str = "mean") -> Tuple[Dict[str, Any]]:
        """Returns ``(latent,)`` with B latents; see :func:`kds_hook.comfyui.select_latent`."""
        return (select_latent(samples, num_particles, method),)
