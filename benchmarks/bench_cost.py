"""Cost of KDS against Best-of-N with the same N, sampler and UNet (the paper's Table 4: 28.4 s vs 27.3 s).

Both sample N particles of one item with a tiny random diffusers ``UNet2DModel`` of realistic depth (4 down and
4 up blocks, attention at 8x8) and diffusers' ``DDIMScheduler`` (eta = 0) in a manual loop:

* Best-of-N: eps = UNet(z, t); ``scheduler.step``; at the end one particle is picked by a no-reference score.
  The paper picks by LIQE, an image-quality network we do not have; here the picker is the particle with the
  largest high-frequency energy (a sharpness proxy), which costs about as little as KDS's selection.
* KDS: eps = UNet(z, t); x0 from eps; ``kds.steer_x0``; eps re-derived from the steered x0 (Alg. 2 lines 16-17);
  ``scheduler.step``; at the end the particle closest to the ensemble mean (Eq. 9). Measured with the paper's
  gate and with the gate always open (the worst case).

Wall time: runs are interleaved (the order rotates every repeat) so that load from other processes hits all
methods alike; each repeat gives one ratio against the Best-of-N run next to it, reported as mean ± SE. The time
spent inside ``steer_x0`` is also accumulated, which is the overhead free of timing noise.

Peak memory: on CPU torch allocates through the C allocator, which ``tracemalloc`` does not see, and a warm
allocator reuses freed memory, which hides the peak. So each method runs once more in a fresh interpreter that
reads its peak resident set size (``VmHWM`` in /proc/self/status, reset by writing 5 to /proc/self/clear_refs
just before sampling) and reports the growth over its resident size at that moment (model already built).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cost.py [--quick] [--out DIR]
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

from _common import parse_args, progress, write_markdown

import torch

from kds_hook import KDS
from kds_hook.demo.report import fmt_mean_se, markdown_table

CHANNELS = 4


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


@torch.no_grad()
def sample(unet, scheduler, noise: torch.Tensor, kds=None) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod
    z = noise
    for t in scheduler.timesteps:
        eps = unet(z, t).sample
        if kds is not None:
            a = alphas[int(t)]
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            x0 = kds.steer_x0(x0, t_frac=int(t) / len(alphas))
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
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
    from diffusers import DDIMScheduler

    n, steps, repeats, size = (4, 4, 2, 16) if quick else (10, 20, 8, 32)
    unet = tiny_unet(CHANNELS, size)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    noise = torch.randn(n, CHANNELS, size, size, generator=torch.Generator().manual_seed(0))
    methods = {
        "Best-of-N": lambda: None,
        "KDS (paper gate)": lambda: TimedKDS(num_particles=n),
        "KDS (always on)": lambda: TimedKDS(num_particles=n, threshold=0.0),
    }
    return unet, scheduler, noise, methods, (n, steps, repeats, size)


def child_peak_memory(method: str, quick: bool) -> None:
    """In a fresh process: the growth of peak RSS over one sampling run (printed as the last line)."""
    unet, scheduler, noise, methods, _ = setup(quick)
    # One-time lazy initialisation (einops' torch backend, kernel registrations) is not KDS's working set: warm up
    # on a tiny ensemble first, in every child alike.
    warm = KDS(num_particles=2, threshold=0.0)
    warm.select(warm.steer_x0(torch.randn(2, CHANNELS, 4, 4), t_frac=1.0))
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    sample(unet, scheduler, noise, methods[method]())
    print((_status_kb("VmHWM") - base) / 1024)


def peak_memory(method: str, quick: bool) -> float:
    """Runs :func:`child_peak_memory` in a fresh interpreter: a warm allocator would hide the peak."""
    env = dict(os.environ, KDS_BENCH_COST_CHILD=method, KDS_BENCH_COST_QUICK="1" if quick else "")
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, OSError) as err:
        progress(f"peak memory of {method} not measured: {err}")
        return float("nan")


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    if os.environ.get("OMP_NUM_THREADS") != "1":
        progress("warning: run with OMP_NUM_THREADS=1 for comparable numbers")
    unet, scheduler, noise, methods, (n, steps, repeats, size) = setup(args.quick)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    sample(unet, scheduler, noise, TimedKDS(num_particles=n))  # warm-up: first-call allocations and caches
    names = list(methods)
    times = {name: [] for name in names}
    steer = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            kds = methods[name]()
            start = time.perf_counter()
            sample(unet, scheduler, noise, kds)
            times[name].append(time.perf_counter() - start)
            steer[name].append(0.0 if kds is None else kds.seconds)
            progress(f"repeat {rep + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    peaks = {}
    for name in names:
        peaks[name] = peak_memory(name, args.quick)
        progress(f"peak memory {name}: +{peaks[name]:.1f} MiB")

    bon_t = torch.tensor(times["Best-of-N"], dtype=torch.float64)
    rows = []
    for name in names:
        t = torch.tensor(times[name], dtype=torch.float64)
        s = torch.tensor(steer[name], dtype=torch.float64)
        kds_row = name != "Best-of-N"
        rows.append([
            name,
            fmt_mean_se(t, 2),
            fmt_mean_se(100 * (t / bon_t - 1), 2, signed=True) if kds_row else "",
            fmt_mean_se(100 * s / t, 2) if kds_row else "",
            f"{peaks[name]:.1f}",
            f"{100 * (peaks[name] / peaks['Best-of-N'] - 1):+.1f}" if kds_row and peaks["Best-of-N"] > 0 else "",
        ])
    table = markdown_table(
        ["method", "wall time (s)", "time vs Best-of-N (%)", "time inside steer_x0 (%)", "peak RSS growth (MiB)", "peak vs Best-of-N (%)"],
        rows,
    )
    body = (
        f"N={n} particles of a {CHANNELS}x{size}x{size} latent, DDIM {steps} steps, UNet2DModel with 4 down/4 up "
        f"blocks ({params:.1f} M random parameters), CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"{repeats} interleaved repeats (mean ± SE; the time ratio is paired per repeat). torch {torch.__version__}.\n\n"
        + table
    )
    write_markdown(args.out, "cost", "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cost.py" + (" --quick" if args.quick else ""), body, args.quick)


if __name__ == "__main__":
    if os.environ.get("KDS_BENCH_COST_CHILD"):
        child_peak_memory(os.environ["KDS_BENCH_COST_CHILD"], bool(os.environ.get("KDS_BENCH_COST_QUICK")))
    else:
        main()
