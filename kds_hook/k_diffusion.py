"""k-diffusion integration: steer every model evaluation of any k-diffusion sampler (duck-typed).

k-diffusion samplers call ``model(x, sigma, **extra_args)`` and expect the denoised x0, so KDS plugs in as a
model wrapper: :class:`KDSDenoiser` steers each prediction with :meth:`~kds_hook.KDS.steer_x0` and the sampler
continues from the steered x0 (Algorithm 2 for Euler/DDIM-like steps, Algorithm 5 for DPM-Solver++: every
model evaluation, intermediate stages included, is steered). :func:`sample` runs a sampler on N particles per
item and returns the selected particle. This module never imports k_diffusion: samplers are passed in as
functions and models are used through their methods.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Union

import torch
from torch import nn

from .kds import KDS, per_item_values

__all__ = ["KDSDenoiser", "SampleResult", "sample"]

SigmaToTFrac = Callable[[torch.Tensor], Union[float, torch.Tensor]]


class KDSDenoiser(nn.Module):
    """A k-diffusion denoiser whose x0 predictions are steered by KDS.

    ``KDSDenoiser(model, kds)(x, sigma, **extra_args)`` is
    ``kds.steer_x0(model(x, sigma, **extra_args), ...)`` with the gate evaluated at the current noise level.
    It is an ``nn.Module`` so that ``.to()``, ``.eval()`` and ``.half()`` reach the wrapped model; any other
    attribute (``get_sigmas``, ``sigma_to_t``, ``sigmas``, ...) is looked up on the wrapped model.

    How t/T is found, first match wins:
        1. ``sigma_to_t_frac``: a map from sigma (a tensor) to t/T, for any model; the gate (including a
           ``KDS(schedule=...)``) is evaluated at its value.
        2. ``sigma_threshold``: steer with ``kds.gate.strength`` while ``sigma >= sigma_threshold``, else not
           at all; for continuous-time models without a notion of training steps.
        3. ``kds.sigma_to_t_frac``, when the KDS was built with one.
        4. The first object with a ``sigma_to_t`` on ``model`` or down its ``inner_model`` chain (so
           ``KDSDenoiser(CFGDenoiser(CompVisDenoiser(...)))`` works), when it is a discrete schedule
           (k-diffusion's ``DiscreteSchedule`` wrappers: ``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser``,
           ``OpenAIDenoiser``, ``DiscreteVDDPMDenoiser``, ``CompVisVDenoiser``; duck-typed as ``sigma_to_t`` and
           a 1-D tensor ``sigmas``): ``t/T = sigma_to_t(sigma) / len(sigmas)``, exactly the timestep the network
           sees (respecting the wrapper's ``quantize``) divided by the number of training steps.
        Otherwise (no ``sigma_to_t``, or a continuous one such as ``VDenoiser``'s) construction raises
        ``ValueError``: there is no silent default.

    The wrapped model must not contain a ``KDSDenoiser`` already (that would steer twice; ``ValueError``).
    With classifier-free guidance, wrap the CFG denoiser (``KDSDenoiser(CFGDenoiser(model), kds)``) so that
    KDS steers the guided prediction, as in the paper's Algorithm 3.

    Args:
        model: a k-diffusion denoiser ``model(x, sigma, **extra_args) -> x0``, batch (B*N, ...).
        kds: the :class:`~kds_hook.KDS` configuration (particle count, bandwidth, gate).
        sigma_to_t_frac: optional map sigma -> t/T (see above); called with a 1-D tensor holding one sigma, or
            one per item, and returns t/T as a float or a tensor of the same length.
        sigma_threshold: optional noise level at and above which steering is on (see above).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        kds: KDS,
        *,
        sigma_to_t_frac: Optional[SigmaToTFrac] = None,
        sigma_threshold: Optional[float] = None,
    ):
        super().__init__()
        if not isinstance(kds, KDS):
            raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
        if not callable(model):
            raise TypeError(f"model must be a denoiser model(x, sigma, **extra_args), got {type(model).__name__}")
        if sigma_to_t_frac is not None and sigma_threshold is not None:
            raise ValueError("give either sigma_to_t_frac or sigma_threshold, not both: each decides the gate alone")
        if sigma_to_t_frac is not None and not callable(sigma_to_t_frac):
            raise TypeError("sigma_to_t_frac must be a callable sigma -> t/T")
        if sigma_threshold is not None:
            sigma_threshold = _check_sigma_threshold(sigma_threshold)
            if kds.gate.schedule is not None:
                raise ValueError(
                    "sigma_threshold gates with kds.gate.strength and cannot evaluate a KDS(schedule=...), which is "
                    "a function of t/T; give sigma_to_t_frac instead"
                )
        _refuse_nested_kds(model)
        self.inner_model = model
        self.kds = kds
        self.sigma_threshold = sigma_threshold
        if sigma_threshold is None and sigma_to_t_frac is None:
            sigma_to_t_frac = kds.sigma_to_t_frac if kds.sigma_to_t_frac is not None else _discrete_t_frac(model)
        self.sigma_to_t_frac = sigma_to_t_frac

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner_model", "kds") or name.startswith("__"):  # not set up yet (copy, unpickling)
                raise
            return getattr(self.inner_model, name)

    def extra_repr(self) -> str:
        gate = f"sigma_threshold={self.sigma_threshold}" if self.sigma_threshold is not None else "t/T gate"
        return f"{self.kds!r}, {gate}"

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        """The wrapped model's x0 prediction for (B*N, ...) particles, steered at noise level ``sigma``."""
        denoised = self.inner_model(x, sigma, **extra_args)
        if self.sigma_threshold is not None:
            return self.kds.steer_x0(denoised, strength=self._threshold_strength(sigma))
        return self.kds.steer_x0(denoised, t_frac=self._t_frac(torch.as_tensor(sigma, device=x.device), x.shape[0]))

    def _t_frac(self, sigma: torch.Tensor, rows: int) -> Union[float, torch.Tensor]:
        """t/T of every row, mapping one sigma per item: a discrete ``sigma_to_t`` costs O(T) per value, and a
        sampler passes the same sigma for all B*N rows."""
        flat = sigma.reshape(-1)
        if flat.numel() <= 1 or bool((flat == flat[0]).all()):
            return self.sigma_to_t_frac(flat[:1])
        num_particles = self.kds.local_particles  # this rank's share with a process group
        if flat.numel() != rows or rows % num_particles:
            return self.sigma_to_t_frac(flat)  # steer_x0 names the mismatch
        per_item = flat.reshape(-1, num_particles)
        if not bool((per_item == per_item[:, :1]).all()):
            raise ValueError("the N particles of one item must be at the same noise level sigma")
        t_frac = torch.as_tensor(self.sigma_to_t_frac(per_item[:, 0]))
        return t_frac.reshape(-1).repeat_interleave(num_particles)

    def _threshold_strength(self, sigma: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """kds.gate.strength where sigma >= sigma_threshold, else 0: a float, or one value per item."""
        rows = sigma.numel() if isinstance(sigma, torch.Tensor) else 1
        level = per_item_values(sigma, rows, self.kds.local_particles, "noise level sigma")
        on = self.kds.gate.strength
        if isinstance(level, torch.Tensor):
            return (level >= self.sigma_threshold).to(torch.float64) * on
        return on if level >= self.sigma_threshold else 0.0


class _DiscreteTFrac:
    """sigma -> t/T through a discrete schedule's own ``sigma_to_t`` and its number of training steps."""

    def __init__(self, schedule: Any):
        self.schedule = schedule

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        sigmas = self.schedule.sigmas
        return self.schedule.sigma_to_t(sigma.to(sigmas.device)) / len(sigmas)

    def __repr__(self) -> str:
        return f"{type(self.schedule).__name__}.sigma_to_t(sigma) / {len(self.schedule.sigmas)}"


def _discrete_t_frac(model: Any) -> _DiscreteTFrac:
    """t/T from the first object along the ``inner_model`` links that has a ``sigma_to_t``: it is the model's
    time map. It must be a discrete schedule (a 1-D ``sigmas`` tensor of the training noise levels)."""
    for current in _inner_model_chain(model):
        if not callable(getattr(current, "sigma_to_t", None)):
            continue
        sigmas = getattr(current, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 and len(sigmas) > 1:
            return _DiscreteTFrac(current)
        raise ValueError(
            f"{type(current).__name__} has sigma_to_t but no discrete schedule (a 1-D tensor sigmas of training "
            "noise levels): it is a continuous-time model, so t/T is yours to choose. Pass sigma_threshold=... "
            "(steer while sigma >= it) or sigma_to_t_frac=... (a map sigma -> t/T, such as its sigma_to_t when "
            "its t runs over [0, 1])"
        )
    raise ValueError(
        f"cannot find t/T for {type(model).__name__}: it is not a k-diffusion discrete-schedule model (no "
        "sigma_to_t and sigmas on it or its inner_model chain). For a continuous-time model pass "
        "sigma_threshold=... (steer while sigma >= it) or sigma_to_t_frac=... (a map sigma -> t/T)"
    )


def _inner_model_chain(model: Any) -> Iterator[Any]:
    """model, model.inner_model, model.inner_model.inner_model, ... (k-diffusion's wrapper convention)."""
    seen, current = set(), model
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = getattr(current, "inner_model", None)


def _refuse_nested_kds(model: Any) -> None:
    """A KDSDenoiser inside the wrapped model would steer every evaluation twice."""
    for depth, current in enumerate(_inner_model_chain(model)):
        if isinstance(current, KDSDenoiser):
            where = "model" + ".inner_model" * depth
            raise ValueError(
                f"{where} is already a KDSDenoiser: wrapping it again would steer every evaluation twice. "
                "Wrap KDS once, outermost (for CFG: KDSDenoiser(CFGDenoiser(model)), which steers the guided "
                "prediction); sample() accepts a KDSDenoiser as its model and does not wrap it again"
            )


def _check_sigma_threshold(value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"sigma_threshold must be a number (a noise level sigma), got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"sigma_threshold must be a non-negative noise level, got {value}")
    return float(value)


class SampleResult(NamedTuple):
    """What :func:`sample` returns with ``return_all=True``.

    ``sample``: the selected particle per item (B, ...); ``index``: its particle index in 0..N-1 (B,);
    ``particles``: every particle's final state (B*N, ...); ``info``: the sampler's extra return value
    (``sample_dpm_adaptive(..., return_info=True)``), else None.
    """

    sample: torch.Tensor
    index: torch.Tensor
    particles: torch.Tensor
    info: Optional[Dict[str, Any]]


def sample(
    sampler: Callable[..., Any],
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Optional[torch.Tensor],
    kds: KDS,
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    return_all: bool = False,
    **sampler_kwargs: Any,
) -> Union[torch.Tensor, tuple, SampleResult]:
    """Runs a k-diffusion sampler on N particles per item with KDS and returns one sample per item.

    Args:
        sampler: a k-diffusion sampling function such as ``k_diffusion.sampling.sample_dpmpp_2m`` (names are
            not accepted: kds_hook does not import k_diffusion).
        model: a k-diffusion denoiser; wrapped in :class:`KDSDenoiser` unless it already is one (build the
            wrapper yourself to pass ``sigma_threshold`` or ``sigma_to_t_frac`` for a continuous-time model).
            With CFG pass ``KDSDenoiser(CFGDenoiser(...), kds)`` or the CFG denoiser itself, never a CFG
            denoiser around a ``KDSDenoiser`` (refused: it would steer twice, and not the guided prediction).
        x: the initial noise of every particle, shape (B*N, ...), already scaled as the sampler expects
            (``torch.randn(B * N, ...) * sigmas[0]``); rows ``b*N ... b*N+N-1`` are item b's N particles.
            The particles need different noise: from identical noise a deterministic sampler would keep them
            identical and KDS would have nothing to steer. Passing the same ``x`` to the plain sampler gives
            the paired baseline.
        sigmas: the noise levels, for samplers that take ``sigmas``. For ``sample_dpm_fast`` and
            ``sample_dpm_adaptive``, which take ``sigma_min``/``sigma_max`` (and ``n``) instead, whatever of
            those is missing from ``sampler_kwargs`` is derived from ``sigmas``: ``sigma_min`` = the smallest
            positive sigma, ``sigma_max`` = the largest, ``n`` (model evaluations) = ``len(sigmas) - 1``.
            Pass ``sigmas=None`` to give them all explicitly.
        kds: the KDS configuration; ``kds.num_particles`` is N. With ``KDS(process_group=...)`` every rank calls
            ``sample`` with its own share of every item's particles (see below).
        extra_args: the model's keyword arguments. Tensors (also inside dicts, lists and tuples) whose first
            dim is B are repeated to B*N with ``repeat_interleave`` (particles contiguous); tensors already of
            batch B*N and 0-d tensors pass unchanged; any other batch raises ``ValueError``.
        return_all: return a :class:`SampleResult` with every particle and the selection index.
        sampler_kwargs: passed on to the sampler (``disable=True``, ``eta``, ``callback``, ``return_info``...).

    Returns:
        The selected particle per item, (B, ...), chosen by ``kds.select`` (``kds.selection``; the paper's
        rule is ``"mean"``). When the sampler returns ``(x, info)`` (``return_info=True``), ``(sample, info)``.
        With ``return_all=True``, a :class:`SampleResult`.

    Particles of different items never interact through KDS; note that ``sample_dpm_adaptive`` picks its step
    sizes from an error norm over the whole batch, so there the items share step sizes.

    Over a process group (``KDS(process_group=...)``, docs/distributed.md): every rank calls ``sample`` with the
    same sampler, sigmas and items, and ``x`` holds only its own particles of each item,
    (B*kds.local_particles, ...): draw them with :func:`kds_hook.distributed.particle_noise` to get the same
    particles whatever the world size. ``extra_args`` are repeated to that share. Every rank returns the same
    selection (the selected particles are delivered to every rank); ``SampleResult.particles`` holds this rank's
    particles only. ``sample_dpm_adaptive`` is refused there: each rank would choose its own step sizes.
    """
    if isinstance(sampler, str):
        raise TypeError(
            f"sampler must be a function such as k_diffusion.sampling.{sampler}, not the name {sampler!r}: "
            "kds_hook does not import k_diffusion"
        )
    if not callable(sampler):
        raise TypeError(f"sampler must be a k-diffusion sampling function, got {type(sampler).__name__}")
    if not isinstance(kds, KDS):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of initial noise, got {type(x).__name__}")
    num_particles = kds.local_particles  # N, or this rank's share of the N particles over a process group
    if x.ndim < 2 or x.shape[0] % num_particles:
        share = "" if kds.world_size == 1 else f" (this rank's share of N={kds.num_particles} over {kds.world_size} ranks)"
        raise ValueError(
            f"x has shape {tuple(x.shape)}: its batch must hold {num_particles} contiguous particles per item"
            f"{share}, (B*{num_particles}, ...); draw it as torch.randn(B * {num_particles}, ...) * sigmas[0]"
        )
    if kds.world_size > 1 and "rtol" in inspect.signature(sampler).parameters:
        raise ValueError(
            f"{getattr(sampler, '__name__', 'this sampler')} chooses its step sizes from an error estimate over "
            "its own batch, so the ranks of a process group would step apart; use a sampler with a fixed schedule"
        )
    items = x.shape[0] // num_particles

    if isinstance(model, KDSDenoiser):
        if model.kds is not kds:
            raise ValueError("model is a KDSDenoiser built with a different KDS than the kds passed to sample()")
        denoiser = model
    else:
        denoiser = KDSDenoiser(model, kds)

    kwargs = dict(sampler_kwargs)
    kwargs["extra_args"] = _expand_batch(extra_args or {}, items, num_particles, "extra_args")
    out = sampler(denoiser, x, *_schedule_args(sampler, sigmas, kwargs), **kwargs)
    particles, info = (out[0], out[1]) if isinstance(out, tuple) else (out, None)

    chosen = kds.select(particles)
    if return_all:
        return SampleResult(chosen.sample, chosen.index, particles, info)
    return (chosen.sample, info) if isinstance(out, tuple) else chosen.sample


def _schedule_args(sampler: Callable[..., Any], sigmas: Optional[torch.Tensor], kwargs: Dict[str, Any]) -> tuple:
    """The sampler's positional noise-schedule arguments; fills sigma_min/sigma_max/n into kwargs as needed."""
    params = inspect.signature(sampler).parameters
    if "sigmas" in params:
        if sigmas is None:
            raise ValueError(f"{getattr(sampler, '__name__', 'this sampler')} needs sigmas")
        return (sigmas,)
    if "sigma_min" not in params or "sigma_max" not in params:
        raise TypeError(
            f"{getattr(sampler, '__name__', sampler)!r} takes neither sigmas nor sigma_min/sigma_max: not a "
            "k-diffusion sampler"
        )
    needed = [name for name in ("sigma_min", "sigma_max", "n") if name in params and name not in kwargs]
    if needed and sigmas is None:
        raise ValueError(
            f"{sampler.__name__} needs {', '.join(needed)}: pass them as keyword arguments, or pass sigmas to "
            "derive them from"
        )
    if needed:
        sigmas = torch.as_tensor(sigmas).detach()
        derived = {
            "sigma_min": float(sigmas[sigmas > 0].min()),
            "sigma_max": float(sigmas.max()),
            "n": len(sigmas) - 1,
        }
        kwargs.update({name: derived[name] for name in needed})
    return ()


def _expand_batch(value: Any, items: int, num_particles: int, where: str) -> Any:
    """Repeats batch-B tensors (nested in dicts, lists, tuples) to B*N rows; B*N and 0-d tensors pass."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] == items * num_particles:
            return value
        if value.shape[0] == items:
            return value.repeat_interleave(num_particles, dim=0)
        raise ValueError(
            f"{where} has batch size {value.shape[0]}; expected B={items} (one per item) or "
            f"B*N={items * num_particles} (one per particle)"
        )
    if isinstance(value, dict):
        return {key: _expand_batch(v, items, num_particles, f"{where}[{key!r}]") for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        expanded = [_expand_batch(v, items, num_particles, f"{where}[{i}]") for i, v in enumerate(value)]
        return type(value)(expanded) if not hasattr(value, "_fields") else type(value)(*expanded)
    return value
