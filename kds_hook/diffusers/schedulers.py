"""Which diffusers schedulers KDS steers, how each forms its x0, and why the others are refused.

Every entry of :data:`SUPPORTED_SCHEDULERS` names the instance method that gets wrapped and two functions of the
call: ``t_frac(scheduler, call)``, the gate's t/T, and ``coefficients(scheduler, call)``, the (a, b) of
``x0 = a * sample + b * model_output`` for this very call (``call`` holds the wrapped method's arguments by name:
``model_output``, ``sample``, and for ``step`` also ``timestep`` and the rest). ``coefficients`` is called only
where the gate is open, and raises ``ValueError`` for call options that change the sample inside the method
before the x0 is formed (churn noise) or give it no single noise level (per-token timesteps).

:data:`UNSUPPORTED_SCHEDULERS` holds the reason for every other scheduler class diffusers exports; both tables
are what ``scripts/scheduler_table.py`` renders into docs/diffusers-schedulers.md. Nothing here imports diffusers:
schedulers are recognised by class name and configuration.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .x0 import (
    Coefficients,
    edm_coefficients,
    edm_t_frac,
    flow_coefficients,
    one_value,
    ve_coefficients,
    vp_coefficients,
)

__all__ = ["SUPPORTED_SCHEDULERS", "UNSUPPORTED_SCHEDULERS", "SchedulerSpec", "T_FRAC_RULES", "check_supported"]

Call = Dict[str, Any]

_VP = ("epsilon", "v_prediction", "sample")
_VP_FLOW = _VP + ("flow_prediction",)
_NO_SAMPLE = ("epsilon", "v_prediction")  # diffusers raises for "sample" in these
_FLOW = ("flow_prediction",)  # flow-matching schedulers have no prediction_type: their model predicts v
_CONSISTENCY = ("consistency",)  # no prediction_type either: x0 = c_skip * sample + c_out * F

#: What t/T means for each family (keys of ``SchedulerSpec.family``).
T_FRAC_RULES: Dict[str, str] = {
    "vp": "t/T = timestep / num_train_timesteps (the training timestep of this evaluation; the paper's t/T)",
    "flow": "t/T = sigma (the flow-matching time after the schedule's shift; timestep = sigma * num_train_timesteps)",
    "solver": "t/T = timestep / num_train_timesteps; with use_flow_sigmas=True, t/T = sigma",
    "edm": "t/T = sigma / (sigma + sigma_data) (the flow time at the same signal-to-noise ratio; no training timestep)",
    "cosine": "t/T = the scheduler's own timestep, 2/pi * atan(sigma), in [0, 1)",
    "trigflow": "t/T = sin(s) / (sin(s) + cos(s)) for the angle s: the flow time the model itself is given",
}


class SchedulerSpec(NamedTuple):
    """How one scheduler class is steered (the values of :data:`SUPPORTED_SCHEDULERS`)."""

    method: str  # the instance method that gets wrapped: "step" or "convert_model_output"
    prediction_types: Tuple[str, ...]  # config.prediction_type values; ("flow_prediction",) for flow matching
    algorithm_types: Optional[Tuple[str, ...]]  # config.algorithm_type values, None where there is no such option
    family: str  # key of T_FRAC_RULES: how t/T is read
    t_frac: Callable[[Any, Call], float]
    coefficients: Callable[[Any, Call], Coefficients]
    check: Optional[Callable[[Any], Optional[str]]] = None  # a configuration it cannot steer -> the reason
    evaluations: str = "one"  # "both": a second-order sampler, whose two evaluations per step are both steered
    float32_step: bool = False  # step upcasts the sample to float32 and casts prev_sample to model_output.dtype
    x0_argument: Optional[str] = None  # a step argument that, when given, *is* the x0 (and the model output unused)
    notes: str = ""


# ------------------------------------------------------------------------------------------- shared pieces


def _prediction(scheduler: Any) -> str:
    return scheduler.config.prediction_type


def _index(scheduler: Any, call: Call) -> int:
    """The step index of this call, initialised as the original ``step`` does first (it then finds it set)."""
    if scheduler.step_index is None:
        scheduler._init_step_index(call["timestep"])
    return scheduler.step_index


def _timestep_t_frac(scheduler: Any, call: Call) -> float:
    return one_value(call["timestep"], "timestep") / scheduler.config.num_train_timesteps


def _alphas_cumprod_coefficients(scheduler: Any, call: Call) -> Coefficients:
    alpha_bar = scheduler.alphas_cumprod[int(one_value(call["timestep"], "timestep"))]
    return vp_coefficients(_prediction(scheduler), alpha_bar**0.5, (1 - alpha_bar) ** 0.5)  # as DDIM writes it


def _refuse_churn(name: str, gamma_positive: bool) -> None:
    if gamma_positive:
        # the churn noise is drawn inside step and changes the sample the x0 is computed from
        raise ValueError(f"KDS with {name} supports s_churn=0 only (on steered steps)")


def _churns(call: Call, sigma: torch.Tensor) -> bool:
    s_churn = call.get("s_churn", 0.0)
    return s_churn > 0 and call.get("s_tmin", 0.0) <= sigma <= call.get("s_tmax", float("inf"))


# ------------------------------------------------------------------------------------------- VP, step


def _euler_coefficients(scheduler: Any, call: Call) -> Coefficients:
    sigma = scheduler.sigmas[_index(scheduler, call)]
    _refuse_churn("EulerDiscreteScheduler", _churns(call, sigma))
    return ve_coefficients(_prediction(scheduler), sigma)


def _ve_coefficients(scheduler: Any, call: Call) -> Coefficients:
    """At ``sigmas[step_index]``: Euler ancestral, LMS, and both of Heun's evaluations (its sigmas are doubled)."""
    return ve_coefficients(_prediction(scheduler), scheduler.sigmas[_index(scheduler, call)])


