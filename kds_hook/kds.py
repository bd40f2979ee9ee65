"""``KDS``: the user-facing configuration, and ``steer_x0``, the one callback every integration calls."""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from ._checks import (
    BandwidthLike,
    check_bandwidth,
    check_no_autograd,
    check_num_particles,
    check_particle_batch,
    check_strength,
)
from . import distributed as _distributed
from .distributed import ParticleShare
from .gate import Schedule, TimeGate
from .meanshift import PatchMeanShift
from .selection import SELECTION_METHODS, Selection, select_particles

__all__ = ["KDS", "StepRecord"]

SigmaToTFrac = Callable[[Union[float, torch.Tensor]], Union[float, torch.Tensor]]


class StepRecord(NamedTuple):
    """One model evaluation as seen by :meth:`KDS.steer_x0` (recorded when ``record=True``)."""

    t_frac: float
    strength: float
    self_weight: Optional[float]  # mean w_ii / sum_k w_ik; None where nothing was steered
    bandwidth: Optional[float]  # mean h over items; None where nothing was steered


class KDS:
    """Kernel Density Steering of an N-particle ensemble's x0 predictions.

    Args:
        num_particles: N, the particles sampled together per item (the paper uses 10).
        patch_size: tile side of the patch-wise mean shift (the paper uses 1: each latent pixel's channel vector).
        bandwidth: kernel standard deviation h in x0 units, ``w_ik = exp(-||p_i - p_k||^2 / (2 h^2))`` (the
            paper's h; minKDS's ``band_width`` b is h = b**2, see :meth:`from_minkds`), or ``"auto"`` (median
            heuristic per item and step, :func:`~kds_hook.auto_bandwidth`). A fixed h must grow like
            sqrt(patch dimension) and with the latent's scale; "auto" does both by itself.
        strength: delta while the gate is open (the paper's 0.3).
        threshold: the gate is open while t/T >= threshold (the paper's 0.3).
        schedule: optional callable t/T -> delta in [0, 1]; replaces strength/threshold.
        sigma_to_t_frac: map from the sampler's sigma to t/T. Integrations pass t/T themselves; give this only
            when calling :meth:`steer_x0` by hand with sigmas.
        selection: default method of :meth:`select` (``"mean"``, ``"density"`` or ``"medoid"``).
        record: append a :class:`StepRecord` to :attr:`history` at every :meth:`steer_x0` call, steered or not
            (costs a device sync or two per steered call).
        check_finite: raise on NaN/Inf in x0 (one reduction per call).
        process_group: a ``torch.distributed`` process group over which the N particles of every item are
            spread (see :mod:`kds_hook.distributed` and docs/distributed.md). Rank r of W holds particles
            :attr:`particle_share` ``= (offset, count)`` of every item, ``count = N // W + (r < N % W)``;
            :meth:`steer_x0` and :meth:`select` then take that rank's rows only, (B*count, ...), and must be
            called on every rank at the same steps. None (the default), or a group of one, is one process.
    """

    def __init__(
        self,
        num_particles: int = 10,
        patch_size: Union[int, Sequence[int]] = 1,
        bandwidth: BandwidthLike = 0.3,
        strength: float = 0.3,
        threshold: float = 0.3,
        *,
        schedule: Optional[Schedule] = None,
        sigma_to_t_frac: Optional[SigmaToTFrac] = None,
        selection: str = "mean",
        record: bool = False,
        check_finite: bool = True,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ):
        self.num_particles = check_num_particles(num_particles)
        self.meanshift = PatchMeanShift(patch_size=patch_size, bandwidth=bandwidth)
        self.gate = TimeGate(strength=strength, threshold=threshold, schedule=schedule)
        if sigma_to_t_frac is not None and not callable(sigma_to_t_frac):
            raise TypeError("sigma_to_t_frac must be a callable sigma -> t/T")
        self.sigma_to_t_frac = sigma_to_t_frac
        if selection not in SELECTION_METHODS:
            raise ValueError(f"unknown selection method {selection!r}; choose one of {', '.join(SELECTION_METHODS)}")
        self.selection = selection
        self.record = bool(record)
        self.check_finite = bool(check_finite)
        self.history: List[StepRecord] = []
        self.process_group = process_group
        shared = None if process_group is None else _distributed.ParticleGroup(process_group, self.num_particles)
        # A group of one is a single process: the same code path, bit for bit, and no collectives.
        self._group = shared if shared is not None and shared.world_size > 1 else None

    @classmethod
    def from_minkds(
        cls,
        band_width: float = 1.0,
        patch_size: int = 4,
        gamma_0: float = 0.1,
        num_particles: int = 4,
        use_KDE: bool = True,
        **kwargs,
    ) -> "KDS":
        """Builds a KDS from minKDS's parameter names, with minKDS's defaults.

        minKDS takes the Euclidean distance of two patches, divides it by ``band_width**2`` and applies
        ``exp(-u**2 / 2)``, i.e. ``exp(-||p_i - p_k||**2 / (2 band_width**4))``: a Gaussian whose standard
        deviation is ``band_width**2``. Its band_width acts squared, so it is converted to
        ``bandwidth = band_width**2`` here (minKDS's b=1.0 -> h=1.0, b=0.3 -> h=0.09), which reproduces its
        kernel exactly. ``gamma_0`` is the strength and ``use_KDE=False`` means strength 0 (plain sampling;
        a ``schedule`` is then refused, as it would switch steering back on). minKDS opens its gate for
        t/T > 0.3; ours for t/T >= 0.3, which differs only at t/T exactly 0.3. Unlike minKDS, particles of
        different images never mix, and selection averages over the particles, not over pixels.
        Every other keyword (``threshold``, ``selection``, ``record``, ...) goes to :class:`KDS`.
        """
        band_width = check_bandwidth(band_width)
        if band_width == "auto":
            raise ValueError('minKDS has no "auto" band_width; use KDS(bandwidth="auto") directly')
        bandwidth = band_width**2
        if bandwidth == 0.0:
            raise ValueError(f"band_width={band_width} is too small: its square (our bandwidth h) underflows to 0")
        if not use_KDE and kwargs.get("schedule") is not None:
            raise ValueError(
                "use_KDE=False switches steering off, but a schedule would switch it back on; pass one or the other"
            )
        return cls(
            num_particles=num_particles,
            patch_size=patch_size,
            bandwidth=bandwidth,
            strength=gamma_0 if use_KDE else 0.0,
            **kwargs,
        )

    def __repr__(self) -> str:
        spread = "" if self._group is None else f", rank={self.rank} of {self.world_size}"
        return (
            f"KDS(num_particles={self.num_particles}, patch_size={self.meanshift.patch_size!r}, "
            f"bandwidth={self.meanshift.bandwidth!r}, gate={self.gate!r}{spread})"
        )

    @property
    def particle_share(self) -> ParticleShare:
        """This rank's particles of every item: ``(offset, count)`` (``(0, N)`` without a process group)."""
        return ParticleShare(0, self.num_particles) if self._group is None else self._group.share

    @property
    def local_particles(self) -> int:
        """Rows per item in the batches this process steers: its share of the N particles (N in one process)."""
        return self.particle_share.count

    @property
    def world_size(self) -> int:
        """Ranks sharing the particles (1 without a process group)."""
        return 1 if self._group is None else self._group.world_size

    @property
    def rank(self) -> int:
        """This process's rank in the process group (0 without one)."""
        return 0 if self._group is None else self._group.rank

    @property
    def patch_size(self):
        return self.meanshift.patch_size

    @property
    def bandwidth(self) -> BandwidthLike:
        return self.meanshift.bandwidth

    def strength_at(self, t_frac: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """delta at t/T (see :class:`~kds_hook.TimeGate`)."""
        return self.gate(t_frac)

    def steer_x0(
        self,
        denoised: torch.Tensor,
        sigma: Union[float, torch.Tensor, None] = None,
        *,
        t_frac: Union[float, torch.Tensor, None] = None,
        strength: Optional[float] = None,
    ) -> torch.Tensor:
        """Returns the steered x0 for a (B*N, ...) batch of predictions whose particles are contiguous.

        The time t/T comes from ``t_frac`` when given, else from ``sigma_to_t_frac(sigma)``; without either this
        raises rather than guessing. ``strength`` overrides the gate (for integrations whose gate is not a
        function of t/T, such as a sigma threshold); t/T is then optional. Wherever delta = 0, ``denoised``
        itself is returned untouched, so the sampler's own code path runs bit for bit. Steering is not
        differentiable: a ``denoised`` that requires grad, with grad enabled, is refused with a ``ValueError``.
        """
        batch_error = None
        try:  # also when the gate is closed: wrong batches fail early
            check_particle_batch(denoised, self.local_particles)
        except (TypeError, ValueError) as error:
            if self._group is None or not isinstance(denoised, torch.Tensor):
                raise
            batch_error = error  # raised on every rank once the others know (here alone if nothing is steered)
        if strength is not None:
            strength = check_strength(strength)
            t_value = float("nan") if t_frac is None else float(torch.as_tensor(t_frac).reshape(-1)[0])
            return self._steer(denoised, strength, t_value, batch_error)
        if t_frac is None:
            if self.sigma_to_t_frac is None:
                raise ValueError(
                    "KDS.steer_x0 needs t/T: pass t_frac=..., or build KDS(sigma_to_t_frac=...) with a map from "
                    "the sampler's sigma to t/T (integrations in kds_hook.k_diffusion and kds_hook.diffusers do this)"
                )
            if sigma is None:
                raise ValueError("KDS.steer_x0 needs sigma (or t_frac) to know the diffusion time")
            t_frac = self.sigma_to_t_frac(sigma)
        strength, t_value = self._strength_per_item(t_frac, denoised)
        return self._steer(denoised, strength, t_value, batch_error)

    def _steer(
        self, denoised: torch.Tensor, strength, t_value: float, batch_error: Optional[BaseException] = None
    ) -> torch.Tensor:
        if self.num_particles == 1 or _is_zero(strength):
            if batch_error is not None:  # nothing is communicated on a shut step: this rank alone raises
                raise batch_error
            if self.record:
                self.history.append(StepRecord(t_value, 0.0, None, None))
            return denoised
        if self._group is not None:
            # Every rank reaches here at the same steps: the gate is a function of the shared t/T.
            steered = _distributed.steer(self._group, self, denoised, strength, t_value, batch_error)
        else:
            check_no_autograd(denoised)
            steered = self.meanshift(denoised, self.num_particles, strength, check_finite_values=self.check_finite)
        if self.record:
            s = float(strength.mean()) if isinstance(strength, torch.Tensor) else strength
            h = self.meanshift.last_bandwidth
            self_weight = self.meanshift.last_self_weight
            if self._group is not None:  # this rank's particles only: combine into the mean over all N
                self_weight = self._group.mean_over_particles(self_weight, denoised.device)
            self.history.append(StepRecord(t_value, s, self_weight, None if h is None else float(h.mean())))
        return steered

    def select(self, x: torch.Tensor, method: Optional[str] = None) -> Selection:
        """One particle per item (default method: :attr:`selection`); see :func:`~kds_hook.select_particles`.

        With a process group, ``x`` is this rank's (B*count, ...) rows; every rank must call it, and every rank
        gets the same :class:`~kds_hook.Selection`: ``index`` the global particle index 0..N-1 and ``sample``
        the chosen particles themselves, (B, ...), delivered to every rank (see docs/distributed.md for what
        each method moves between the ranks).
        """
        if self._group is not None:
            return _distributed.select(self._group, self, x, method or self.selection)
        return select_particles(
            x,
            self.num_particles,
            method or self.selection,
            patch_size=self.meanshift.patch_size,
            bandwidth=self.meanshift.bandwidth,
        )

    def reset_history(self) -> None:
        self.history.clear()

    def _strength_per_item(self, t_frac, denoised: torch.Tensor):
        """delta as a float when all rows share one t/T, else one value per item; and the mean t/T."""
        t = per_item_values(t_frac, denoised.shape[0], self.local_particles, "diffusion time t/T")
        return self.gate(t), float(t.mean()) if isinstance(t, torch.Tensor) else t


def per_item_values(
    values: Union[float, torch.Tensor], rows: int, num_particles: int, what: str
) -> Union[float, torch.Tensor]:
    """A per-row quantity of a (B*N)-row batch (a diffusion time, a noise level) as one float when every row
    shares it, else as one float64 CPU value per item (B,). The N particles of an item must share theirs."""
    if not isinstance(values, torch.Tensor) or values.numel() == 1:
        return float(values)
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    if bool((flat == flat[0]).all()):
        return float(flat[0])
    if flat.numel() != rows or rows % num_particles:
        raise ValueError(f"{what} has {flat.numel()} values for a batch of {rows}; give one per row or one in all")
    per_item = flat.reshape(-1, num_particles)
    if not bool((per_item == per_item[:, :1]).all()):
        raise ValueError(f"the N particles of one item must be at the same {what}")
    return per_item[:, 0]


def _is_zero(strength) -> bool:
    if isinstance(strength, torch.Tensor):
        return bool((strength == 0).all())
    return strength == 0.0
