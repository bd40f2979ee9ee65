"""The N particles of every item spread over the ranks of a ``torch.distributed`` process group.

``KDS(..., process_group=group)`` with a group of world size W: rank r holds particles
``[offset_r, offset_r + n_r)`` of every item, ``n_r = N // W + (r < N % W)`` (:func:`particle_share`), and
every call of :meth:`~kds_hook.KDS.steer_x0` and :meth:`~kds_hook.KDS.select` takes and returns that rank's
rows only: (B*n_r, ...), the n_r particles of each item contiguous. What a steered call moves:

1. a settings fingerprint (``FINGERPRINT_FIELDS``, 33 int64 per rank, all-gathered): every rank checks that
   all ranks run the same settings, shapes, step and diffusion time, and that none of them failed its own
   input checks; a mismatch or a failure raises the same ``ValueError`` on every rank, so no rank computes with
   another's data or waits for a collective that never comes;
2. the particles (all-gathered, in x0's own dtype): each rank then holds the item's whole ensemble, B*N rows,
   and computes the shift of its own n_r particles against all N (``PatchMeanShift(...,
   particle_range=...)``); ``"auto"`` takes its bandwidth from the whole ensemble with the same function as in
   one process, so every rank uses the same h.

A step whose gate is shut moves nothing. Collectives run with the group's own timeout (``timeout=`` of
``torch.distributed.init_process_group``); a collective that fails or times out raises a ``RuntimeError``
naming the step. This module is pure torch.

Reproducibility whatever W: draw each particle's noise from its own generator, seeded by the user's seed, the
item and the particle's global index (:func:`particle_seeds`, :func:`particle_generators`,
:func:`particle_noise`); then W = 1, 2, 3 give the same particles up to float rounding.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_finite, check_no_autograd, check_particle_batch
from .selection import SELECTION_METHODS, Selection

__all__ = [
    "ParticleShare",
    "particle_generators",
    "particle_noise",
    "particle_seed",
    "particle_seeds",
    "particle_share",
    "selected_particles",
]


class ParticleShare(NamedTuple):
    """Rank ``rank``'s particles of every item: global indices ``offset .. offset + count - 1``."""

    offset: int
    count: int