def _kdpm2_coefficients(scheduler: Any, call: Call) -> Coefficients:
    index = _index(scheduler, call)  # the second evaluation is at the interpolated (geometric mean) sigma
    sigma = scheduler.sigmas[index] if scheduler.state_in_first_order else scheduler.sigmas_interpol[index]
    return ve_coefficients(_prediction(scheduler), sigma)


def _kdpm2_ancestral_coefficients(scheduler: Any, call: Call) -> Coefficients:
    index = _index(scheduler, call)
    sigma = scheduler.sigmas[index] if scheduler.state_in_first_order else scheduler.sigmas_interpol[index - 1]
    return ve_coefficients(_prediction(scheduler), sigma)


def _dpm_sde_coefficients(scheduler: Any, call: Call) -> Coefficients:
    index = _index(scheduler, call)
    if scheduler.state_in_first_order:
        sigma = scheduler.sigmas[index]
    else:  # the midpoint in log-sigma, computed with the very operations DPMSolverSDEScheduler.step uses
        t, t_next = scheduler.sigmas[index - 1].log().neg(), scheduler.sigmas[index].log().neg()
        sigma = (t + (t_next - t) * 0.5).neg().exp()
    return ve_coefficients(_prediction(scheduler), sigma)


# ------------------------------------------------------------------------------------------- flow matching, step


def _flow_sigma(scheduler: Any, call: Call) -> torch.Tensor:
    return scheduler.sigmas[_index(scheduler, call)]


def _flow_match_euler_t_frac(scheduler: Any, call: Call) -> float:
    sigma = float(_flow_sigma(scheduler, call))
    # invert_sigmas (Mochi): the schedule runs from 0 (noise) to 1 (data), so the noise level is 1 - sigma
    return 1.0 - sigma if scheduler.config.invert_sigmas else sigma


def _flow_match_euler_coefficients(scheduler: Any, call: Call) -> Coefficients:
    if call.get("per_token_timesteps") is not None:
        raise ValueError(
            "KDS cannot steer FlowMatchEulerDiscreteScheduler.step with per_token_timesteps: each token has its own "
            "noise level, so there is no one x0 and t/T per step (leave the gate closed there, e.g. threshold > 1)"
        )
    sigma = _flow_sigma(scheduler, call)
    if scheduler.config.invert_sigmas:
        # x = s * x0 + (1 - s) * noise and v = x0 - noise: one Euler step to s = 1 reaches x + (1 - s) * v
        return 1.0, float(1.0 - sigma)
    return flow_coefficients(sigma)


def _flow_match_euler_check(scheduler: Any) -> Optional[str]:
    config = scheduler.config
    if config.invert_sigmas and config.stochastic_sampling:
        # diffusers' stochastic step forms x0 = sample - sigma * v, which assumes sigmas that are not inverted
        return "invert_sigmas=True with stochastic_sampling=True (its x0 assumes sigmas that are not inverted)"
    return None


