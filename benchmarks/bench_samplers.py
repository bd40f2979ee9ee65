"""KDS with different samplers: k-diffusion's samplers on the paper's Figure 2 problem, paired against plain.

The model is the exact denoiser of the three 2-D Gaussians (kds_hook.analytic); 64 ensembles of N = 50
particles, 20 Karras steps (sigma 14.6 to 0.03), the same initial noise for plain and KDS runs (and, for the
ancestral and SDE samplers, the same global seed before each run). The gate is the paper's: steering while
sigma >= 0.83, where Stable Diffusion's schedule reaches t/T = 0.3 (a continuous-time model has no t/T of its
own); "no gate" steers at every evaluation. Metric: mean distance to the nearest mode per ensemble; paired
difference KDS - plain, mean ± SE over the ensembles.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_samplers.py [--quick] [--out DIR]
"""

from __future__ import annotations

import warnings

import torch
from _common import parse_args, progress, write_markdown

from kds_hook import KDS
from kds_hook.analytic import three_gaussians
from kds_hook.demo.report import fmt_mean_se, markdown_table
from kds_hook.k_diffusion import KDSDenoiser, sample
from kds_hook.k_diffusion_loader import load_k_diffusion

SAMPLERS = [
    "sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
    "sample_euler_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m_sde",
]
GATES = {"paper's gate (sigma >= 0.83)": 0.83, "no gate": 0.0}


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    # torchsde compares k-diffusion's float32 sigma_max with its float64 copy: harmless, not ours.
    warnings.filterwarnings("ignore", message="Should have tb<=t1")
    ensembles, n, steps = (8, 10, 6) if args.quick else (64, 50, 20)
    K = load_k_diffusion().sampling
    mixture = three_gaussians()
    sigmas = K.get_sigmas_karras(steps, 0.03, 14.6, device="cpu").double()
    x = torch.randn(ensembles * n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def distance(points: torch.Tensor) -> torch.Tensor:  # per ensemble
        return torch.cdist(points, mixture.means).min(dim=1).values.reshape(ensembles, n).mean(dim=1)

    rows = []
    for name in SAMPLERS:
        sampler = getattr(K, name)
        calls = []

        def counted(z, sigma, **extra):
            calls.append(1)
            return mixture(z, sigma)

        torch.manual_seed(1)
        plain = distance(sampler(counted, x, sigmas, disable=True))
        cells = [name.replace("sample_", ""), str(len(calls)), fmt_mean_se(plain, 3)]
        for gate in GATES.values():
            kds = KDS(num_particles=n)
            torch.manual_seed(1)
            model = KDSDenoiser(mixture, kds, sigma_threshold=gate)
            steered = sample(sampler, model, x, sigmas, kds, return_all=True, disable=True).particles
            cells.append(fmt_mean_se(distance(steered) - plain, 3, signed=True))
        rows.append(cells)
        progress(f"{name} done")
    table = markdown_table(
        ["sampler", "model evaluations", "plain: mean distance to nearest mode"]
        + [f"KDS - plain, {gate}" for gate in GATES],
        rows,
    )
    body = (
        f"Three 2-D Gaussians, exact denoiser, {ensembles} ensembles of N={n}, {steps} Karras steps, KDS h=0.3, "
        "strength 0.3, patch = the whole 2-D point; mean ± SE over ensembles, negative = KDS tighter.\n\n" + table
    )
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_samplers.py" + (" --quick" if args.quick else "")
    write_markdown(args.out, "samplers", command, body, args.quick)


if __name__ == "__main__":
    main()
