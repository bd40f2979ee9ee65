"""The restoring commands under ``torchrun``: each rank runs its share of the particles, rank 0 writes the files.

``torchrun --nproc-per-node K kds-hook upscale ...`` starts K copies of the command with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous in the environment. Each joins the process group (NCCL on CUDA,
gloo otherwise), uses GPU ``LOCAL_RANK`` on CUDA, and builds its :class:`~kds_hook.KDS` with the group: every
rank samples its share of each image's particles, every rank gets the same selection, and only rank 0 writes
files and prints. Each particle's noise comes from its own seed (:func:`kds_hook.distributed.particle_generators`),
so any K gives the same particles. Run without ``torchrun`` the commands are unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from typing import Iterator, Optional, TextIO, Tuple

from .errors import CommandError

# How long a rank waits in a collective for the others (a rank that failed, say out of memory, exits at once and
# torchrun then stops the others; this bounds the case of a rank that hangs).
TIMEOUT = datetime.timedelta(minutes=10)


def under_torchrun() -> bool:
    """Whether the command was started by ``torchrun`` (or anything else that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def join_group(device: str) -> Tuple[Optional[object], str]:
    """Under torchrun: joins the process group and returns (the group, this rank's device); else (None, device)."""
    if not under_torchrun():
        return None, device
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise CommandError("torchrun: this torch build has no torch.distributed")
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise CommandError(
                f"torchrun: local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
        atexit.register(leave_group)
    return dist.group.WORLD, device


def spread(args, kds, device: str):
    """(the KDS, this rank's device) for the run: under torchrun, the KDS over the process group and the seed
    that rank 0 chose (``--seed`` or a random one); else ``kds`` and ``device`` as they are."""
    group, device = join_group(device)
    if group is None:
        return kds, device
    import torch.distributed as dist

    from .options import build_kds

    if getattr(args, "save_particles", False):
        raise CommandError("--save-particles does not work under torchrun: each rank holds only its own particles")
    if args.seed is None:  # every rank must draw from the same seed: rank 0's
        chosen = [int.from_bytes(os.urandom(4), "little")]
        dist.broadcast_object_list(chosen, src=0, group=group)
        args.seed = chosen[0]
    try:
        return build_kds(args, process_group=group), device
    except CommandError as error:
        raise CommandError(f"torchrun with {dist.get_world_size(group)} processes: {error}") from None


def rank_generators(seed: int, kds) -> list:
    """One CPU generator per particle of this rank, for one image (one item), from ``--seed``."""
    from ..distributed import particle_generators

    return particle_generators(seed, 1, kds)


def rank_seed(seed: int, kds) -> int:
    """The global RNG's seed on this rank (the step noise of ``--eta > 0``, which LDM-SR draws from it): its own
    per rank, so that ranks never share noise; unlike the initial noise it then depends on the number of ranks."""
    from ..distributed import particle_seed

    return particle_seed(seed, 0, kds.particle_share.offset)


@contextlib.contextmanager
def quiet_unless(writer: bool) -> Iterator[Optional[TextIO]]:
    """None (progress goes to stderr as usual) for the writing rank; a sink for the others."""
    if writer:
        yield None
        return
    with open(os.devnull, "w") as sink:
        yield sink


def leave_group() -> None:
    """Destroys the process group this module joined, if any."""
    if under_torchrun():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def writes_files(kds) -> bool:
    """Whether this process writes the outputs and prints: rank 0, or the only process."""
    return kds.rank == 0
