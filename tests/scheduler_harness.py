"""A pipeline-like denoising loop for bare diffusers schedulers, with an exact analytic model of every family.

The "model" is the exact denoiser of a per-pixel Gaussian mixture (two modes in channel space), so predictions
have a realistic scale and particles cluster. It answers in the scheduler's own terms: VP (the model input of
the Euler/Heun family is the VP-scaled sample), flow matching (v = noise - x0), EDM preconditioning (F with
x0 = c_skip * x + c_out * F). ``step_and_x0`` takes one step and reads back the x0 the scheduler continued from,
from the step's own output (or the stored multistep entry).
"""

from __future__ import annotations

import copy
import inspect
import math
import types
from typing import Dict, Tuple

import pytest
import torch

import diffusers
from kds_hook import KDS
from kds_hook.analytic import GaussianMixture
from kds_hook.diffusers import SUPPORTED_SCHEDULERS

# diffusers' own deprecations and warnings (numpy 2 on its torch sigmas, the deprecated "dpmsolver" algorithm,
# torchsde's Brownian tree at sigma_min) are not ours to see; small float64 tensors run on one thread.
MARKS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
    pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Should have:UserWarning:torchsde"),
    pytest.mark.usefixtures("one_torch_thread"),
]

N = 3  # particles per item
ITEMS = 2
SHAPE = (2, 4, 3)  # channels, height, width: width 3 leaves a smaller last tile for patch_size 2
STEPS = 6
BANDWIDTH = 0.5
MIXTURE = GaussianMixture(means=[[-1.0, -1.0], [1.0, 1.0]], stds=[0.3, 0.3], weights=[0.6, 0.4])