def _flow_match_heun_coefficients(scheduler: Any, call: Call) -> Coefficients:
    index = _index(scheduler, call)
    churn_sigma = scheduler.sigmas[index if scheduler.state_in_first_order else index - 1]
    _refuse_churn("FlowMatchHeunDiscreteScheduler", _churns(call, churn_sigma))
    return flow_coefficients(scheduler.sigmas[index])  # sigma on the first evaluation, sigma_next on the second


def _flow_sigma_t_frac(scheduler: Any, call: Call) -> float:
    return float(_flow_sigma(scheduler, call))


def _flow_sigma_coefficients(scheduler: Any, call: Call) -> Coefficients:
    return flow_coefficients(_flow_sigma(scheduler, call))


# ------------------------------------------------------------------------------------------- EDM


def _edm_sigma(scheduler: Any, call: Call) -> torch.Tensor:
    index = _index(scheduler, call) if "timestep" in call else scheduler.step_index
    return scheduler.sigmas[index]


def _edm_t_frac(scheduler: Any, call: Call) -> float:
    return edm_t_frac(_edm_sigma(scheduler, call), scheduler.config.sigma_data)


def _edm_coefficients(scheduler: Any, call: Call) -> Coefficients:
    return edm_coefficients(_prediction(scheduler), _edm_sigma(scheduler, call), scheduler.config.sigma_data)


def _edm_euler_coefficients(scheduler: Any, call: Call) -> Coefficients:
    sigma = _edm_sigma(scheduler, call)
    _refuse_churn("EDMEulerScheduler", _churns(call, sigma))
    return edm_coefficients(_prediction(scheduler), sigma, scheduler.config.sigma_data)


def _cosine_t_frac(scheduler: Any, call: Call) -> float:
    return one_value(scheduler.timesteps[scheduler.step_index], "timestep")


def _consistency_coefficients(scheduler: Any, call: Call) -> Coefficients:
    # denoised = c_out * model_output + c_skip * sample, with the scheduler's own boundary-condition scalings
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition(_edm_sigma(scheduler, call))
    return float(c_skip), float(c_out)


# ------------------------------------------------------------------------------------------- sCM (trigflow)


def _trigflow_angle(scheduler: Any, call: Call) -> torch.Tensor:
    return scheduler.timesteps[_index(scheduler, call)]


def _trigflow_t_frac(scheduler: Any, call: Call) -> float:
    angle = float(_trigflow_angle(scheduler, call))
    # x = cos(s) x0 + sin(s) z: sigma / sigma_data = tan(s), and Sana-Sprint gives its model this very flow time
    return math.sin(angle) / (math.sin(angle) + math.cos(angle))


def _trigflow_coefficients(scheduler: Any, call: Call) -> Coefficients:
    angle = _trigflow_angle(scheduler, call)
    return float(torch.cos(angle)), -float(torch.sin(angle))  # pred_x0 = cos(s) * sample - sin(s) * F


# ------------------------------------------------------------------------------------------- multistep solvers


def _solver_t_frac(scheduler: Any, call: Call) -> float:
    index = scheduler.step_index
    if getattr(scheduler.config, "use_flow_sigmas", False):
        return float(scheduler.sigmas[index])
    return one_value(scheduler.timesteps[index], "timestep") / scheduler.config.num_train_timesteps


def _stores_eps(scheduler: Any) -> bool:
    """Noise-prediction solvers keep eps in their history, computed from v as ``alpha * v + sigma * sample``."""
    config = scheduler.config
    return getattr(config, "algorithm_type", None) in ("dpmsolver", "noise_prediction") or not getattr(
        config, "predict_x0", True
    )


def _solver_coefficients(scheduler: Any, call: Call) -> Coefficients:
    sigma = scheduler.sigmas[scheduler.step_index]
    prediction = _prediction(scheduler)
    if prediction == "flow_prediction":
        return flow_coefficients(sigma)
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
    return vp_coefficients(prediction, alpha_t, sigma_t, implied_by_eps=_stores_eps(scheduler))


def _solver_check(scheduler: Any) -> Optional[str]:
    config = scheduler.config
    flow_sigmas = bool(getattr(config, "use_flow_sigmas", False))
    flow_prediction = config.prediction_type == "flow_prediction"
    if flow_prediction and not flow_sigmas:
        return "prediction_type='flow_prediction' without use_flow_sigmas=True (flow predictions need flow sigmas)"
    if flow_sigmas and not flow_prediction:
        return f"use_flow_sigmas=True with prediction_type={config.prediction_type!r} (use 'flow_prediction')"
    if flow_prediction and _stores_eps(scheduler):
        return "prediction_type='flow_prediction' with a noise-prediction algorithm (diffusers has no such x0)"
    if getattr(scheduler, "solver_p", None) is not None:
        # UniPC's external predictor gets the raw model output, which would bypass the steering
        return "solver_p set (its predictor would get the unsteered model output); leave solver_p=None"
    return None


