"""Cost of KDS against Best-of-N with the same N, sampler and UNet (the paper's Table 4: 28.4 s vs 27.3 s).

Both sample N particles of one item with a tiny random diffusers ``UNet2DModel`` of realistic depth (4 down and
4 up blocks, attention at 8x8) and diffusers' ``DDIMScheduler`` (eta = 0), in the same loop
``eps = UNet(z, t); z = scheduler.step(eps, t, z).prev_sample``:

* Best-of-N: the scheduler as it is; at the end one particle is picked by a no-reference score. The paper picks
  by LIQE, an image-quality network we do not have; here the picker is the particle with the largest
  high-frequency energy (a sharpness proxy), which costs about as little as KDS's selection.
* KDS: the same scheduler steered by ``kds_hook.diffusers.apply_patch`` (the code path users run: x0 from eps,
  ``steer_x0``, eps re-derived from the steered x0, Alg. 2 lines 16-17); at the end the particle closest to the
  ensemble mean (Eq. 9). Measured with the paper's gate and with the gate always open (the worst case).

Time: each repeat runs every method once, in an order that cycles through all permutations of the methods (so
each method runs equally often in each position and after each other method), and the ratio of each KDS run to
the Best-of-N run of the same repeat is the paired measurement; mean ± SE over repeats. Reported three ways:

* wall time (what the issue asks for), which on a shared machine carries the other jobs' noise;
* CPU time of this process (``time.process_time``; one thread with OMP_NUM_THREADS=1), which other jobs disturb
  much less;
* the overhead outside the UNet: (run time - time inside UNet calls) of KDS minus that of Best-of-N, over
  Best-of-N's run time. The UNet calls are identical in both and dominate the noise; this is everything KDS
  adds (the patch wrapper, x0/eps conversions, ``steer_x0``, selection), with the UNet's noise removed.

The time inside ``steer_x0`` alone is also accumulated.

Peak memory: on CPU torch allocates through the C allocator, which ``tracemalloc`` does not see, and a warm
allocator reuses freed memory, which hides the peak. So each method runs in a fresh interpreter that reads its
peak resident set size (``VmHWM`` in /proc/self/status, reset by writing 5 to /proc/self/clear_refs just before
sampling) and reports the growth over its resident size at that moment (model built, code paths warmed up);
interleaved over a few rounds, median per method.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cost.py [--quick] [--out DIR]
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from _common import parse_args, progress, write_markdown

import torch

from kds_hook import KDS
from kds_hook.demo.report import fmt_mean_se, markdown_table

CHANNELS = 4
BEST_OF_N = "Best-of-N"


def tiny_unet(channels: int, sample_size: int):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval()


def sharpness_pick(x: torch.Tensor) -> int:
    """Best-of-N's picker: the particle with the most high-frequency energy (Laplacian)."""
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return int(lap.square().flatten(1).sum(1).argmax())


