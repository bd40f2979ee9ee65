"""Robustness (the paper's Figure 4): the worst particle of plain sampling against the KDS output, per image.

On the exact-posterior restoration problem (the demo's, with 8 x 8 latents so that images differ), N = 10
particles are sampled plainly and with KDS from the same noise. Per ground truth we plot the PSNR of the KDS
output (the particle closest to the ensemble mean, Eq. 9) against the PSNR of the worst plain particle (the
paper's comparison) and against the plain output selected the same way (the like-for-like comparison).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_robustness.py [--quick] [--out DIR]
"""

from __future__ import annotations

import os

from _common import parse_args, progress, write_markdown

from kds_hook.demo.report import fmt_mean_se, markdown_table
from kds_hook.demo.restoration import run_restoration

CONFIGS = {"KDS h=0.3": {"bandwidth": 0.3}, "KDS h=0.3, no gate": {"bandwidth": 0.3, "threshold": 0.0}}


def plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = result.metrics["plain"]
    comparisons = [("psnr_worst", "worst plain particle"), ("psnr_selected", "plain output (closest-to-mean)")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, (key, xlabel) in zip(axes, comparisons):
        x = plain[key].numpy()
        for name, colour in zip(CONFIGS, ("tab:green", "tab:orange")):
            ax.scatter(x, result.metrics[name]["psnr_selected"].numpy(), s=12, color=colour, label=name, alpha=0.8)
        lo = min(float(x.min()), min(float(result.metrics[n]["psnr_selected"].min()) for n in CONFIGS)) - 0.2
        hi = max(float(x.max()), max(float(result.metrics[n]["psnr_selected"].max()) for n in CONFIGS)) + 0.2
        ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8)
        ax.set_xlabel(f"PSNR of the {xlabel} (dB)")
        ax.set_ylabel("PSNR of the KDS output (dB)")
        ax.set_aspect("equal")
        ax.legend(fontsize=8)
    fig.suptitle(f"Per ground truth, N={result.num_particles}, same noise; above the line = KDS better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    images, size, steps, n = (8, 4, 10, 5) if args.quick else (64, 8, 50, 10)
    result = run_restoration(CONFIGS, num_images=images, size=size, num_particles=n, num_steps=steps, progress=progress)
    plain = result.metrics["plain"]
    rows, split = [], []
    for name in CONFIGS:
        out = result.metrics[name]["psnr_selected"]
        for key, what in (("psnr_worst", "worst plain particle"), ("psnr_selected", "plain output (closest-to-mean)")):
            diff = out - plain[key]
            rows.append([name, what, fmt_mean_se(out, 2), fmt_mean_se(plain[key], 2), fmt_mean_se(diff, 3, signed=True),
                         f"{100 * float((diff > 0).double().mean()):.0f}"])
        # Like-for-like, split by whether steering changed which particle is closest to the mean.
        diff = out - plain["psnr_selected"]
        same = result.metrics[name]["selected_index"] == plain["selected_index"]
        cells = [name]
        for mask in (same, ~same):
            count = int(mask.sum())
            cells += [str(count), fmt_mean_se(diff[mask], 3, signed=True) if count > 1 else "",
                      f"{100 * float((diff[mask] > 0).double().mean()):.0f}" if count else ""]
        split.append(cells)
    table = markdown_table(
        ["KDS run", "compared with", "KDS output PSNR", "plain PSNR", "paired difference", "% images KDS better"], rows
    ) + "\n\nKDS output against the plain output, split by whether both select the same particle (index):\n\n" + markdown_table(
        ["KDS run", "images, same particle", "difference there", "% KDS better there",
         "images, other particle", "difference there", "% KDS better there"], split
    )
    plot(result, os.path.join(args.out, "robustness.png"))
    body = (
        f"{images} ground truths of 4x{size}x{size}, N={n}, DDIM {steps} steps, patch size 1; mean ± SE over "
        "ground truths.\n\n" + table + "\n\n![KDS output vs plain worst particle](robustness.png)"
    )
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_robustness.py" + (" --quick" if args.quick else "")
    write_markdown(args.out, "robustness", command, body, args.quick)


if __name__ == "__main__":
    main()