# ------------------------------------------------------------------------------------------- the registry

_FLOW_SOLVER = "flow_prediction with use_flow_sigmas=True and a data-prediction algorithm"


SUPPORTED_SCHEDULERS: Dict[str, SchedulerSpec] = {
    "DDIMScheduler": SchedulerSpec("step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients),
    "DDPMScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients,
        notes="learned variance (2C output channels): only the mean half is steered",
    ),
    "EulerDiscreteScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _euler_coefficients, float32_step=True,
        notes="s_churn > 0 refused on steered steps",
    ),
    # diffusers itself has no "sample" prediction for the ancestral Euler sampler.
    "EulerAncestralDiscreteScheduler": SchedulerSpec(
        "step", _NO_SAMPLE, None, "vp", _timestep_t_frac, _ve_coefficients
    ),
    # sde-dpmsolver (deprecated in diffusers) is left out: it diverges at few steps even without KDS.
    "DPMSolverMultistepScheduler": SchedulerSpec(
        "convert_model_output", _VP_FLOW, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"), "solver",
        _solver_t_frac, _solver_coefficients, _solver_check, notes=_FLOW_SOLVER,
    ),
    "DPMSolverSinglestepScheduler": SchedulerSpec(
        "convert_model_output", _VP_FLOW, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"), "solver",
        _solver_t_frac, _solver_coefficients, _solver_check,
        notes="the intermediate evaluations of orders 2 and 3 are steered too (Alg. 5); " + _FLOW_SOLVER,
    ),
    "UniPCMultistepScheduler": SchedulerSpec(
        "convert_model_output", _VP_FLOW, None, "solver", _solver_t_frac, _solver_coefficients, _solver_check,
        notes="the corrector uses the steered entry; solver_p refused; " + _FLOW_SOLVER,
    ),
    "DEISMultistepScheduler": SchedulerSpec(
        "convert_model_output", _VP_FLOW, None, "solver", _solver_t_frac, _solver_coefficients, _solver_check,
        notes="the history holds the eps of the steered x0; " + _FLOW_SOLVER,
    ),
    "SASolverScheduler": SchedulerSpec(
        "convert_model_output", _VP_FLOW, ("data_prediction", "noise_prediction"), "solver", _solver_t_frac,
        _solver_coefficients, _solver_check, notes="predictor and corrector use the steered entry; " + _FLOW_SOLVER,
    ),
    "HeunDiscreteScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _ve_coefficients, evaluations="both",
    ),
    "KDPM2DiscreteScheduler": SchedulerSpec(
        "step", _NO_SAMPLE, None, "vp", _timestep_t_frac, _kdpm2_coefficients, evaluations="both",
    ),
    "KDPM2AncestralDiscreteScheduler": SchedulerSpec(
        "step", _NO_SAMPLE, None, "vp", _timestep_t_frac, _kdpm2_ancestral_coefficients, evaluations="both",
    ),
    "DPMSolverSDEScheduler": SchedulerSpec(
        "step", _NO_SAMPLE, None, "vp", _timestep_t_frac, _dpm_sde_coefficients, evaluations="both",
    ),
    "LMSDiscreteScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _ve_coefficients,
        notes="the derivative history holds the steered x0's",
    ),
    "LCMScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients,
        notes="the model's x0 is steered, then clipped/thresholded and mixed by the boundary condition",
    ),
    "TCDScheduler": SchedulerSpec("step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients),
    "EDMEulerScheduler": SchedulerSpec(
        "step", _NO_SAMPLE, None, "edm", _edm_t_frac, _edm_euler_coefficients, float32_step=True,
        x0_argument="pred_original_sample",
        notes="a pred_original_sample passed to step is steered itself; s_churn > 0 refused on steered steps",
    ),
    "EDMDPMSolverMultistepScheduler": SchedulerSpec(
        "convert_model_output", _NO_SAMPLE, ("dpmsolver++", "sde-dpmsolver++"), "edm", _edm_t_frac,
        _edm_coefficients,
    ),
    "CosineDPMSolverMultistepScheduler": SchedulerSpec(
        "convert_model_output", _NO_SAMPLE, None, "cosine", _cosine_t_frac, _edm_coefficients,
    ),
    "CogVideoXDDIMScheduler": SchedulerSpec("step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients),
    "CogVideoXDPMScheduler": SchedulerSpec(
        "step", _VP, None, "vp", _timestep_t_frac, _alphas_cumprod_coefficients,
        notes="the pred_original_sample it returns (and the pipeline passes back as old_pred_original_sample) is "
        "the steered x0",
    ),
    "CMStochasticIterativeScheduler": SchedulerSpec(
        "step", _CONSISTENCY, None, "edm", _edm_t_frac, _consistency_coefficients,
        notes="x0 = c_skip * sample + c_out * F with its boundary-condition scalings, steered before clip_denoised",
    ),
    "SCMScheduler": SchedulerSpec(
        "step", ("trigflow",), None, "trigflow", _trigflow_t_frac, _trigflow_coefficients,
        notes="pred_x0 = cos(s) * sample - sin(s) * F",
    ),
    "FlowMatchLCMScheduler": SchedulerSpec(
        "step", _FLOW, None, "flow", _flow_sigma_t_frac, _flow_sigma_coefficients, float32_step=True,
        notes="x0 is steered before its optional upscaling (scale_factors)",
    ),
    "LTXEulerAncestralRFScheduler": SchedulerSpec(
        "step", _FLOW, None, "flow", _flow_sigma_t_frac, _flow_sigma_coefficients,
    ),
    "FlowMatchHeunDiscreteScheduler": SchedulerSpec(
        "step", _FLOW, None, "flow", _flow_sigma_t_frac, _flow_match_heun_coefficients, evaluations="both",
        float32_step=True, notes="s_churn > 0 refused on steered steps",
    ),
    "FlowMatchEulerDiscreteScheduler": SchedulerSpec(
        "step", _FLOW, None, "flow", _flow_match_euler_t_frac, _flow_match_euler_coefficients,
        _flow_match_euler_check, float32_step=True,
        notes="shift, dynamic shifting (mu), custom sigmas, stochastic_sampling, invert_sigmas; "
        "per_token_timesteps refused on steered steps",
    ),
}


_NO_X0 = "discrete tokens, no continuous x0 to steer"

#: Every other scheduler class diffusers exports, with the reason KDS does not steer it.
UNSUPPORTED_SCHEDULERS: Dict[str, str] = {
    "AmusedScheduler": f"masked-token generation over VQ codes: {_NO_X0}",
    "VQDiffusionScheduler": f"discrete diffusion over VQ codebook indices: {_NO_X0}",
    "BlockRefinementScheduler": f"block-wise refinement of discrete tokens (text diffusion): {_NO_X0}",
    "EntropyBoundScheduler": f"uniform-corruption process over discrete tokens: {_NO_X0}",
    "DiscreteDDIMScheduler": f"DDIM over a discrete state space (D3PM): {_NO_X0}",
    "DDIMInverseScheduler": "inversion: it runs from data to noise, where there is no sampling to steer",
    "DPMSolverMultistepInverseScheduler": "inversion: it runs from data to noise, where there is no sampling to steer",
    "DDIMParallelScheduler": (
        "made for ParaDiGMS, whose batch_step_no_noise denoises many timesteps in one call; in ordinary "
        "pipelines use DDIMScheduler (the same step)"
    ),
    "DDPMParallelScheduler": (
        "made for ParaDiGMS, whose batch_step_no_noise denoises many timesteps in one call; in ordinary "
        "pipelines use DDPMScheduler (the same step)"
    ),
    "KarrasVeScheduler": (
        "deprecated in diffusers (its pipeline is gone); step takes a churned sample_hat and sigma_hat from "
        "add_noise_to_input, outside the step KDS wraps"
    ),
    "ScoreSdeVeScheduler": (
        "predictor-corrector for score models: the Langevin corrector evaluates the model without advancing time "
        "and step_pred/step_correct take a score, not a prediction with one x0 per step"
    ),
    "PNDMScheduler": (
        "not supported: its Runge-Kutta warm-up and PLMS steps mix eps from several evaluations before any x0 is "
        "formed; use DDIMScheduler, DPMSolverMultistepScheduler or UniPCMultistepScheduler"
    ),
    "IPNDMScheduler": (
        "not supported: a linear multistep method on its own alpha/beta parametrisation that never forms an x0; "
        "use DPMSolverMultistepScheduler or UniPCMultistepScheduler"
    ),
    "RePaintScheduler": (
        "not supported: RePaint's resampling jumps (undo_step) re-noise to earlier times and its step merges the "
        "known region, so an evaluation's time and x0 are not the scheduler's alone"
    ),
    "UnCLIPScheduler": (
        "not supported: unCLIP's prior and decoder pass their own prev_timestep and learned-range variance; "
        "not mapped"
    ),
    "DDPMWuerstchenScheduler": (
        "not supported: Würstchen/Stable Cascade's continuous cosine schedule forms no x0 (it steps from eps "
        "directly); not mapped"
    ),
    "HeliosScheduler": (
        "multi-stage video sampling: stages change the latent resolution between evaluations and the step "
        "carries its own multistep state across stages; not mapped"
    ),
    "HeliosDMDScheduler": (
        "multi-stage distilled (DMD) video sampling whose step takes the stage's noisy tensors and sigmas from "
        "the pipeline; not mapped"
    ),
    "FlowMapEulerDiscreteScheduler": (
        "flow-map models predict the average velocity over [r, t] (a jump to any r), which is an x0 only when "
        "r = 0"
    ),
    "PiflowScheduler": (
        "the model outputs a policy (widened output) that the scheduler integrates over substeps: there is no "
        "single x0 per evaluation"
    ),
    "RFD4ProteinaScheduler": "protein structure generation with per-modality emit masks, not latent images",
    "MiniMaxH3Scheduler": (
        "not supported: new in diffusers 0.42 and not mapped yet (rectified flow with a data-ward velocity, "
        "x0 = x + (1 - t) v, formed in the sample's dtype)"
    ),
}


# ------------------------------------------------------------------------------------------- checks


def _supported_list() -> str:
    return ", ".join(SUPPORTED_SCHEDULERS)


def check_supported(scheduler: Any) -> Tuple[str, SchedulerSpec]:
    """The scheduler's supported (base) class name and spec; ValueError for anything KDS cannot steer correctly."""
    cls = type(scheduler)
    # Duck-typed: match by class name along the MRO, so diffusers is never imported. A subclass is accepted only
    # when it inherits the methods we rely on unchanged; otherwise we cannot know where its x0 comes from.
    base = next((c for c in cls.__mro__ if c.__name__ in SUPPORTED_SCHEDULERS), None)
    if base is None:
        known = [UNSUPPORTED_SCHEDULERS[c.__name__] for c in cls.__mro__ if c.__name__ in UNSUPPORTED_SCHEDULERS]
        reason = known[0] if known else None
        why = f". {cls.__name__} is refused: {reason}" if reason else " (a scheduler kds-hook does not know)"
        raise ValueError(f"KDS cannot steer {cls.__name__}; supported schedulers: {_supported_list()}{why}")
    name = base.__name__
    spec = SUPPORTED_SCHEDULERS[name]
    for method in {"step", spec.method}:
        if getattr(cls, method, None) is not getattr(base, method, None):
            raise ValueError(
                f"{cls.__name__} overrides {name}.{method}, so KDS cannot tell where its x0 prediction comes "
                f"from; use {name} itself (supported schedulers: {_supported_list()})"
            )
    config = scheduler.config
    # schedulers without the option (flow matching, consistency models) have the one kind of model output
    prediction = getattr(config, "prediction_type", spec.prediction_types[0])
    if prediction not in spec.prediction_types:
        raise ValueError(
            f"KDS cannot steer {name} with prediction_type={prediction!r}; supported prediction types for "
            f"it: {', '.join(spec.prediction_types)}"
        )
    if spec.algorithm_types is not None:
        algorithm = getattr(config, "algorithm_type", None)
        if algorithm not in spec.algorithm_types:
            raise ValueError(
                f"KDS cannot steer {name} with algorithm_type={algorithm!r}; supported: "
                f"{', '.join(spec.algorithm_types)}"
            )
    if getattr(config, "timestep_type", "discrete") != "discrete":
        # continuous timesteps are 0.25 * log(sigma), not training timesteps, so t/T would be meaningless
        raise ValueError(f"KDS needs {name} with timestep_type='discrete' (the gate reads t/T)")
    if spec.check is not None:
        reason = spec.check(scheduler)
        if reason is not None:
            raise ValueError(f"KDS cannot steer {name} with {reason}")
    return name, spec