def particle_share(num_particles: int, world_size: int, rank: int) -> ParticleShare:
    """The particles of rank ``rank`` among ``world_size``: ``N // W`` each, one more for the first ``N % W``.

    Raises ``ValueError`` when N < W (some rank would hold no particle) or the rank is out of range.
    """
    for name, value in (("num_particles", num_particles), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of world size {world_size}")
    if num_particles < world_size:
        raise ValueError(
            f"num_particles={num_particles} cannot be shared by {world_size} ranks: every rank needs at least one "
            f"particle (ranks {num_particles}..{world_size - 1} would hold none). Use N >= W, or a smaller group"
        )
    base, extra = divmod(int(num_particles), int(world_size))
    return ParticleShare(offset=rank * base + min(rank, extra), count=base + (rank < extra))


# ------------------------------------------------------------------------------------------- per-particle seeds


def particle_seed(seed: int, item: int, particle: int) -> int:
    """The seed of particle ``particle`` (its global index 0..N-1) of item ``item`` under the user's ``seed``.

    A hash (BLAKE2b) of the three numbers, so that nearby seeds, items and particles give unrelated streams;
    the same on every machine and in every process.
    """
    for name, value in (("seed", seed), ("item", item), ("particle", particle)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if item < 0 or particle < 0:
        raise ValueError(f"item and particle must be >= 0, got item={item}, particle={particle}")
    digest = hashlib.blake2b(f"kds-hook particle {int(seed)} {int(item)} {int(particle)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def particle_seeds(seed: int, num_items: int, kds, *, first_item: int = 0) -> List[int]:
    """The seeds of this rank's rows, in row order: items ``first_item .. first_item + num_items - 1``, each
    with this rank's particles (all N without a process group). One per row of the batch this rank steers."""
    share = _share_of(kds)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    return [
        particle_seed(seed, first_item + item, share.offset + k) for item in range(num_items) for k in range(share.count)
    ]


def particle_generators(
    seed: int, num_items: int, kds, *, device: Union[str, torch.device] = "cpu", first_item: int = 0
) -> List[torch.Generator]:
    """One ``torch.Generator`` per row of this rank's batch, seeded by :func:`particle_seeds`.

    Pass the list as ``generator=`` to a diffusers pipeline (one per row: its noise then does not depend on how
    the particles are spread), or draw with :func:`particle_noise`. Generators on CPU (the default) give the
    same numbers on every machine; CUDA generators give other numbers than CPU ones.
    """
    return [torch.Generator(device=device).manual_seed(s) for s in particle_seeds(seed, num_items, kds, first_item=first_item)]


def particle_noise(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Standard normal noise of shape (len(generators), *shape), row i drawn from ``generators[i]`` (on the
    generator's device, then moved to ``device``). Each call advances every generator, so the same list also
    serves as a sampler's per-step noise source (k-diffusion's ``noise_sampler``)."""
    if not generators:
        raise ValueError("particle_noise needs at least one generator")
    rows = [torch.randn(tuple(shape), generator=g, dtype=dtype, device=g.device) for g in generators]
    noise = torch.stack(rows)
    return noise if device is None else noise.to(device)


def _share_of(kds) -> ParticleShare:
    share = getattr(kds, "particle_share", None)
    if not isinstance(share, ParticleShare):
        raise TypeError(f"kds must be a kds_hook.KDS, got {type(kds).__name__}")
    return share


# ------------------------------------------------------------------------------------------- the fingerprint

# (name, int64 slots). Every rank all-gathers these before each collective of steering or selection.
FINGERPRINT_FIELDS: Tuple[Tuple[str, int], ...] = (
    ("protocol", 1),
    ("operation", 1),
    ("call", 1),  # collective calls of this KDS so far: ranks out of step show here
    ("world size", 1),
    ("num_particles", 1),
    ("patch_size", 4),  # (is a tuple, sizes...)
    ("bandwidth", 2),  # (is "auto", float64 bits)
    ("strength", 1),
    ("threshold", 1),
    ("schedule given", 1),
    ("selection", 1),
    ("check_finite", 1),
    ("record", 1),
    ("items", 1),
    ("dtype", 1),
    ("particle shape", 5),  # (ndim, sizes...)
    ("step strength", 2),  # (one per item, float64 bits or a hash)
    ("t/T", 1),
    ("selection method", 1),
    ("device type", 1),
    ("status", 1),
)
_PROTOCOL = 1
_STEER, _SELECT, _DELIVER = 1, 2, 3
_OPERATIONS = {_STEER: "steer_x0", _SELECT: "select", _DELIVER: "selected_particles"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
# Failures of a rank's own input checks, sent in the fingerprint so that every rank raises, not only that one.
_OK, _NON_FINITE, _BAD_BATCH, _REQUIRES_GRAD = 0, 1, 2, 3
_STATUS = {
    _NON_FINITE: "its input contains NaN or Inf values",
    _BAD_BATCH: "its batch does not hold its share of particles per item (or is not a float tensor)",
    _REQUIRES_GRAD: "its x0 requires grad with grad enabled (steering is not differentiable)",
}


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _step_strength_fields(strength) -> List[int]:
    if isinstance(strength, torch.Tensor) and strength.numel() > 1:
        values = strength.detach().to("cpu", torch.float64).contiguous()
        return [1, _hash64(values.numpy().tobytes())]
    return [0, _float_bits(float(strength))]


class ParticleGroup:
    """One KDS's view of its process group: this rank's share and the collectives of steering and selection.

    Built by :class:`~kds_hook.KDS`; not public API. Every collective is preceded by the all-gather of a
    fingerprint (``FINGERPRINT_FIELDS``), checked on every rank the same way.
    """

    def __init__(self, group, num_particles: int):
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError("process_group was given, but this torch build has no torch.distributed")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD after "
                f"init_process_group), got {type(group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = rank
        self.shares = [particle_share(num_particles, self.world_size, r) for r in range(self.world_size)]
        self.share = self.shares[rank]
        self.num_particles = num_particles
        self.calls = 0

    # ---------------------------------------------------------------- the checks before every collective

    def fingerprint(
        self,
        kds,
        operation: int,
        x: torch.Tensor,
        items: int,
        status: int,
        *,
        strength=0.0,
        t_frac: float = float("nan"),
        method: Optional[str] = None,
    ) -> List[int]:
        patch = kds.meanshift.patch_size
        patch_fields = [1, *patch, *[0] * (3 - len(patch))] if isinstance(patch, tuple) else [0, patch, 0, 0]
        bandwidth = kds.meanshift.bandwidth
        gate = kds.gate
        particle_shape = list(x.shape[1:]) if items > 0 else []
        fields = [
            _PROTOCOL,
            operation,
            self.calls,
            self.world_size,
            self.num_particles,
            *patch_fields,
            *([1, 0] if bandwidth == "auto" else [0, _float_bits(bandwidth)]),
            _float_bits(gate.strength),
            _float_bits(gate.threshold),
            int(gate.schedule is not None),
            SELECTION_METHODS.index(kds.selection),
            int(kds.check_finite),
            int(kds.record),
            items if items > 0 else -1,
            _DTYPES.index(x.dtype) if isinstance(x, torch.Tensor) and x.dtype in _DTYPES else -1,
            len(particle_shape),
            *(particle_shape + [0] * (4 - len(particle_shape)))[:4],
            *_step_strength_fields(strength),
            _float_bits(t_frac),
            -1 if method is None else SELECTION_METHODS.index(method),
            _DEVICE_TYPES.index(x.device.type) if isinstance(x, torch.Tensor) and x.device.type in _DEVICE_TYPES else -1,
            status,
        ]
        assert len(fields) == sum(width for _, width in FINGERPRINT_FIELDS)
        return fields

    def agree(self, fields: List[int], device: torch.device, local_error: Optional[BaseException]) -> None:
        """All-gathers every rank's fingerprint; raises the same ``ValueError`` on every rank unless they all
        match and none failed its own checks. Costs one small collective (and a device sync)."""
        local = torch.tensor(fields, dtype=torch.int64, device=device)
        table = torch.empty((self.world_size, local.numel()), dtype=torch.int64, device=device)
        self._collective("settings check", _all_gather_single, table, local)
        self.calls += 1
        rows = table.cpu().tolist()
        failed = [r for r, row in enumerate(rows) if row[-1] != 0]
        if failed:
            reasons = "; ".join(f"rank {r}: {_STATUS.get(rows[r][-1], 'an unknown failure')}" for r in failed)
            message = (
                f"KDS {_OPERATIONS.get(rows[0][1], 'call')} failed on rank(s) {', '.join(map(str, failed))} of "
                f"{self.world_size} ({reasons}); every rank raises this error"
            )
            raise ValueError(message) from local_error  # the failing rank's own error is the cause, for detail
        differing = _differing_fields(rows)
        if differing:
            raise ValueError(
                "KDS settings or inputs differ across the ranks of the process group, so the particles cannot be "
                "steered together (every rank raises this error):\n  "
                + "\n  ".join(differing)
                + "\nBuild KDS(...) with the same settings on every rank and call it at the same steps with the "
                "same number of items; each rank's batch holds only its own share of the N particles of every "
                "item (KDS.particle_share)"
            )

    # ---------------------------------------------------------------- the collectives

    def gather_particles(self, local: torch.Tensor, items: int) -> torch.Tensor:
        """(B*n_r, ...) on every rank -> (B*N, ...) on every rank, particles in global order (x's dtype).

        One all-gather of B*max(n_r) rows per rank (uneven shares are padded to the largest), then one copy
        into item-major order; with one item and even shares the gathered buffer already is that order.
        """
        per_particle = tuple(local.shape[1:])
        counts = [share.count for share in self.shares]
        most = max(counts)
        grouped = local.reshape(items, self.share.count, *per_particle)
        if self.share.count == most:
            send = grouped.contiguous()
        else:
            send = local.new_zeros((items, most) + per_particle)
            send[:, : self.share.count] = grouped
        gathered = local.new_empty((self.world_size, items, most) + per_particle)
        self._collective("particle all-gather", _all_gather_single, gathered, send)
        if items == 1 and min(counts) == most:
            return gathered.reshape((self.num_particles,) + per_particle)
        full = torch.cat([gathered[r, :, :count] for r, count in enumerate(counts)], dim=1)
        return full.reshape((items * self.num_particles,) + per_particle)

    def gather_scores(self, local: torch.Tensor) -> torch.Tensor:
        """(B, n_r) per-particle values on every rank -> (B, N) on every rank, in global particle order."""
        counts = [share.count for share in self.shares]
        most = max(counts)
        send = local.new_full((local.shape[0], most), math.inf)
        send[:, : self.share.count] = local
        gathered = local.new_empty((self.world_size,) + tuple(send.shape))
        self._collective("score all-gather", _all_gather_single, gathered, send)
        return torch.cat([gathered[r, :, :count] for r, count in enumerate(counts)], dim=1)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``value`` over the ranks (an all-reduce), on every rank."""
        total = value.clone()
        self._collective("all-reduce", _all_reduce_sum, total)
        return total

    def deliver(self, local: torch.Tensor, index: torch.Tensor, items: int) -> torch.Tensor:
        """The particle ``index[b]`` of every item b, (B, ...), on every rank, bit for bit as its owner holds it.

        Each owner writes its picks into a zero buffer and the ranks sum the buffers as bytes (uint8), where
        adding zeros is exact for any dtype: B particles' bytes move, not the ensemble.
        """
        grouped = local.reshape(items, self.share.count, *local.shape[1:])
        out = torch.zeros((items,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        mine = (index >= self.share.offset) & (index < self.share.offset + self.share.count)
        picks = mine.nonzero().reshape(-1)
        if picks.numel():
            out[picks] = grouped[picks, index[picks] - self.share.offset]
        as_bytes = out.reshape(-1).view(torch.uint8)
        self._collective("selected-particle all-reduce", _all_reduce_sum, as_bytes)
        return out

    def mean_over_particles(self, local_mean: float, device: torch.device) -> float:
        """The mean over all N particles of a per-particle average each rank took over its own n_r."""
        weighted = torch.tensor([local_mean * self.share.count], dtype=torch.float64, device=device)
        return float(self.sum_over_ranks(weighted)) / self.num_particles

    def _collective(self, what: str, function, *tensors: torch.Tensor) -> None:
        try:
            function(*tensors, group=self.group)
        except RuntimeError as error:
            raise RuntimeError(
                f"KDS: the {what} of collective call {self.calls} on rank {self.rank} of {self.world_size} failed: "
                "another rank stopped (look for its own error above) or did not reach this point within the "
                f"process group's timeout. Backend error: {error}"
            ) from error


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """All-gather into ``output`` of shape (W, *tensor.shape) (gloo takes only the concatenated form)."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the latter before torch 2.13
    gather(output.view((-1,) + tuple(tensor.shape[1:])), tensor, group=group)


def _all_reduce_sum(tensor: torch.Tensor, group) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, group=group)


def _differing_fields(rows: List[List[int]]) -> List[str]:
    """'name: rank 0 = v0, rank 1 = v1, ...' for every fingerprint field whose value differs across ranks."""
    lines = []
    start = 0
    for name, width in FINGERPRINT_FIELDS:
        values = [tuple(row[start : start + width]) for row in rows]
        start += width
        if name == "status" or len(set(values)) == 1:
            continue
        shown = ", ".join(f"rank {r} = {_decode(name, v)}" for r, v in enumerate(values))
        lines.append(f"{name}: {shown}")
    return lines


def _decode(name: str, value: Tuple[int, ...]) -> str:
    if name in ("strength", "threshold", "t/T"):
        return repr(_bits_float(value[0]))
    if name == "bandwidth":
        return '"auto"' if value[0] else repr(_bits_float(value[1]))
    if name == "patch_size":
        return repr(tuple(v for v in value[1:] if v)) if value[0] else repr(value[1])
    if name == "particle shape":
        return repr(value[1 : 1 + value[0]])
    if name == "dtype":
        return str(_DTYPES[value[0]]) if 0 <= value[0] < len(_DTYPES) else "unsupported"
    if name == "device type":
        return _DEVICE_TYPES[value[0]] if 0 <= value[0] < len(_DEVICE_TYPES) else "other"
    if name in ("selection", "selection method"):
        return SELECTION_METHODS[value[0]] if 0 <= value[0] < len(SELECTION_METHODS) else "-"
    if name == "operation":
        return _OPERATIONS.get(value[0], str(value[0]))
    if name == "step strength":
        return "one per item" if value[0] else repr(_bits_float(value[1]))
    if name in ("schedule given", "check_finite", "record"):
        return str(bool(value[0]))
    return str(value[0]) if len(value) == 1 else repr(value)


# ------------------------------------------------------------------------------------------- steering, selection


def steer(group: ParticleGroup, kds, denoised: torch.Tensor, strength, t_frac: float, batch_error) -> torch.Tensor:
    """This rank's steered x0 (B*n_r, ...): checks, fingerprint, all-gather, shift of its own particles.

    ``batch_error``: what ``check_particle_batch`` raised on this rank's batch (None if it passed); it is
    reported to every rank rather than raised here alone.
    """
    error, status, items = batch_error, _BAD_BATCH if batch_error is not None else _OK, -1
    if error is None:
        items = denoised.shape[0] // group.share.count
        try:
            status = _REQUIRES_GRAD
            check_no_autograd(denoised)
            status = _NON_FINITE
            if kds.check_finite:
                check_finite(denoised)
            status = _OK
        except ValueError as local_error:
            error = local_error
    fields = group.fingerprint(kds, _STEER, denoised, items, status, strength=strength, t_frac=t_frac)
    group.agree(fields, denoised.device, error)
    full = group.gather_particles(denoised, items)
    start = group.share.offset
    return kds.meanshift(
        full,
        group.num_particles,
        strength,
        check_finite_values=False,
        particle_range=(start, start + group.share.count),
    )


def select(group: ParticleGroup, kds, x: torch.Tensor, method: str):
    """The same :class:`~kds_hook.Selection` on every rank: global index (B,) and the chosen particles (B, ...).

    ``"mean"``: an all-reduce of each item's particle sum (B x D), each rank's distances to the mean, an
    all-gather of the (B, N) distances, argmin; then the chosen particles (B x D) are delivered to every rank.
    ``"density"``/``"medoid"`` need every pair of particles: the ensemble is all-gathered (as in a steered step),
    each rank scores its own particles, the (B, N) scores are all-gathered.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")  # the other ranks time out (docs)
    error, status, items = None, _BAD_BATCH, -1
    try:
        items = check_particle_batch(x, group.share.count)
        status = _NON_FINITE
        check_finite(x, name="x")
        status = _OK
    except (TypeError, ValueError) as local_error:
        error = local_error
        items = items if status == _NON_FINITE else -1
    group.agree(group.fingerprint(kds, _SELECT, x, items, status, method=method), x.device, error)
    work = x if x.dtype == torch.float64 else x.float()
    flat = work.reshape(items, group.share.count, -1)
    full = None
    if method == "mean":
        centre = group.sum_over_ranks(flat.sum(dim=1)).div_(group.num_particles)  # (B, D)
        score = (flat - centre.unsqueeze(1)).square().sum(dim=-1)
    else:
        full = group.gather_particles(x, items)
        start, stop = group.share.offset, group.share.offset + group.share.count
        if method == "medoid":
            every = (full if full.dtype == torch.float64 else full.float()).reshape(items, group.num_particles, -1)
            score = torch.cdist(flat, every).sum(dim=-1)
        else:
            from .meanshift import PatchMeanShift

            density = PatchMeanShift(kds.meanshift.patch_size, kds.meanshift.bandwidth).log_density(
                full, group.num_particles, particle_range=(start, stop)
            )
            score = -density.reshape(items, group.share.count)
    index = group.gather_scores(score).argmin(dim=1)  # ties to the lowest global index, as in one process
    if full is not None:
        grouped = full.reshape(items, group.num_particles, *x.shape[1:])
        sample = grouped[torch.arange(items, device=x.device), index]
    else:
        sample = group.deliver(x, index, items)
    return Selection(sample=sample, index=index)


def selected_particles(kds, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Particle ``index[b]`` (a global index 0..N-1) of every item b of ``x``, shape (B, ...), on every rank.

    ``x`` is this rank's rows (B*count, ...), any per-row tensor that follows the particle layout (the decoder's
    input, say, where :meth:`~kds_hook.KDS.select` chose in another space); ``index`` the same on every rank
    (what ``kds.select`` returned). Over a process group the owners' rows are delivered bit for bit to every rank
    (B rows move, see :meth:`ParticleGroup.deliver`), after a fingerprint check; every rank must call it. In
    one process it is ``x`` grouped by item, indexed.
    """
    share = _share_of(kds)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    index = torch.as_tensor(index).reshape(-1)
    group = kds._group
    if group is None:
        if x.ndim == 0 or x.shape[0] != share.count * index.numel():
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {index.numel()} items x {share.count} rows")
        grouped = x.reshape(index.numel(), share.count, *x.shape[1:])
        items = index.numel()
        return grouped[torch.arange(items, device=x.device), index.to(x.device)]
    error, status, items = None, _BAD_BATCH, -1
    if x.ndim and x.shape[0] == share.count * index.numel():
        items, status = index.numel(), _OK
    else:
        error = ValueError(
            f"x has {x.shape[0]} rows, index {index.numel()} items: x must hold this rank's {share.count} "
            "particles of each item"
        )
    fields = group.fingerprint(kds, _DELIVER, x, items, status, strength=index.to(torch.float64))
    group.agree(fields, x.device, error)
    return group.deliver(x.contiguous(), index.to(x.device), items)
