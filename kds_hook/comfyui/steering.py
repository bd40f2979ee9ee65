"""The hook: a ComfyUI ``PREDICT_NOISE`` wrapper that steers the guider's final x0 with ``KDS.steer_x0``.

Why this hook and not ``set_model_sampler_post_cfg_function``: a guider's ``predict_noise`` returns the x0
prediction every sampler continues from (despite its name), after classifier-free guidance and every post-CFG
function. A post-CFG function instead runs inside ``cfg_function``, which some guiders call on a partial result:
``DualCFGGuider`` adds its second guidance term after it returns (in both styles), so a post-CFG hook would steer an
x0 that the sampler never sees. The wrapper also sees the result of every post-CFG function, whatever the order in
which nodes added them; the paper steers the guided prediction (Algorithm 3), and this is it.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from ..kds import KDS
from .timesteps import model_sampling_t_frac

__all__ = ["WRAPPER_KEY", "KDSPredictNoiseWrapper"]

WRAPPER_KEY = "kds_hook.KDSSteer"  # the key under which KDSSteer registers its wrapper on a ModelPatcher


class KDSPredictNoiseWrapper:
    """``WrappersMP.PREDICT_NOISE`` wrapper: ``kds.steer_x0`` on every x0 prediction, gated on the model's t/T.

    ComfyUI calls it as ``wrapper(executor, x, sigma, model_options, seed)`` at every model evaluation, with the
    whole batch; ``executor.class_obj`` is the guider, whose ``model_patcher`` holds the ``model_sampling`` that
    t/T is read from (at every call, so model-sampling nodes applied after KDSSteer count). The batch must be a
    multiple of ``kds.num_particles``, the particles of one image contiguous.
    """

    def __init__(self, kds: KDS):
        if not isinstance(kds, KDS):
            raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
        self.kds = kds

    def __repr__(self) -> str:
        return f"KDSPredictNoiseWrapper({self.kds!r})"

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        denoised = executor(*args, **kwargs)
        sigma = args[1] if len(args) > 1 else kwargs["timestep"]
        rows, num_particles = denoised.shape[0], self.kds.num_particles
        if rows % num_particles:
            raise ValueError(
                f"KDSSteer: the latent batch has {rows} images, not a multiple of num_particles={num_particles}. "
                f"Sample B x {num_particles} images: EmptyLatentImage with batch_size={num_particles}, or "
                f"RepeatLatentBatch with amount={num_particles} on one image (repeat each image, then LatentBatch "
                "them, for several)"
            )
        if num_particles == 1:
            return denoised  # nothing to steer; skip the t/T look-up too
        t_frac = _t_frac_per_row(_model_sampling(executor.class_obj), sigma, rows)
        return self.kds.steer_x0(denoised, t_frac=t_frac)


def _model_sampling(guider: Any) -> Any:
    patcher = getattr(guider, "model_patcher", None)
    if patcher is None or not callable(getattr(patcher, "get_model_object", None)):
        raise TypeError(
            f"KDSSteer: the guider {type(guider).__name__} has no model_patcher to read model_sampling from; "
            "KDSSteer works with ComfyUI's CFGGuider and its subclasses"
        )
    return patcher.get_model_object("model_sampling")


def _t_frac_per_row(model_sampling: Any, sigma: Union[float, torch.Tensor], rows: int):
    """One t/T for the batch when every row shares its sigma (always so with ComfyUI's samplers), else one per row."""
    flat = torch.as_tensor(sigma).detach().reshape(-1)
    if flat.numel() <= 1 or bool((flat == flat[0]).all()):
        return float(model_sampling_t_frac(model_sampling, flat[:1])[0])
    if flat.numel() != rows:
        raise ValueError(f"KDSSteer: {flat.numel()} noise levels for a batch of {rows}")
    return model_sampling_t_frac(model_sampling, flat)