# id -> (class name, constructor config); prediction types are crossed with these by ``cases``.
CONFIGS: Dict[str, Tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "sde_dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_3": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "single_dpmpp": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "single_dpm": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "single_sde_dpmpp": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_eps": ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    "deis": ("DEISMultistepScheduler", {}),
    "sa": ("SASolverScheduler", {}),
    "sa_noise": ("SASolverScheduler", {"algorithm_type": "noise_prediction"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "edm_euler": ("EDMEulerScheduler", {}),
    "edm_dpmpp": ("EDMDPMSolverMultistepScheduler", {}),
    "edm_sde_dpmpp": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "cosine_dpm": ("CosineDPMSolverMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "flow_euler_sde": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_lcm": ("FlowMatchLCMScheduler", {"shift": 2.0}),
    "ltx_rf": ("LTXEulerAncestralRFScheduler", {"eta": 0.0}),
    "cogvideox_ddim": ("CogVideoXDDIMScheduler", {"clip_sample": False}),
    "cogvideox_dpm": ("CogVideoXDPMScheduler", {"clip_sample": False}),
    "cm": ("CMStochasticIterativeScheduler", {"clip_denoised": False}),
    "scm": ("SCMScheduler", {}),
}


def has_prediction_type(cls_name: str) -> bool:
    return "prediction_type" in inspect.signature(getattr(diffusers, cls_name).__init__).parameters


def stores_eps(config) -> bool:
    """Noise-prediction solvers keep eps in their history (``config``: a scheduler config or a constructor dict)."""
    get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
    return get("algorithm_type", None) in ("dpmsolver", "noise_prediction") or not get("predict_x0", True)


def cases():
    """(id, name, prediction, extra config) for every config x supported prediction type."""
    for name, (cls, config) in CONFIGS.items():
        if not has_prediction_type(cls) or cls == "SCMScheduler":  # one kind of model output only
            yield f"{name}", name, None, {}
            continue
        for prediction in SUPPORTED_SCHEDULERS[cls].prediction_types:
            extra = {}
            if prediction == "flow_prediction":
                if stores_eps(config):
                    continue  # diffusers has no flow x0 for noise-prediction algorithms
                extra = {"use_flow_sigmas": True, "flow_shift": 2.0}
            yield f"{name}-{prediction}", name, prediction, extra


_BUILT: Dict[tuple, object] = {}


def make(name: str, prediction: str | None = None, **extra):
    """A fresh scheduler (a deep copy of one built once: KDPM2's constructor alone takes most of a second)."""
    cls_name, config = CONFIGS[name]
    if not has_prediction_type(cls_name):
        prediction = None
    kwargs = {**config, **extra}
    if prediction is not None:
        kwargs["prediction_type"] = prediction
    key = (cls_name, repr(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = getattr(diffusers, cls_name)(**kwargs)
    return copy.deepcopy(_BUILT[key])


def family(scheduler) -> str:
    return SUPPORTED_SCHEDULERS[base_name(scheduler)].family


def base_name(scheduler) -> str:
    return next(c.__name__ for c in type(scheduler).__mro__ if c.__name__ in SUPPORTED_SCHEDULERS)


def prediction_of(scheduler) -> str:
    return getattr(scheduler.config, "prediction_type", SUPPORTED_SCHEDULERS[base_name(scheduler)].prediction_types[0])


def denoise(x_ve: torch.Tensor, sigma) -> torch.Tensor:
    """E[x0 | x0 + sigma * eps = x_ve], per pixel (channels are the mixture's dimensions)."""
    pixels = x_ve.movedim(1, -1)
    x0 = MIXTURE.denoise(pixels.reshape(-1, x_ve.shape[1]).double(), float(sigma)).reshape(pixels.shape)
    return x0.movedim(-1, 1).to(x_ve.dtype)


def model(scheduler, x_in: torch.Tensor, t) -> torch.Tensor:
    """The exact prediction, of the scheduler's type, for the model input ``x_in`` at timestep ``t``."""
    prediction = prediction_of(scheduler)
    kind = family(scheduler)
    if prediction == "consistency":  # x0 = c_skip x + c_out F at sigma = exp(t / 250); x_in = x / sqrt(sigma^2 + sd^2)
        sigma = math.exp(float(t) / 250)
        x = x_in * (sigma**2 + scheduler.config.sigma_data**2) ** 0.5
        c_skip, c_out = (float(c) for c in scheduler.get_scalings_for_boundary_condition(torch.tensor(sigma)))
        return (denoise(x, sigma) - c_skip * x) / c_out if c_out else torch.zeros_like(x)
    if prediction == "trigflow":  # x = cos(s) x0 + sin(s) z with z of std sigma_data; pred_x0 = cos(s) x - sin(s) F
        angle = min(float(t), math.pi / 2 - 1e-4)
        x0 = denoise(x_in / math.cos(angle), scheduler.config.sigma_data * math.tan(angle))
        return (math.cos(angle) * x_in - x0) / math.sin(angle)
    if prediction == "flow_prediction":
        # x = (1 - s) x0 + s noise with s = t / T; clamped where s = 1 (the prior mean is then the answer)
        s = min(float(t) / scheduler.config.num_train_timesteps, 1 - 1e-4)
        x0 = denoise(x_in / (1 - s), s / (1 - s))
        return (x_in - x0) / s
    if kind in ("edm", "cosine"):
        sigma = math.exp(4 * float(t)) if kind == "edm" else math.tan(float(t) * math.pi / 2)
        sigma_data = scheduler.config.sigma_data
        x = x_in * (sigma**2 + sigma_data**2) ** 0.5  # undo c_in
        x0 = denoise(x, sigma)
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5 * (1 if prediction == "epsilon" else -1)
        return (x0 - c_skip * x) / c_out
    # VP: x_in = sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[t] (the Euler family's model input is that too)
    a = scheduler.alphas_cumprod[int(round(float(t)))].double()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x0 = denoise(x_in / alpha, sigma / alpha)
    eps = (x_in - alpha * x0) / sigma
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


def initial_noise(seed: int, items: int = ITEMS, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(items * N, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def step_kwargs(scheduler, seed: int) -> dict:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


def model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def start(scheduler, noise: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    if base_name(scheduler) == "SCMScheduler":
        scheduler.set_timesteps(steps, intermediate_timesteps=None)
    else:
        scheduler.set_timesteps(steps)
    scheduler._harness_old_x0 = None  # CogVideoXDPMScheduler's previous x0, which its pipeline passes back
    return noise * (getattr(scheduler, "init_noise_sigma", None) or 1.0)


def timesteps(scheduler) -> torch.Tensor:
    """The timesteps a pipeline evaluates the model at (sCM's schedule ends with its final angle 0)."""
    return scheduler.timesteps[:-1] if base_name(scheduler) == "SCMScheduler" else scheduler.timesteps


def run_step(scheduler, out: torch.Tensor, t, x: torch.Tensor, **kwargs):
    """scheduler.step as pipelines call it (CogVideoX's DPM also takes the previous x0 and timestep)."""
    if base_name(scheduler) != "CogVideoXDPMScheduler":
        return scheduler.step(out, t, x, **kwargs)
    index = int((scheduler.timesteps == t).nonzero()[0])
    back = scheduler.timesteps[index - 1] if index > 0 else None
    prev, x0 = scheduler.step(out, scheduler._harness_old_x0, t, back, x, return_dict=False, **kwargs)
    scheduler._harness_old_x0 = x0
    return types.SimpleNamespace(prev_sample=prev, pred_original_sample=x0)


def sample(scheduler, noise: torch.Tensor, seed: int = 0, steps: int = STEPS) -> torch.Tensor:
    """A pipeline's denoising loop (one generator for the whole run, as pipelines pass it)."""
    x = start(scheduler, noise, steps)
    kwargs = step_kwargs(scheduler, seed)
    for t in timesteps(scheduler):
        out = model(scheduler, model_input(scheduler, x, t), t)
        x = run_step(scheduler, out, t, x, **kwargs).prev_sample
    return x


def kds(**options) -> KDS:
    options.setdefault("num_particles", N)
    options.setdefault("bandwidth", BANDWIDTH)
    return KDS(**options)


def particle_spread(x: torch.Tensor) -> torch.Tensor:
    """Per item, the mean squared distance of its particles to their mean."""
    grouped = x.reshape(-1, N, *x.shape[1:]).double()
    return (grouped - grouped.mean(1, keepdim=True)).square().flatten(2).sum(-1).mean(1)


def patched_method(scheduler) -> str:
    return SUPPORTED_SCHEDULERS[base_name(scheduler)].method


# --------------------------------------------------------------------------------- reading x0 back


def stored_x0(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The x0 held in the multistep history for the step just taken (noise-prediction solvers store eps)."""
    stored = scheduler.model_outputs[-1]
    if base_name(scheduler) != "DEISMultistepScheduler" and not stores_eps(scheduler.config):
        return stored
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
    return (x - sigma * stored) / alpha


def step_and_x0(scheduler, t, x: torch.Tensor, out: torch.Tensor, seed: int = 0):
    """One step; returns (the x0 the scheduler continued from, prev_sample, whether it was a first-order call)."""
    name = base_name(scheduler)
    first_order = getattr(scheduler, "state_in_first_order", True)
    saved = [getattr(scheduler, a, None) for a in ("sample", "prev_derivative", "dt")]
    saved_sample, saved_derivative, saved_dt = saved
    result = run_step(scheduler, out, t, x, **step_kwargs(scheduler, seed))
    prev = result.prev_sample
    index = getattr(scheduler, "step_index", None) and scheduler.step_index - 1
    if patched_method(scheduler) == "convert_model_output":
        return stored_x0(scheduler, x), prev, first_order
    if getattr(result, "pred_original_sample", None) is not None:
        return result.pred_original_sample, prev, first_order
    if name == "LCMScheduler":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        return (result.denoised - c_skip * x) / c_out, prev, first_order
    if name == "TCDScheduler":
        # pred_noised = alpha_s x0 + sigma_s eps with eps = (x - alpha_t x0) / sigma_t
        prev_t = scheduler.timesteps[index + 1] if index + 1 < len(scheduler.timesteps) else torch.tensor(0)
        s = torch.floor((1 - 0.3) * prev_t).long()  # TCD's default eta (gamma) of 0.3
        a_t, a_s = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[s].double()
        alpha_t, sigma_t, alpha_s, sigma_s = a_t.sqrt(), (1 - a_t).sqrt(), a_s.sqrt(), (1 - a_s).sqrt()
        x0 = (result.pred_noised_sample - sigma_s / sigma_t * x) / (alpha_s - sigma_s * alpha_t / sigma_t)
        return x0, prev, first_order
    if name == "FlowMatchEulerDiscreteScheduler" and not scheduler.config.stochastic_sampling:
        sigma, sigma_next = scheduler.sigmas[index].double(), scheduler.sigmas[index + 1].double()
        v = (prev.double() - x.double()) / (sigma_next - sigma)
        return x.double() - sigma * v, prev, first_order
    if name == "FlowMatchEulerDiscreteScheduler":  # stochastic: prev = (1 - sigma_next) x0 + sigma_next noise
        noise = torch.randn(x.shape, generator=step_kwargs(scheduler, seed)["generator"], dtype=torch.float32)
        sigma_next = scheduler.sigmas[index + 1].double()
        return (prev.double() - sigma_next * noise.double()) / (1 - sigma_next), prev, first_order
    if name == "FlowMatchLCMScheduler":  # prev = (1 - sigma_next) x0 + sigma_next noise, noise in x0's dtype
        dtype = torch.promote_types(torch.float32, out.dtype)
        noise = torch.randn(x.shape, generator=step_kwargs(scheduler, seed)["generator"], dtype=dtype)
        sigma_next = scheduler.sigmas[index + 1].double()
        return (prev.double() - sigma_next * noise.double()) / (1 - sigma_next), prev, first_order
    if name == "LTXEulerAncestralRFScheduler":  # eta = 0: prev = r x + (1 - r) x0 with r = sigma_next / sigma
        r = scheduler.sigmas[index + 1].double() / scheduler.sigmas[index].double()
        return (prev.double() - r * x.double()) / (1 - r), prev, first_order
    if name == "CMStochasticIterativeScheduler":  # prev = x0 + noise * sqrt(sigma_hat^2 - sigma_min^2)
        noise = torch.randn(x.shape, generator=step_kwargs(scheduler, seed)["generator"], dtype=out.dtype)
        sigma_min, sigma_max = scheduler.config.sigma_min, scheduler.config.sigma_max
        sigma_hat = scheduler.sigmas[min(index + 1, len(scheduler.sigmas) - 1)].clamp(sigma_min, sigma_max)
        return prev - noise * (sigma_hat**2 - sigma_min**2) ** 0.5, prev, first_order
    if name == "FlowMatchHeunDiscreteScheduler":
        sigma = scheduler.sigmas[index].double()
        if first_order:  # prev = x + (sigma_next - sigma) * v
            v = (prev.double() - x.double()) / (scheduler.sigmas[index + 1].double() - sigma)
        else:  # prev = x_saved + dt * (d1 + d2) / 2
            v = 2 * (prev.double() - saved_sample.double()) / saved_dt.double() - saved_derivative.double()
        return x.double() - sigma * v, prev, first_order
    raise NotImplementedError(name)


# steps that compute in float32 whatever the input dtype: their x0 has float32 precision
FLOAT32_STEPS = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "EDMEulerScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
    "LTXEulerAncestralRFScheduler",
}


def tolerance(scheduler) -> float:
    name = base_name(scheduler)
    if name in FLOAT32_STEPS:
        return 1e-5
    if name == "TCDScheduler":  # x0 recovered from pred_noised_sample through float32 alphas
        return 1e-7
    return 1e-9
