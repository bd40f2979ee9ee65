"""Steer a diffusers scheduler's x0 prediction with KDS, in the style of tomesd's ``apply_patch``.

``apply_patch(pipe_or_scheduler, kds)`` wraps one method on the scheduler *instance*; ``remove_patch`` restores
exactly what was there before. The scheduler's own code does everything else.

How the x0 is steered
---------------------
Every supported scheduler turns the model output into an x0 prediction that is linear in the model output:
``x0 = a * sample + b * model_output``, with (a, b) fixed by the prediction type and the noise level of the
current step. The wrapper computes x0 that way, steers it with :meth:`kds_hook.KDS.steer_x0`, turns the steered
x0 back into a model output of the same prediction type, ``(x0' - a * sample) / b``, and hands that to the
original method. So clipping, thresholding, noise, multistep histories and dtype handling all stay the
scheduler's own, applied to the steered prediction (the paper's Alg. 2 lines 16-17: re-derive eps from the
steered x0 and continue).

- DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler: ``step`` is wrapped.
- DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler: ``convert_model_output``
  is wrapped, the one place where the model output becomes what the solver stores in ``model_outputs``. The
  history, UniPC's corrector and every intermediate evaluation of the singlestep solver (the paper's Alg. 5
  steers both evaluations) therefore see the steered prediction.

Where the gate gives delta = 0 (or N = 1) the original method is called with the caller's arguments untouched,
so those steps are bit-identical to the unpatched scheduler.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

from ..kds import KDS

__all__ = ["SUPPORTED_SCHEDULERS", "apply_patch", "patched_kds", "remove_patch"]

_PATCH_ATTR = "_kds_hook_patch"
_VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class _Spec(NamedTuple):
    method: str  # the instance method that gets wrapped
    prediction_types: Tuple[str, ...]
    algorithm_types: Optional[Tuple[str, ...]]  # config.algorithm_type values, None where there is no such option


SUPPORTED_SCHEDULERS: Dict[str, _Spec] = {
    "DDIMScheduler": _Spec("step", _VP_PREDICTIONS, None),
    "DDPMScheduler": _Spec("step", _VP_PREDICTIONS, None),
    "EulerDiscreteScheduler": _Spec("step", _VP_PREDICTIONS, None),
    # diffusers itself has no "sample" prediction for the ancestral Euler sampler.
    "EulerAncestralDiscreteScheduler": _Spec("step", ("epsilon", "v_prediction"), None),
    # sde-dpmsolver (deprecated in diffusers) is left out: it diverges at few steps even without KDS.
    "DPMSolverMultistepScheduler": _Spec(
        "convert_model_output", _VP_PREDICTIONS, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
    ),
    "DPMSolverSinglestepScheduler": _Spec(
        "convert_model_output", _VP_PREDICTIONS, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
    ),
    "UniPCMultistepScheduler": _Spec("convert_model_output", _VP_PREDICTIONS, None),
}


class _Patch(NamedTuple):
    kds: KDS
    kind: str  # the supported (base) class name, which decides how x0 is computed
    method: str
    had_instance_attr: bool
    previous: Any  # the instance attribute we replaced, if any


def apply_patch(pipe_or_scheduler: Any, kds: KDS) -> Any:
    """Steers a diffusers scheduler (or a pipeline's ``.scheduler``) with ``kds``; returns the scheduler.

    Each call of the pipeline then steers every N = ``kds.num_particles`` consecutive rows of the batch as one
    ensemble: the batch must be B*N with the N particles of each input contiguous (``num_images_per_prompt=N``
    or ``repeat_interleave``); any other batch size raises ``ValueError`` at the first step. The gate reads the
    scheduler's own timestep, t/T with T = ``config.num_train_timesteps``.

    Applying again replaces the earlier patch (patches never stack). The scheduler and its configuration are
    checked here: an unsupported scheduler class, prediction type or algorithm raises ``ValueError`` naming what
    is supported. Replacing ``pipe.scheduler`` afterwards drops the patch; call this again on the new one.
    """
    if not isinstance(kds, KDS):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    scheduler = _scheduler_of(pipe_or_scheduler)
    kind, spec = _check_supported(scheduler)
    remove_patch(scheduler)

    had = spec.method in vars(scheduler)
    setattr(scheduler, _PATCH_ATTR, _Patch(kds, kind, spec.method, had, vars(scheduler).get(spec.method)))
    steer = _steer_step if spec.method == "step" else _steer_convert_model_output
    wrapper = _patched(getattr(type(scheduler), spec.method), steer)
    # Bound to the instance rather than closing over it: copy.deepcopy then rebinds the copy's method to the copy.
    setattr(scheduler, spec.method, types.MethodType(wrapper, scheduler))
    return scheduler


def remove_patch(pipe_or_scheduler: Any) -> Any:
    """Restores the scheduler's original method exactly (a no-op when it is not patched); returns the scheduler."""
    scheduler = _scheduler_of(pipe_or_scheduler)
    patch = vars(scheduler).get(_PATCH_ATTR)
    if patch is None:
        return scheduler
    if patch.had_instance_attr:
        setattr(scheduler, patch.method, patch.previous)
    else:
        delattr(scheduler, patch.method)  # the class's method is found again
    delattr(scheduler, _PATCH_ATTR)
    return scheduler


def patched_kds(pipe_or_scheduler: Any) -> Optional[KDS]:
    """The KDS a scheduler (or a pipeline's scheduler) is patched with, or None."""
    patch = vars(_scheduler_of(pipe_or_scheduler)).get(_PATCH_ATTR)
    return None if patch is None else patch.kds


def _patched(function: Callable, steer: Callable) -> Callable:
    """The wrapper of the class's ``function``; ``steer(scheduler, patch, original, signature, *args, **kwargs)``
    does the work, with ``signature`` the class method's (``self`` included): an earlier instance attribute that
    is wrapped may take ``*args, **kwargs``, but is called as the class's method is."""
    signature = inspect.signature(function)

    @functools.wraps(function)  # the original signature: pipelines inspect step's for eta and generator
    def patched(self, *args, **kwargs):
        patch = vars(self)[_PATCH_ATTR]
        original = patch.previous if patch.had_instance_attr else function.__get__(self)
        return steer(self, patch, original, signature, *args, **kwargs)

    return patched


# ---------------------------------------------------------------------------------------------- checks


def _scheduler_of(obj: Any) -> Any:
    if callable(getattr(obj, "step", None)) and hasattr(obj, "config"):
        return obj
    scheduler = getattr(obj, "scheduler", None)
    if scheduler is not None and callable(getattr(scheduler, "step", None)):
        return scheduler
    raise TypeError(f"expected a diffusers pipeline (with .scheduler) or a scheduler, got {type(obj).__name__}")


def _supported_list() -> str:
    return ", ".join(SUPPORTED_SCHEDULERS)


def _check_supported(scheduler: Any) -> Tuple[str, _Spec]:
    """The scheduler's supported (base) class name and spec; ValueError for anything we cannot steer correctly."""
    cls = type(scheduler)
    # Duck-typed: match by class name along the MRO, so diffusers is never imported. A subclass is accepted only
    # when it inherits the methods we rely on unchanged; otherwise we cannot know where its x0 comes from.
    base = next((c for c in cls.__mro__ if c.__name__ in SUPPORTED_SCHEDULERS), None)
    if base is None:
        raise ValueError(f"KDS cannot steer {cls.__name__}; supported schedulers: {_supported_list()}")
    spec = SUPPORTED_SCHEDULERS[base.__name__]
    for name in {"step", spec.method}:
        if getattr(cls, name, None) is not getattr(base, name, None):
            raise ValueError(
                f"{cls.__name__} overrides {base.__name__}.{name}, so KDS cannot tell where its x0 prediction comes "
                f"from; use {base.__name__} itself (supported schedulers: {_supported_list()})"
            )
    config = scheduler.config
    prediction = getattr(config, "prediction_type", None)
    if prediction not in spec.prediction_types:
        raise ValueError(
            f"KDS cannot steer {base.__name__} with prediction_type={prediction!r}; supported prediction types for "
            f"it: {', '.join(spec.prediction_types)}"
        )
    if spec.algorithm_types is not None:
        algorithm = getattr(config, "algorithm_type", None)
        if algorithm not in spec.algorithm_types:
            raise ValueError(
                f"KDS cannot steer {base.__name__} with algorithm_type={algorithm!r}; supported: "
                f"{', '.join(spec.algorithm_types)}"
            )
    if getattr(config, "use_flow_sigmas", False):
        raise ValueError(f"KDS cannot steer {base.__name__} with use_flow_sigmas=True (flow-matching sigmas)")
    if getattr(config, "timestep_type", "discrete") != "discrete":
        # continuous timesteps are 0.25 * log(sigma), not training timesteps, so t/T would be meaningless
        raise ValueError(f"KDS needs {base.__name__} with timestep_type='discrete' (the gate reads t/T)")
    if getattr(scheduler, "solver_p", None) is not None:
        # UniPC's external predictor gets the raw model output, which would bypass the steering
        raise ValueError(f"KDS cannot steer {base.__name__} with solver_p set; leave solver_p=None")
    return base.__name__, spec


# ---------------------------------------------------------------------------------------------- steering


def _linear_x0(scheduler: Any, alpha: Any, sigma: Any) -> Tuple[float, float]:
    """(a, b) with x0 = a * sample + b * model_output for sample = alpha * x0 + sigma * eps.

    alpha and sigma come as the scheduler computes them (float32 0-d tensors): the round trip x0 -> model
    output -> the scheduler's x0 is then exact up to the working precision, not to float32.
    """
    alpha, sigma = float(alpha), float(sigma)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        if _stores_eps(scheduler):
            # the x0 its eps = alpha * v + sigma * sample implies, (sample - sigma * eps) / alpha: the same as below
            # in exact arithmetic, but the scheduler's float32 alpha^2 + sigma^2 is not exactly 1
            return (1.0 - sigma * sigma) / alpha, -sigma
        return alpha, -sigma
    return 0.0, 1.0  # "sample": the model output is x0


def _stores_eps(scheduler: Any) -> bool:
    """Noise-prediction solvers keep eps, not x0, in their multistep history."""
    config = scheduler.config
    return getattr(config, "algorithm_type", None) == "dpmsolver" or not getattr(
        config, "predict_x0", True
    )


def _vp_from_alphas_cumprod(scheduler: Any, timestep: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = scheduler.alphas_cumprod[int(timestep)]
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5  # as DDIM and DDPM write it


def _steer_model_output(
    kds: KDS, scheduler: Any, model_output: torch.Tensor, sample: torch.Tensor, a: float, b: float, t_frac: float
) -> torch.Tensor:
    """The model output (same dtype and layout) whose x0 is the steered x0."""
    mean, variance = _split_learned_variance(scheduler, model_output, sample)
    # float32 at least: a fp16 round trip x0 -> model output would lose what the steering added
    work = torch.promote_types(torch.promote_types(mean.dtype, sample.dtype), torch.float32)
    sample_w = sample.to(work)
    x0 = a * sample_w + b * mean.to(work)
    steered = kds.steer_x0(x0, t_frac=t_frac)
    new_mean = ((steered - a * sample_w) / b).to(mean.dtype)
    return new_mean if variance is None else torch.cat([new_mean, variance], dim=1)


def _split_learned_variance(scheduler: Any, model_output: torch.Tensor, sample: torch.Tensor):
    """(mean part, learned variance part or None): models with learned variance output 2*C channels."""
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    if learned and model_output.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:
        return model_output.split(sample.shape[1], dim=1)
    return model_output, None


def _t_frac(scheduler: Any, timestep: Any) -> float:
    t = torch.as_tensor(timestep)
    if t.numel() != 1:
        raise ValueError(f"KDS needs one timestep per scheduler step, got {t.numel()} values")
    return float(t.reshape(())) / scheduler.config.num_train_timesteps


def _step_coefficients(scheduler: Any, kind: str, timestep: Any, arguments: Dict[str, Any]) -> Tuple[float, float]:
    """(a, b) of the x0 that the wrapped ``step`` computes for this call."""
    if kind in ("DDIMScheduler", "DDPMScheduler"):
        return _linear_x0(scheduler, *_vp_from_alphas_cumprod(scheduler, timestep))
    # Euler family: the sample is variance-exploding, x = x0 + sigma * eps
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)  # what the original step does first; it then finds it set
    sigma = scheduler.sigmas[scheduler.step_index]
    if kind == "EulerDiscreteScheduler":
        s_churn = arguments.get("s_churn", 0.0)
        in_range = arguments.get("s_tmin", 0.0) <= sigma <= arguments.get("s_tmax", float("inf"))
        if s_churn > 0 and in_range:
            # the churn noise is drawn inside step and changes the sample the x0 is computed from
            raise ValueError("KDS with EulerDiscreteScheduler supports s_churn=0 only (on steered steps)")
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return 1.0, -float(sigma)
    if prediction == "v_prediction":  # c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1), as Euler writes them
        return 1.0 / float(sigma**2 + 1), float(-sigma / (sigma**2 + 1) ** 0.5)
    return 0.0, 1.0


def _steer_step(scheduler: Any, patch: _Patch, original: Callable, signature: inspect.Signature, *args, **kwargs):
    bound = signature.bind(scheduler, *args, **kwargs)  # names the arguments however the caller passed them
    arguments = bound.arguments
    timestep, kds = arguments["timestep"], patch.kds
    t_frac = _t_frac(scheduler, timestep)
    if kds.strength_at(t_frac) == 0 or kds.num_particles == 1:
        _check_closed_gate_batch(kds, arguments["sample"], t_frac)
        return original(*args, **kwargs)
    a, b = _step_coefficients(scheduler, patch.kind, timestep, arguments)
    arguments["model_output"] = _steer_model_output(
        kds, scheduler, arguments["model_output"], arguments["sample"], a, b, t_frac
    )
    return original(*bound.args[1:], **bound.kwargs)  # without self: original is bound


def _steer_convert_model_output(
    scheduler: Any, patch: _Patch, original: Callable, signature: inspect.Signature, model_output, *args, **kwargs
):
    sample = kwargs.get("sample", args[1] if len(args) > 1 else None)
    if sample is None or scheduler.step_index is None:
        return original(model_output, *args, **kwargs)  # not called from step: diffusers decides what happens
    kds = patch.kds
    t_frac = _t_frac(scheduler, scheduler.timesteps[scheduler.step_index])
    if kds.strength_at(t_frac) == 0 or kds.num_particles == 1:
        _check_closed_gate_batch(kds, sample, t_frac)
        return original(model_output, *args, **kwargs)
    a, b = _linear_x0(scheduler, *scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index]))
    return original(_steer_model_output(kds, scheduler, model_output, sample, a, b, t_frac), *args, **kwargs)


def _check_closed_gate_batch(kds: KDS, sample: torch.Tensor, t_frac: float) -> None:
    # steer_x0 validates the particle batch and records the step even when the gate is closed; it returns its
    # input untouched there, so nothing is computed and the scheduler's own path runs.
    kds.steer_x0(sample, t_frac=t_frac, strength=0.0)