class TimedKDS(KDS):
    """KDS that accumulates the wall time spent in ``steer_x0``."""

    seconds = 0.0

    def steer_x0(self, denoised, sigma=None, **kwargs):
        start = time.perf_counter()
        out = super().steer_x0(denoised, sigma, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


class TimedUNet:
    """The UNet, accumulating the wall time of its calls."""

    def __init__(self, unet):
        self.unet = unet
        self.seconds = 0.0

    def __call__(self, z: torch.Tensor, t) -> torch.Tensor:
        start = time.perf_counter()
        out = self.unet(z, t).sample
        self.seconds += time.perf_counter() - start
        return out


def unet_call(unet):
    """The UNet as ``(z, t) -> eps``, untimed."""
    return lambda z, t: unet(z, t).sample


def make_scheduler(steps: int, kds: Optional[KDS]):
    """A fresh DDIMScheduler, patched with ``kds`` when given (the same config for every method)."""
    from diffusers import DDIMScheduler

    from kds_hook.diffusers import apply_patch

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    if kds is not None:
        apply_patch(scheduler, kds)
    return scheduler


@torch.no_grad()
def sample(unet, scheduler, noise: torch.Tensor, kds: Optional[KDS]) -> torch.Tensor:
    """One item's N particles; the same loop for every method, only the scheduler's patch differs."""
    z = noise
    for t in scheduler.timesteps:
        z = scheduler.step(unet(z, t), t, z, eta=0.0).prev_sample
    if kds is not None:
        return kds.select(z).sample
    return z[sharpness_pick(z)]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def setup(quick: bool):
    n, steps, repeats, size = (4, 4, 6, 16) if quick else (10, 20, 12, 32)
    unet = tiny_unet(CHANNELS, size)
    noise = torch.randn(n, CHANNELS, size, size, generator=torch.Generator().manual_seed(0))
    methods = {
        BEST_OF_N: lambda: None,
        "KDS (paper gate)": lambda: TimedKDS(num_particles=n),
        "KDS (always on)": lambda: TimedKDS(num_particles=n, threshold=0.0),
    }
    return unet, noise, methods, (n, steps, repeats, size)


def run_once(unet, noise, steps: int, make_kds) -> Dict[str, float]:
    """Times one sampling run: wall, CPU, inside the UNet and inside ``steer_x0`` (seconds)."""
    kds = make_kds()
    scheduler = make_scheduler(steps, kds)
    timed_unet = TimedUNet(unet)
    wall, cpu = time.perf_counter(), time.process_time()
    sample(timed_unet, scheduler, noise, kds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "unet": timed_unet.seconds, "steer": 0.0 if kds is None else kds.seconds}


def child_peak_memory(method: str, quick: bool) -> None:
    """In a fresh process: the growth of peak RSS over one sampling run (printed as the last line)."""
    unet, noise, methods, (n, steps, _, _) = setup(quick)
    # One-time lazy initialisation (einops' torch backend, kernel registrations, the UNet's first-call buffers) is
    # not a method's working set: every child first runs both code paths on a tiny 2-particle 8x8 ensemble alike.
    small = noise[:2, :, :8, :8].clone()
    for warm_kds in (None, KDS(num_particles=2, threshold=0.0)):
        sample(unet_call(unet), make_scheduler(2, warm_kds), small, warm_kds)
    kds = methods[method]()
    scheduler = make_scheduler(steps, kds)
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    sample(unet_call(unet), scheduler, noise, kds)
    print((_status_kb("VmHWM") - base) / 1024)


def peak_memory(method: str, quick: bool) -> float:
    """Runs :func:`child_peak_memory` in a fresh interpreter: a warm allocator would hide the peak."""
    env = dict(os.environ, KDS_BENCH_COST_CHILD=method, KDS_BENCH_COST_QUICK="1" if quick else "")
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, OSError, IndexError) as err:
        progress(f"peak memory of {method} not measured: {err}")
        return float("nan")


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    if os.environ.get("OMP_NUM_THREADS") != "1":
        progress("warning: run with OMP_NUM_THREADS=1 for comparable numbers")
    unet, noise, methods, (n, steps, repeats, size) = setup(args.quick)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    names = list(methods)
    for name in names:  # warm-up: first-call allocations and caches of every code path
        run_once(unet, noise, steps, methods[name])
    orders = list(itertools.permutations(names))
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in orders[rep % len(orders)]:
            runs[name].append(run_once(unet, noise, steps, methods[name]))
            progress(f"repeat {rep + 1}/{repeats} {name}: {runs[name][-1]['wall']:.2f} s")
    rounds = 5  # peak RSS moves by several MiB between identical processes: show the spread
    peaks: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            peaks[name].append(peak_memory(name, args.quick))
            progress(f"peak memory {name} (round {r + 1}/{rounds}): +{peaks[name][-1]:.1f} MiB")
    peak = {name: statistics.median(values) for name, values in peaks.items()}
    spread = {name: f"{peak[name]:.1f} [{min(values):.1f}-{max(values):.1f}]" for name, values in peaks.items()}

    def series(name: str, key: str) -> torch.Tensor:
        return torch.tensor([run[key] for run in runs[name]], dtype=torch.float64)

    bon = {key: series(BEST_OF_N, key) for key in ("wall", "cpu", "unet")}
    rows = []
    for name in names:
        wall, cpu = series(name, "wall"), series(name, "cpu")
        if name == BEST_OF_N:
            rows.append([name, fmt_mean_se(wall, 2), "", "", "", "", spread[name], ""])
            continue
        outside = (wall - series(name, "unet")) - (bon["wall"] - bon["unet"])
        rows.append([
            name,
            fmt_mean_se(wall, 2),
            fmt_mean_se(100 * (wall / bon["wall"] - 1), 2, signed=True),
            fmt_mean_se(100 * (cpu / bon["cpu"] - 1), 2, signed=True),
            fmt_mean_se(100 * outside / bon["wall"], 2, signed=True),
            fmt_mean_se(100 * series(name, "steer") / wall, 2),
            spread[name],
            f"{100 * (peak[name] / peak[BEST_OF_N] - 1):+.1f}" if peak[BEST_OF_N] > 0 else "",
        ])
    table = markdown_table(
        ["method", "wall time (s)", "wall time vs Best-of-N (%)", "CPU time vs Best-of-N (%)",
         "overhead outside the UNet (% of Best-of-N)", "time inside steer_x0 (%)", "peak RSS growth, median [min-max] (MiB)",
         "peak vs Best-of-N (%)"],
        rows,
    )
    body = (
        f"N={n} particles of a {CHANNELS}x{size}x{size} latent, DDIM {steps} steps, UNet2DModel with 4 down/4 up "
        f"blocks ({params:.1f} M random parameters), CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"{repeats} repeats cycling through all {len(orders)} orders of the methods (mean ± SE; every ratio is "
        f"paired within a repeat); peak memory: median and range of {rounds} fresh processes per method. "
        f"torch {torch.__version__}.\n\n" + table
    )
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cost.py" + (" --quick" if args.quick else "")
    write_markdown(args.out, "cost", command, body, args.quick)


if __name__ == "__main__":
    if os.environ.get("KDS_BENCH_COST_CHILD"):
        child_peak_memory(os.environ["KDS_BENCH_COST_CHILD"], bool(os.environ.get("KDS_BENCH_COST_QUICK")))
    else:
        main()
