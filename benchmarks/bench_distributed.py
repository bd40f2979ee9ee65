"""Particles over a process group: per steered step, communication and steering against a model evaluation.

Each of W ranks (spawned processes; gloo on CPU by default) holds its share n_r of the N particles of one item
and runs, per repeat, in this order (a barrier before each part, so that no part is charged with another
rank's lateness):

* ``model``: one evaluation of a stand-in denoiser on its n_r rows: the random-weight diffusers ``UNet2DModel``
  of benchmarks/bench_cost.py (4 down and 4 up blocks, attention at one level), far smaller than SDXL's or
  Flux's denoiser, so its time is a lower bound of a real model's and the ratios below are upper bounds of the
  real overhead;
* ``check``: the settings fingerprint all-gather that precedes every steered call (33 int64 per rank);
* ``gather``: the all-gather of the particles into the whole ensemble on every rank (in x0's dtype);
* ``steer``: the mean shift of the rank's own particles against all N (``PatchMeanShift(particle_range=...)``);
* ``step``: one whole distributed ``steer_x0`` call (check + gather + steer, as a sampler runs it);
* ``one process``: for comparison, ``steer_x0`` of all N particles in one process, as without a group.

Times are wall-clock medians over repeats, each the slowest rank's (a step waits for it); ratios are to the
model's median in the same run. ``--compare-meanshift REV`` instead times the single-process ``PatchMeanShift``
of this working tree against the one at git revision REV, interleaved in one process (the distributed
extension must not slow the single-process path).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py [--quick] [--world-size 2]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py --backend nccl --device cuda --dtype bfloat16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py --compare-meanshift main

NCCL needs one GPU per rank: with fewer GPUs than ``--world-size`` the script says so and runs with as many
ranks as there are GPUs (on one GPU, W = 1: the collectives then move nothing between devices).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

LATENTS = {"4x64x64": (4, 64, 64), "16x128x128": (16, 128, 128)}
COUNTS = (10, 32)
PARTS = ("model", "check", "gather", "steer", "step", "one process")


# ----------------------------------------------------------------------------------------------- distributed run


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, barrier: Callable[[], None]) -> float:
    barrier()
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _rank_main(rank: int, args: argparse.Namespace, store: str, world_size: int) -> None:
    import torch.distributed as dist

    from bench_cost import tiny_unet
    from kds_hook import KDS
    from kds_hook import distributed as kds_distributed

    torch.set_num_threads(1)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    rows = []
    try:
        for label, shape in LATENTS.items():
            if args.quick and label != "4x64x64":
                continue
            unet = tiny_unet(shape[0], shape[1]).to(device)
            if dtype != torch.float32:
                unet = unet.to(dtype)
            for n in COUNTS:
                kds = KDS(num_particles=n, bandwidth=args.bandwidth, strength=0.3, threshold=0.0)
                shared = kds_distributed.ParticleGroup(group, n)  # also at W = 1, so the collectives run
                offset, count = shared.share
                noise = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                local = noise[offset : offset + count].contiguous()
                timestep = torch.full((count,), 500, device=device)

                def model():
                    with torch.no_grad():
                        unet(local, timestep)

                def check():
                    fields = shared.fingerprint(kds, 1, local, 1, 0, strength=0.3, t_frac=0.9)
                    shared.agree(fields, device, None)

                gathered = {}

                def gather():
                    gathered["full"] = shared.gather_particles(local, 1)

                def steer():
                    kds.meanshift(gathered["full"], n, 0.3, check_finite_values=False, particle_range=(offset, offset + count))

                def step():
                    kds_distributed.steer(shared, kds, local, 0.3, 0.9, None)

                def one_process():
                    kds.steer_x0(noise, t_frac=0.9)

                parts = dict(zip(PARTS, (model, check, gather, steer, step, one_process)))
                for fn in parts.values():  # warm-up: allocator, kernels, connections
                    fn()
                    dist.barrier(group)
                times: Dict[str, List[float]] = {name: [] for name in PARTS}
                for _ in range(args.repeats):
                    for name, fn in parts.items():
                        times[name].append(_timed(fn, device, lambda: dist.barrier(group)))
                medians = torch.tensor([statistics.median(times[name]) for name in PARTS], dtype=torch.float64)
                slowest = medians.to(device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
                rows.append((label, n, [float(v) for v in slowest.cpu()]))
                if rank == 0:
                    print(f"  measured {label} N={n}", flush=True)
        if rank == 0:
            _print_table(rows, args, world_size)
    finally:
        dist.destroy_process_group()


def _gather_bytes(shape, n: int, world_size: int, dtype: torch.dtype) -> float:
    """Bytes each rank receives in the particle all-gather (padded to the largest share)."""
    most = math.ceil(n / world_size)
    return (world_size - 1) * most * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _print_table(rows, args: argparse.Namespace, world_size: int) -> None:
    dtype = getattr(torch, args.dtype)
    print()
    print(
        f"W = {world_size}, backend {args.backend}, device {args.device}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) per rank, {args.repeats} repeats, bandwidth {args.bandwidth}, patch 1"
    )
    print()
    print(
        "| latent | N | n_r (max) | MiB in per rank | model ms | check ms | gather ms | steer ms | step ms "
        "| one process ms | (check+gather)/model | steer/model | step/model |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, n, t in rows:
        model, check, gather, steer, step, single = t
        mib = _gather_bytes(LATENTS[label], n, world_size, dtype) / 2**20
        print(
            f"| {label} | {n} | {math.ceil(n / world_size)} | {mib:.2f} | {model * 1e3:.1f} | {check * 1e3:.2f} | "
            f"{gather * 1e3:.2f} | {steer * 1e3:.1f} | {step * 1e3:.1f} | {single * 1e3:.1f} | "
            f"{(check + gather) / model:.4f} | {steer / model:.3f} | {step / model:.3f} |",
            flush=True,
        )


def run_distributed(args: argparse.Namespace) -> None:
    world_size = args.world_size
    if args.backend == "nccl":
        available = torch.cuda.device_count()
        if available < world_size:
            print(
                f"NCCL needs one GPU per rank: {available} GPU(s) here for --world-size {world_size}; "
                f"running with W = {max(available, 1)} instead",
                flush=True,
            )
            world_size = max(available, 1)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _rank_main, args=(args, os.path.join(folder, "store"), world_size), nprocs=world_size, start_method="spawn"
        )


# ------------------------------------------------------------------- single-process path against a git revision


def _meanshift_at(revision: str, name: str):
    """kds_hook.meanshift as it was at ``revision``, loaded beside the current one as module ``name``."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:kds_hook/meanshift.py"], capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader(f"kds_hook.{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "kds_hook"
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:kds_hook/meanshift.py", "exec"), module.__dict__)
    return module


def compare_meanshift(args: argparse.Namespace) -> None:
    """Paired rounds: each round times every version once (order reversed every other round); per-round ratios
    to the revision's time. A second copy of the revision's code is the control: its ratio shows the noise."""
    from bench_meanshift import LATENTS as MEANSHIFT_LATENTS
    from bench_meanshift import make_input

    from kds_hook import meanshift as current

    torch.set_num_threads(1)
    before = _meanshift_at(args.compare_meanshift, "_meanshift_before")
    control = _meanshift_at(args.compare_meanshift, "_meanshift_control")
    rounds = 4 if args.quick else 12
    print(f"PatchMeanShift, one process: this tree vs {args.compare_meanshift}; torch {torch.__version__}, 1 thread")
    print(f"{rounds} paired rounds per case; float32, bandwidth 1.0, strength 0.3, no NaN check; CPU time")
    print()
    print(
        "| latent | N | patch | before ms | after ms | after/before | control/before |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, shape in MEANSHIFT_LATENTS.items():
        for n in COUNTS:
            for patch in (1, 2, 4):
                x = make_input(shape, n)
                ops = {
                    "before": before.PatchMeanShift(patch, 1.0),
                    "after": current.PatchMeanShift(patch, 1.0),
                    "control": control.PatchMeanShift(patch, 1.0),
                }
                expected = ops["before"](x, n, 0.3, check_finite_values=False)
                assert torch.equal(ops["after"](x, n, 0.3, check_finite_values=False), expected)
                times = {name: [] for name in ops}
                for round_ in range(rounds):
                    order = list(ops) if round_ % 2 == 0 else list(ops)[::-1]
                    for name in order:
                        ops[name](x, n, 0.3, check_finite_values=False)  # untimed: the previous call's pages
                        start = time.process_time()
                        ops[name](x, n, 0.3, check_finite_values=False)
                        times[name].append(time.process_time() - start)
                print(
                    f"| {label} | {n} | {patch} | {statistics.median(times['before']) * 1e3:.1f} | "
                    f"{statistics.median(times['after']) * 1e3:.1f} | {_ratio(times['after'], times['before'])} | "
                    f"{_ratio(times['control'], times['before'])} |",
                    flush=True,
                )


def _ratio(numerator: List[float], denominator: List[float]) -> str:
    """Mean ± standard error of the per-round ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"{statistics.fmean(ratios):.3f} ± {statistics.stdev(ratios) / math.sqrt(len(ratios)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument(
        "--bandwidth", type=lambda v: v if v == "auto" else float(v), default="auto",
        help='"auto" (every rank computes every pair\'s distance for the median) or a fixed h',
    )
    parser.add_argument("--quick", action="store_true", help="the 4x64x64 latent only: a smoke test")
    parser.add_argument("--compare-meanshift", metavar="REV", help="time the single-process mean shift against REV")
    args = parser.parse_args()
    if args.compare_meanshift:
        compare_meanshift(args)
        return
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.backend == "nccl" and args.device != "cuda":
        parser.error("--backend nccl needs --device cuda")
    run_distributed(args)


if __name__ == "__main__":
    main()
