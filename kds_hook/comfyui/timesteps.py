"""t/T for the KDS gate, read from a ComfyUI model's own ``model_sampling`` at the noise level sigma.

ComfyUI samplers work in sigma; the paper's gate is on t/T, the training time over the number of training steps.
Two families of ComfyUI models define t, and for them t/T is exact:

- discrete-time models (SD1.x, SD2, SDXL, their LCM-distilled variants: ``ModelSamplingDiscrete`` and
  subclasses whose ``timestep(sigma)`` is an integer index): ``t/T = timestep(sigma) / num_timesteps``, the
  training step the network sees (0 … 999) over the number of training steps (1000), as in diffusers'
  ``timestep / num_train_timesteps``;
- flow models (prediction type ``CONST``: SD3, Flux, AuraFlow, Wan …): the latent is ``(1 - σ)·x0 + σ·noise``, so
  sigma is the flow time itself and ``t/T = σ`` (their ``timestep(σ)`` is σ·1000 or σ, the same fraction).

Other model samplings (continuous EDM and V, Stable Cascade, Cosmos) have no training steps to count;
:func:`model_sampling_t_frac` refuses them with a ``ValueError`` rather than guess.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["model_sampling_t_frac"]


def model_sampling_t_frac(model_sampling: Any, sigma: torch.Tensor) -> torch.Tensor:
    """t/T (float64, on the CPU, shape of ``sigma``) for a ComfyUI ``model_sampling`` object at noise level sigma.

    ``model_sampling`` is what ``model.get_model_object("model_sampling")`` returns. Raises ``ValueError`` for a
    model sampling that is neither discrete-time nor flow (see the module docstring). Imports ComfyUI.
    """
    import comfy.model_sampling

    sigma = torch.as_tensor(sigma)
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return sigma.detach().to("cpu", torch.float64)
    num_timesteps = getattr(model_sampling, "num_timesteps", None)
    if isinstance(num_timesteps, int) and num_timesteps > 0 and callable(getattr(model_sampling, "timestep", None)):
        timestep = model_sampling.timestep(sigma)
        if isinstance(timestep, torch.Tensor) and not timestep.is_floating_point():
            return timestep.detach().to("cpu", torch.float64) / num_timesteps
    kinds = ", ".join(c.__name__ for c in type(model_sampling).__mro__ if c not in (object, torch.nn.Module))
    raise ValueError(
        f"KDS cannot read t/T from this model's sampling ({kinds}): it is neither a "
        "discrete-time model (timestep(sigma) an index into num_timesteps training steps, as SD1.x, SD2 and SDXL) "
        "nor a flow model (CONST, as SD3 and Flux), so it has no training steps to count"
    )
