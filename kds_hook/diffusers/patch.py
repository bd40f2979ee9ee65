"""Steer a diffusers scheduler's x0 prediction with KDS, in the style of tomesd's ``apply_patch``.

``apply_patch(pipe_or_scheduler, kds, layout=...)`` wraps one method on the scheduler *instance*;
``remove_patch`` restores exactly what was there before. The scheduler's own code does everything else.

How the x0 is steered
---------------------
For a given sample and noise level every supported scheduler forms its x0 prediction as an affine function of
the model output, ``x0 = a * sample + b * model_output`` (:mod:`kds_hook.diffusers.x0`; which (a, b) and which
t/T for each class: :mod:`kds_hook.diffusers.schedulers`). The wrapper computes x0 that way, views it spatially
through the layout, steers it with :meth:`kds_hook.KDS.steer_x0`, turns the steered x0 back into a model output
of the same kind, ``(x0' - a * sample) / b``, and hands that to the original method. So clipping, thresholding,
noise, multistep histories and dtype handling all stay the scheduler's own, applied to the steered prediction
(the paper's Alg. 2 lines 16-17: re-derive eps from the steered x0 and continue).

- ``step`` is wrapped for the single-step and second-order samplers (DDIM, Euler, Heun, flow matching, ...).
  Second-order samplers call ``step`` once per model evaluation, so both evaluations are steered (Alg. 5).
- ``convert_model_output`` is wrapped for the multistep solvers: the one place where the model output becomes
  what the solver stores in ``model_outputs``, so the history, UniPC's corrector and every intermediate
  evaluation of the singlestep solver see the steered prediction.

Where the gate gives delta = 0 (or N = 1) the original method is called with the caller's arguments untouched,
so those steps are bit-identical to the unpatched scheduler.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, NamedTuple, Optional

import torch

from ..kds import KDS
from .layouts import SPATIAL, Layout
from .schedulers import SUPPORTED_SCHEDULERS, SchedulerSpec, check_supported

__all__ = ["SUPPORTED_SCHEDULERS", "apply_patch", "patched_kds", "patched_layout", "remove_patch"]

_PATCH_ATTR = "_kds_hook_patch"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Patch(NamedTuple):
    kds: KDS
    layout: Any
    kind: str  # the supported (base) class name
    spec: SchedulerSpec
    had_instance_attr: bool
    previous: Any  # the instance attribute we replaced, if any


def apply_patch(pipe_or_scheduler: Any, kds: KDS, *, layout: Optional[Layout] = None) -> Any:
    """Steers a diffusers scheduler (or a pipeline's ``.scheduler``) with ``kds``; returns the scheduler.

    Each call of the pipeline then steers every N = ``kds.num_particles`` consecutive rows of the batch as one
    ensemble: the batch must be B*N with the N particles of each input contiguous (``num_images_per_prompt=N``
    or ``repeat_interleave``); any other batch size raises ``ValueError`` at the first step. The gate reads the
    scheduler's own time (see docs/diffusers-schedulers.md): t/T with T = ``config.num_train_timesteps`` for
    discrete schedulers, sigma for flow matching.

    ``layout`` says how the scheduler's sample is viewed as (B*N, C, *spatial) for the patches: ``None`` (the
    default, :data:`~kds_hook.diffusers.layouts.SPATIAL`) for latents that already are, or e.g.
    ``packed_2x2(height, width)`` for Flux-style packed latents (any object with ``to_spatial`` and
    ``from_spatial``).

    Applying again replaces the earlier patch (patches never stack). The scheduler and its configuration are
    checked here: an unsupported scheduler class, prediction type or algorithm raises ``ValueError`` naming the
    reason or what is supported. Replacing ``pipe.scheduler`` afterwards drops the patch; call this again on the
    new one.
    """
    if not isinstance(kds, KDS):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    layout = SPATIAL if layout is None else layout
    if not (callable(getattr(layout, "to_spatial", None)) and callable(getattr(layout, "from_spatial", None))):
        raise TypeError(
            f"layout must have to_spatial(x) and from_spatial(x, like) methods (see kds_hook.diffusers.layouts), "
            f"got {type(layout).__name__}"
        )
    scheduler = _scheduler_of(pipe_or_scheduler)
    kind, spec = check_supported(scheduler)
    remove_patch(scheduler)

    had = spec.method in vars(scheduler)
    setattr(scheduler, _PATCH_ATTR, _Patch(kds, layout, kind, spec, had, vars(scheduler).get(spec.method)))
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
        setattr(scheduler, patch.spec.method, patch.previous)
    else:
        delattr(scheduler, patch.spec.method)  # the class's method is found again
    delattr(scheduler, _PATCH_ATTR)
    return scheduler


def patched_kds(pipe_or_scheduler: Any) -> Optional[KDS]:
    """The KDS a scheduler (or a pipeline's scheduler) is patched with, or None."""
    patch = vars(_scheduler_of(pipe_or_scheduler)).get(_PATCH_ATTR)
    return None if patch is None else patch.kds


def patched_layout(pipe_or_scheduler: Any) -> Optional[Layout]:
    """The layout a scheduler (or a pipeline's scheduler) is patched with (``SPATIAL`` by default), or None."""
    patch = vars(_scheduler_of(pipe_or_scheduler)).get(_PATCH_ATTR)
    return None if patch is None else patch.layout


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


def _scheduler_of(obj: Any) -> Any:
    if callable(getattr(obj, "step", None)) and hasattr(obj, "config"):
        return obj
    scheduler = getattr(obj, "scheduler", None)
    if scheduler is not None and callable(getattr(scheduler, "step", None)):
        return scheduler
    if hasattr(obj, "config") and callable(getattr(obj, "set_timesteps", None)):
        return obj  # a scheduler without step (ScoreSdeVeScheduler): refused by name, with its reason
    raise TypeError(f"expected a diffusers pipeline (with .scheduler) or a scheduler, got {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------- steering


def _steer_x0(patch: _Patch, x0: torch.Tensor, t_frac: float) -> torch.Tensor:
    """``kds.steer_x0`` on the spatial view of x0 (the layout's), back in x0's layout, shape and dtype."""
    layout = patch.layout
    spatial = layout.to_spatial(x0)
    if not isinstance(spatial, torch.Tensor) or spatial.shape[0] != x0.shape[0]:
        raise ValueError(
            f"layout {layout!r}.to_spatial must keep the {x0.shape[0]} rows of shape {tuple(x0.shape)}, got "
            f"{tuple(spatial.shape) if isinstance(spatial, torch.Tensor) else type(spatial).__name__}"
        )
    steered = patch.kds.steer_x0(spatial, t_frac=t_frac)
    if steered is spatial:
        return x0  # nothing was steered (a schedule gave 0 for every item)
    back = layout.from_spatial(steered, x0)
    if not isinstance(back, torch.Tensor) or back.shape != x0.shape:
        raise ValueError(
            f"layout {layout!r}.from_spatial must return the shape {tuple(x0.shape)} it was given, got "
            f"{tuple(back.shape) if isinstance(back, torch.Tensor) else type(back).__name__}"
        )
    return back.to(x0.dtype)


def _steer_model_output(
    patch: _Patch, scheduler: Any, model_output: torch.Tensor, sample: torch.Tensor, a: float, b: float,
    t_frac: float, out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The model output (``out_dtype``, default its own; same layout) whose x0 is the steered x0."""
    mean, variance = _split_learned_variance(scheduler, model_output, sample)
    # float32 at least: a fp16 round trip x0 -> model output would lose what the steering added
    work = torch.promote_types(torch.promote_types(mean.dtype, sample.dtype), torch.float32)
    sample_w = sample.to(work)
    x0 = a * sample_w + b * mean.to(work)
    steered = _steer_x0(patch, x0, t_frac)
    new_mean = ((steered - a * sample_w) / b).to(out_dtype or mean.dtype)
    return new_mean if variance is None else torch.cat([new_mean, variance.to(new_mean.dtype)], dim=1)


def _split_learned_variance(scheduler: Any, model_output: torch.Tensor, sample: torch.Tensor):
    """(mean part, learned variance part or None): models with learned variance output 2*C channels."""
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    if learned and model_output.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:
        return model_output.split(sample.shape[1], dim=1)
    return model_output, None


def _steer_step(scheduler: Any, patch: _Patch, original: Callable, signature: inspect.Signature, *args, **kwargs):
    bound = signature.bind(scheduler, *args, **kwargs)  # names the arguments however the caller passed them
    call = bound.arguments
    kds, spec = patch.kds, patch.spec
    t_frac = spec.t_frac(scheduler, call)
    if kds.strength_at(t_frac) == 0 or kds.num_particles == 1:
        _check_closed_gate_batch(kds, call["sample"], t_frac)
        return original(*args, **kwargs)
    if spec.x0_argument is not None and call.get(spec.x0_argument) is not None:
        call[spec.x0_argument] = _steer_x0(patch, call[spec.x0_argument], t_frac)  # the caller gave x0 itself
        return original(*bound.args[1:], **bound.kwargs)
    a, b = spec.coefficients(scheduler, call)
    model_output = call["model_output"]
    # A step that computes in float32 and casts its result to model_output.dtype gets the steered model output
    # in float32, and its result is cast back here: the x0 it continues from is then not rounded to 16 bits.
    upcast = spec.float32_step and model_output.dtype in _LOW_PRECISION
    call["model_output"] = _steer_model_output(
        patch, scheduler, model_output, call["sample"], a, b, t_frac, torch.float32 if upcast else None
    )
    result = original(*bound.args[1:], **bound.kwargs)  # without self: original is bound
    return _cast_prev_sample(result, model_output.dtype) if upcast else result


def _cast_prev_sample(result: Any, dtype: torch.dtype) -> Any:
    if isinstance(result, tuple):
        return (result[0].to(dtype),) + tuple(result[1:])
    result.prev_sample = result.prev_sample.to(dtype)  # BaseOutput keeps its attribute and its mapping in step
    return result


def _steer_convert_model_output(
    scheduler: Any, patch: _Patch, original: Callable, signature: inspect.Signature, model_output, *args, **kwargs
):
    bound = signature.bind_partial(scheduler, model_output, *args, **kwargs)
    sample = bound.arguments.get("sample")
    if sample is None and len(args) > 1:
        sample = args[1]  # the deprecated positional form (model_output, timestep, sample)
    if sample is None or scheduler.step_index is None:
        return original(model_output, *args, **kwargs)  # not called from step: diffusers decides what happens
    kds, spec = patch.kds, patch.spec
    call = {"model_output": model_output, "sample": sample}
    t_frac = spec.t_frac(scheduler, call)
    if kds.strength_at(t_frac) == 0 or kds.num_particles == 1:
        _check_closed_gate_batch(kds, sample, t_frac)
        return original(model_output, *args, **kwargs)
    a, b = spec.coefficients(scheduler, call)
    return original(_steer_model_output(patch, scheduler, model_output, sample, a, b, t_frac), *args, **kwargs)


def _check_closed_gate_batch(kds: KDS, sample: torch.Tensor, t_frac: float) -> None:
    # steer_x0 validates the particle batch and records the step even when the gate is closed; it returns its
    # input untouched there, so nothing is computed and the scheduler's own path runs.
    kds.steer_x0(sample, t_frac=t_frac, strength=0.0)
