"""PatchMeanShift against the literal loop and the naive broadcast formulation: time and peak memory.

Run with one thread (``make bench`` does)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_meanshift.py [--quick] [--markdown]

Time: median CPU time of repeats, one thread, ratios measured side by side in the same process. Peak memory:
each (case, method) runs once in a fresh subprocess, which resets its peak resident set size just before the
call (Linux ``/proc/self/clear_refs``) and reports the growth of that peak (``VmHWM``) over the resident size
with the input already allocated. torch's CPU allocator hands large blocks to and from the OS, so this
high-water mark is the largest simultaneous working set of the call, output included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from einops import rearrange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import kds_hook.meanshift as meanshift_module  # noqa: E402
from kds_hook._checks import check_finite  # noqa: E402
from kds_hook import PatchMeanShift  # noqa: E402

BANDWIDTH = 1.0
STRENGTH = 0.3
LATENTS = {"SD 4x64x64": (4, 64, 64), "LDM-SR 3x128x128": (3, 128, 128)}


def naive_mean_shift(
    x: torch.Tensor, num_particles: int, bandwidth: float, patch: int, strength: float
) -> torch.Tensor:
    """The broadcast formulation: materialises the (B, L, N, N, D) difference tensor, as minKDS does, but with
    our kernel exp(-||d||^2 / (2 h^2)). The weighted sum is a batched matmul (cheaper than broadcasting it)."""
    size = x.shape[2] // patch
    grouped = x.reshape(-1, num_particles, *x.shape[1:])
    p = rearrange(grouped, "b n c (h p1) (w p2) -> b (h w) n (c p1 p2)", p1=patch, p2=patch)
    diff = p.unsqueeze(3) - p.unsqueeze(2)  # (B, L, N, N, D)
    weights = torch.softmax(-diff.square().sum(-1) / (2 * bandwidth**2), dim=-1)
    steered = p + strength * (weights @ p - p)
    return rearrange(steered, "b (h w) n (c p1 p2) -> (b n) c (h p1) (w p2)", p1=patch, p2=patch, h=size)


def ours(x: torch.Tensor, num_particles: int, bandwidth: float, patch: int, strength: float) -> torch.Tensor:
    # The NaN/Inf check is timed separately (see the doc): the naive formulation has none.
    return PatchMeanShift(patch, bandwidth)(x, num_particles, strength, check_finite_values=False)


def with_layout(layout: str) -> Callable:
    """Our operator with its distance/weighted-sum layout forced ('elementwise' or 'matmul')."""

    def run(*args):
        saved = meanshift_module._use_matmul
        meanshift_module._use_matmul = lambda n, dim: layout == "matmul"
        try:
            return ours(*args)
        finally:
            meanshift_module._use_matmul = saved

    return run


METHODS: Dict[str, Callable] = {
    "ours": ours,
    "elementwise": with_layout("elementwise"),
    "matmul": with_layout("matmul"),
    "naive": naive_mean_shift,
}


def _cpu_time(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def median_times(fns: Dict[str, Callable[[], object]], budget_s: float, max_rounds: int) -> Dict[str, float]:
    """Median CPU time of each function over interleaved rounds, after one warm-up call each.

    CPU time rather than wall time: the benchmark machine's cores are shared, and waiting for a core is not
    the operator's cost. Rounds interleave the functions (each round times every function once), so slow
    drifts in machine load hit all of them alike and their ratios stay meaningful; each timed call follows an
    untimed call of the same function, as in a sampler that steers at every step. Stops after
    ``max_rounds`` rounds, or once at least 3 rounds have used up ``budget_s``; a round whose warm-up alone
    exceeded the budget is done once.
    """
    warm = sum(_cpu_time(fn) for fn in fns.values())
    times: Dict[str, List[float]] = {name: [] for name in fns}
    spent = 0.0
    for round_ in range(max_rounds):
        if round_ >= 3 and spent >= budget_s or round_ >= 1 and warm > budget_s:
            break
        for name, fn in fns.items():
            # An untimed call first: otherwise the first function of a round pays for faulting in the pages
            # that the previous function (the naive one, with its big tensors) handed back to the OS.
            if warm <= budget_s:
                fn()
            times[name].append(_cpu_time(fn))
            spent += times[name][-1]
    return {name: statistics.median(values) for name, values in times.items()}


def make_input(shape, n: int) -> torch.Tensor:
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(0))


def peak_memory_mib(method: str, shape, n: int, patch: int) -> float:
    """Peak RSS growth of one call, in MiB, measured in a fresh interpreter."""
    args = json.dumps({"method": method, "shape": list(shape), "n": n, "patch": patch})
    result = subprocess.run(
        [sys.executable, __file__, "--memory-probe", args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(spec: str) -> None:
    args = json.loads(spec)
    fn = METHODS[args["method"]]
    fn(make_input((args["shape"][0], 8, 8), 4), 4, BANDWIDTH, 1, STRENGTH)  # load kernels on a tiny input
    x = make_input(args["shape"], args["n"])
    # Reset the peak-RSS mark (Linux: writing 5 to clear_refs sets VmHWM to the current RSS), so imports and
    # set-up do not hide a smaller peak of the call itself.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn(x, args["n"], BANDWIDTH, args["patch"], STRENGTH)
    print((_status_kib("VmHWM") - before) / 1024)


def check_agreement() -> None:
    """The naive formulation, both layouts and the literal loop agree before anything is timed."""
    from reference import reference_mean_shift

    x = make_input((4, 8, 8), 6).double()
    expected = reference_mean_shift(x, 3, BANDWIDTH, 2, STRENGTH)
    for name, fn in METHODS.items():
        err = (fn(x, 3, BANDWIDTH, 2, STRENGTH) - expected).abs().max().item()
        assert err < 1e-10, f"{name} disagrees with the literal loop: {err}"


def literal_loop_rows() -> List[str]:
    from reference import reference_mean_shift

    x = make_input((4, 16, 16), 4)
    rows = []
    for patch in (1, 2):
        loop = median_times({"loop": lambda: reference_mean_shift(x, 4, BANDWIDTH, patch, STRENGTH)}, 1.0, 1)["loop"]
        fast = median_times({"ours": lambda: ours(x, 4, BANDWIDTH, patch, STRENGTH)}, 0.5, 50)["ours"]
        rows.append(f"| 4x16x16, N=4, patch {patch} | {loop * 1e3:.0f} | {fast * 1e3:.2f} | {loop / fast:.0f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {10, 32} only, fewer repeats, no memory runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        torch.set_num_threads(1)
        memory_probe(args.memory_probe)
        return
    torch.set_num_threads(1)
    check_agreement()
    counts = (10, 32) if args.quick else (4, 10, 32, 64)
    budget = 0.3 if args.quick else 2.0
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bandwidth {BANDWIDTH}, float32")
    print()
    print(
        "| latent | N | patch | D | ours ms | elementwise ms | matmul ms | naive ms | speed-up "
        "| peak MiB ours | peak MiB naive | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, shape in LATENTS.items():
        for n in counts:
            for patch in (1, 2, 4):
                x = make_input(shape, n)
                calls = {name: (lambda fn=fn: fn(x, n, BANDWIDTH, patch, STRENGTH)) for name, fn in METHODS.items()}
                times = median_times(calls, budget, 15)
                if args.quick or args.no_memory:
                    mem = "| - | - | - |"
                else:
                    ours_mib = peak_memory_mib("ours", shape, n, patch)
                    naive_mib = peak_memory_mib("naive", shape, n, patch)
                    ratio = f"{ours_mib / naive_mib:.3f}" if naive_mib > 0 else "-"
                    mem = f"| {ours_mib:.1f} | {naive_mib:.1f} | {ratio} |"
                print(
                    f"| {label} | {n} | {patch} | {shape[0] * patch * patch} | {times['ours'] * 1e3:.1f} | "
                    f"{times['elementwise'] * 1e3:.1f} | {times['matmul'] * 1e3:.1f} | {times['naive'] * 1e3:.1f} | "
                    f"{times['naive'] / times['ours']:.1f}x {mem}",
                    flush=True,
                )
    print()
    print("| NaN/Inf check (check_finite, on by default, left out above), N=10 | ms |")
    print("|---|---|")
    for label, shape in LATENTS.items():
        x = make_input(shape, 10)
        cost = median_times({"check": lambda x=x: check_finite(x)}, budget, 15)["check"]
        print(f"| {label} | {cost * 1e3:.2f} |", flush=True)
    print()
    print("| literal loop case | loop ms | ours ms | speed-up |")
    print("|---|---|---|---|")
    for row in literal_loop_rows():
        print(row, flush=True)


if __name__ == "__main__":
    main()
