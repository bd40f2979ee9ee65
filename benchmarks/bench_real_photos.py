"""KDS on real photos: 4x super-resolution of the held-out photos with the built-in model, paired against plain
sampling from the same noise, with shrinkage controls.

Ground truths are crops of the held-out photos (:data:`kds_hook.sr.HELD_OUT_PHOTOS`, never used for training or
tuning), shrunk 4x by antialiased bicubic resampling and rounded to 8 bits. Every sampler starts from the same
initial noise per (crop, seed). Methods:

* bicubic upsampling;
* plain DDIM with N particles: a random particle (particle 0), the closest-to-mean particle (Eq. 9: what KDS's
  selection picks, here from unsteered particles), Best-of-N with an oracle (the particle with the lowest error
  against the ground truth) and with two no-reference pickers (the particle most consistent with the input: least
  error after 4x bicubic downsampling; and the sharpest: most Laplacian energy), and the N-particle average
  (the ensemble mean);
* KDS with the paper's settings (h=0.3, patch 1, delta=0.3 while t/T >= 0.3), with bandwidth "auto", and without
  the gate (delta=0.3 at every step); each output is the closest-to-mean particle;
* controls the paper does not run: the plain ensemble mean, and a matched shrinkage of plain sampling's output s
  toward the plain ensemble mean m, s + a (m - s), with a per image such that ||s_a - m|| / ||s - m|| equals
  ||k - m_k|| / ||s - m|| for KDS's output k and KDS's own ensemble mean m_k (clipped to a in [0, 1]): as close
  to its ensemble's mean as KDS's output is to its own, in the model's latent space.

Scores: PSNR and SSIM (scikit-image) and LPIPS (AlexNet, lin) against the ground truth, and CPU time per image.
Also the paper's Figure 4 view (the worst plain particle against the KDS output) and a small sweep of h and N.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_real_photos.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch

from _common import progress, write_markdown

from kds_hook import KDS
from kds_hook.demo.photo import (
    PhotoRun,
    load_lpips_or_none,
    matched_shrinkage,
    low_resolution,
    photo_crop,
    plot_crops,
    score_label,
    sample_particles,
    score_images,
)
from kds_hook.demo.report import fmt_mean_se, markdown_table
from kds_hook.sr import HELD_OUT_PHOTOS, bicubic_downsample, load_builtin, load_pipeline

PAPER = {"bandwidth": 0.3}
KDS_CONFIGS = {
    "KDS (paper: h=0.3)": PAPER,
    "KDS auto": {"bandwidth": "auto"},
    "KDS h=0.3, no gate": {"bandwidth": 0.3, "threshold": 0.0},
}
CENTRES = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)]
LOWER_IS_BETTER = {"lpips"}


def pick(run: PhotoRun, scores_per_particle: torch.Tensor, largest: bool) -> torch.Tensor:
    """Images (B, 3, H, W): per input the particle with the largest (or smallest) score (B, N)."""
    index = scores_per_particle.argmax(1) if largest else scores_per_particle.argmin(1)
    return run.grouped()[torch.arange(index.numel()), index]


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    x = images
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.square().flatten(1).sum(1)


def plot_worst(joined: Dict[str, Dict[str, torch.Tensor]], metrics: List[str], path: str) -> None:
    """The paper's Figure 4: KDS output against the worst plain particle, one point per (crop, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("psnr", "lpips") if m in metrics]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        x = joined["plain: worst particle" + (" by LPIPS" if m == "lpips" else "")][m]
        for name, marker in (("KDS (paper: h=0.3)", "o"), ("plain: closest to mean", "x")):
            ax.scatter(x, joined[name][m], s=14, marker=marker, label=name, alpha=0.8)
        y = joined["KDS (paper: h=0.3)"][m]
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8)
        ax.set_xlabel(f"worst plain particle ({m.upper()})")
        ax.set_ylabel(f"output ({m.upper()})")
        side = "above" if m == "psnr" else "below"
        ax.set_title(f"{m.upper()}: {side} the line = better than the worst", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not the documented numbers")
    parser.add_argument("--out", default="bench-results", help="folder for the markdown and figures")
    parser.add_argument("--model", default=None, help="a saved pipeline folder (default: the built-in model)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def main() -> None:
    args = parse_args()
    if args.quick:
        photos, centres, size, seeds, n, steps = HELD_OUT_PHOTOS[:2], CENTRES[:1], 32, 1, 4, 3
        h_sweep, n_sweep = [1.0], [3]
    else:
        photos, centres, size, seeds, n, steps = HELD_OUT_PHOTOS, CENTRES, 64, 2, 10, 20
        h_sweep, n_sweep = [0.1, 0.6, 1.0], [5, 20]
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model) if args.model else load_builtin()
    lpips_model = load_lpips_or_none(progress)
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips_model is not None else [])
    truth = torch.stack([photo_crop(p, size, c) for p in photos for c in centres])
    low_res = low_resolution(truth)
    crops = truth.shape[0]
    bicubic = ((pipe.upsample(low_res) + 1) / 2).clamp(0, 1).float()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return (pipe.decoder.decode(latents, pipe.upsample(low_res)) + 1) / 2

    def noise_for(seed: int, particles: int) -> torch.Tensor:
        # (crops, max N, ...) drawn once per seed: every N uses the first N particles' noise of each crop
        full = torch.randn(crops, max([n] + n_sweep), 3, size, size, generator=torch.Generator().manual_seed(seed))
        return full[:, :particles].reshape(-1, 3, size, size)

    per_unit: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    seconds: Dict[str, List[float]] = {}
    extras: Dict[str, List[torch.Tensor]] = {"a": [], "plain_sel_idx": [], "kds_sel_idx": []}
    figure_rows = []

    def record(name: str, images: torch.Tensor) -> None:
        for metric, values in score_images(images, truth, lpips_model).items():
            per_unit.setdefault(name, {}).setdefault(metric, []).append(values)

    def record_particles(name: str, run: PhotoRun) -> Dict[str, torch.Tensor]:
        """Scores of every particle, (B, N) per metric."""
        flat = score_images(run.images, truth.repeat_interleave(run.num_particles, 0), lpips_model)
        return {m: v.reshape(crops, run.num_particles) for m, v in flat.items()}

    for seed in range(seeds):
        noise = noise_for(seed, n)
        progress(f"seed {seed}: plain, {crops} crops x N={n}, DDIM {steps} steps")
        plain = sample_particles(pipe, low_res, noise, n, num_inference_steps=steps)
        seconds.setdefault("plain DDIM", []).append(plain.seconds / crops)
        plain_out, plain_idx = plain.selected()
        particles = record_particles("plain", plain)
        record("bicubic", bicubic)
        record("plain: random particle", plain.grouped()[:, 0])
        record("plain: closest to mean", plain_out)
        record("plain: worst particle", pick(plain, particles["psnr"], largest=False))
        if "lpips" in particles:
            record("plain: worst particle by LPIPS", pick(plain, particles["lpips"], largest=True))
        mse = (plain.grouped() - ((truth + 1) / 2).unsqueeze(1)).square().flatten(2).mean(2)
        record("Best-of-N: oracle (lowest MSE)", pick(plain, mse, largest=False))
        lr_err = bicubic_downsample(plain.images * 2 - 1) - low_res.repeat_interleave(n, 0)
        lr_err = lr_err.square().flatten(1).mean(1)
        record("Best-of-N: most consistent with LR", pick(plain, lr_err.reshape(crops, n), largest=False))
        record("Best-of-N: sharpest", pick(plain, laplacian_energy(plain.images).reshape(crops, n), largest=True))
        plain_mean_latent = plain.latents.reshape(crops, n, *plain.latents.shape[1:]).mean(1)
        record("plain ensemble mean (N-average)", decode(plain_mean_latent))
        for label, config in KDS_CONFIGS.items():
            progress(f"seed {seed}: {label}")
            steered = sample_particles(pipe, low_res, noise, n, kds=KDS(n, **config), num_inference_steps=steps)
            seconds.setdefault(label, []).append(steered.seconds / crops)
            kds_out, kds_idx = steered.selected()
            record(label, kds_out)
            a, shrunk = matched_shrinkage(plain, steered)
            record(f"matched shrinkage for {label}", decode(shrunk))
            if config is PAPER:
                extras["a"].append(a)
                extras["plain_sel_idx"].append(plain_idx)
                extras["kds_sel_idx"].append(kds_idx)
                kds_particles = record_particles(label, steered)
                record("KDS (paper): worst particle", pick(steered, kds_particles["psnr"], largest=False))
                if seed == 0:
                    for i in range(0, crops, len(centres)):  # one crop per photo
                        row = {"lr": (low_res[i] + 1) / 2, "bicubic": bicubic[i], "plain": plain_out[i],
                               "kds": kds_out[i], "truth": (truth[i] + 1) / 2}
                        for key, name in (("bicubic", "bicubic"), ("plain", "plain: closest to mean"), ("kds", label)):
                            row[f"{key}_label"] = score_label({m: v[-1][i] for m, v in per_unit[name].items()})
                        figure_rows.append(row)
    # sweeps on seed 0: h at N, and N at h=0.3 (plain rerun at each N: its ensemble changes with N)
    sweep: Dict[str, Dict[str, torch.Tensor]] = {}
    noise = noise_for(0, n)
    plain0 = {m: torch.cat(v[:1]) for m, v in per_unit["plain: closest to mean"].items()}
    for h in h_sweep:
        progress(f"sweep: h={h}, N={n}")
        run = sample_particles(pipe, low_res, noise, n, kds=KDS(n, bandwidth=h), num_inference_steps=steps)
        scores = score_images(run.selected()[0], truth, lpips_model)
        sweep[f"h={h:g}, N={n}"] = {m: scores[m] - plain0[m] for m in metrics}
    sweep[f"h=0.3, N={n}"] = {
        m: torch.cat(per_unit["KDS (paper: h=0.3)"][m][:1]) - plain0[m] for m in metrics
    }
    for particles in n_sweep:
        progress(f"sweep: N={particles}, plain and h=0.3")
        noise_n = noise_for(0, particles)
        plain_n = sample_particles(pipe, low_res, noise_n, particles, num_inference_steps=steps)
        base = score_images(plain_n.selected()[0], truth, lpips_model)
        run = sample_particles(pipe, low_res, noise_n, particles, kds=KDS(particles, **PAPER),
                               num_inference_steps=steps)
        scores = score_images(run.selected()[0], truth, lpips_model)
        sweep[f"h=0.3, N={particles}"] = {m: scores[m] - base[m] for m in metrics}

    joined = {name: {m: torch.cat(v) for m, v in values.items()} for name, values in per_unit.items()}
    units = crops * seeds
    sections = [
        f"Held-out photos {', '.join(photos)}; {len(centres)} crops of {size}x{size} each ({crops} crops), LR "
        f"{size // 4}x{size // 4} (antialiased bicubic, 8-bit); N={n}, DDIM {steps} steps (the built-in "
        f"scheduler), {seeds} noise seeds per crop: {units} (crop, seed) pairs. Mean ± SE over those pairs "
        "(crops of one photo are not independent: the per-photo table shows whether an effect holds on every "
        "photo). LPIPS lower is better. Time: CPU seconds per output image (N particles), one thread."
        + ("" if lpips_model is not None else " **LPIPS skipped: weights missing.**")
    ]
    headers = ["method"] + [m.upper() for m in metrics]
    rows = [[name] + [fmt_mean_se(values[m], 4 if m != "psnr" else 3) for m in metrics]
            for name, values in joined.items()]
    sections.append("### Absolute scores\n\n" + markdown_table(headers, rows))
    time_rows = [[name, fmt_mean_se(torch.tensor(v), 2)] for name, v in seconds.items()]
    plain_time = torch.tensor(seconds["plain DDIM"])
    for name, v in seconds.items():
        if name != "plain DDIM":
            time_rows.append([f"{name} / plain", f"{float(torch.tensor(v).sum() / plain_time.sum()):.3f}"])
    sections.append("### Time per image (CPU s)\n\n" + markdown_table(["method", "seconds"], time_rows))

    def diff_rows(pairs):
        out = []
        for a_name, b_name in pairs:
            cells = []
            for m in metrics:
                d = joined[a_name][m] - joined[b_name][m]
                better = (d < 0) if m in LOWER_IS_BETTER else (d > 0)
                share = 100 * float(better.double().mean())
                cells.append(f"{fmt_mean_se(d, 4 if m != 'psnr' else 3, signed=True)} ({share:.0f} %)")
            out.append([f"{a_name} - {b_name}"] + cells)
        return out

    pairs = [("KDS (paper: h=0.3)", "plain: closest to mean"), ("KDS auto", "plain: closest to mean"),
             ("KDS h=0.3, no gate", "plain: closest to mean"), ("KDS (paper: h=0.3)", "plain: random particle")]
    for label in KDS_CONFIGS:
        pairs += [(label, "plain ensemble mean (N-average)"), (label, f"matched shrinkage for {label}")]
    pairs += [("KDS (paper: h=0.3)", "Best-of-N: oracle (lowest MSE)"),
              ("KDS (paper: h=0.3)", "Best-of-N: most consistent with LR"),
              ("KDS (paper: h=0.3)", "Best-of-N: sharpest")]
    sections.append(
        "### Paired differences (same crop, same noise), mean ± SE (% of pairs where the first is better)\n\n"
        + markdown_table(["difference"] + [m.upper() for m in metrics], diff_rows(pairs))
    )
    a = torch.cat(extras["a"])
    same = (torch.cat(extras["plain_sel_idx"]) == torch.cat(extras["kds_sel_idx"])).double()
    sections.append(
        f"Matched shrinkage factor a for the paper's KDS: mean {float(a.mean()):.3f}, range "
        f"{float(a.min()):.3f}-{float(a.max()):.3f}. KDS and plain sampling select the same particle index in "
        f"{100 * float(same.mean()):.0f} % of pairs."
    )
    worst = [("KDS (paper: h=0.3)", "plain: worst particle"), ("plain: closest to mean", "plain: worst particle"),
             ("KDS (paper): worst particle", "plain: worst particle")]
    if "lpips" in metrics:
        worst += [("KDS (paper: h=0.3)", "plain: worst particle by LPIPS"),
                  ("plain: closest to mean", "plain: worst particle by LPIPS")]
    fig4 = diff_rows(worst)
    plot_worst(joined, metrics, os.path.join(args.out, "real_photos_worst.png"))
    sections.append("### The paper's Figure 4 view: against the worst plain particle (by PSNR, or by LPIPS)\n\n"
                    + markdown_table(["difference"] + [m.upper() for m in metrics], fig4)
                    + "\n\n![KDS output and plain output against the worst plain particle](real_photos_worst.png)")
    per_photo = []
    for p_i, photo in enumerate(photos):
        mask = torch.zeros(crops, dtype=torch.bool)
        mask[p_i * len(centres) : (p_i + 1) * len(centres)] = True
        mask = mask.repeat(seeds)
        cells = []
        for m in metrics:
            d = joined["KDS (paper: h=0.3)"][m] - joined["plain: closest to mean"][m]
            cells.append(fmt_mean_se(d[mask], 4 if m != "psnr" else 3, signed=True))
        per_photo.append([photo] + cells)
    sections.append("### KDS (paper) - plain output, per photo\n\n"
                    + markdown_table(["photo"] + [m.upper() for m in metrics], per_photo))
    sweep_rows = [[name] + [fmt_mean_se(v[m], 4 if m != "psnr" else 3, signed=True) for m in metrics]
                  for name, v in sweep.items()]
    sections.append(f"### Sweep (seed 0 only, {crops} crops): KDS output - plain output at the same N\n\n"
                    + markdown_table(["setting"] + [m.upper() for m in metrics], sweep_rows))
    figure = os.path.join(args.out, "real_photos.png")
    plot_crops(figure_rows, figure, titles=[photos[i] for i in range(len(figure_rows))])
    sections.append("![LR, bicubic, plain, KDS, ground truth](real_photos.png)")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_real_photos.py" + (" --quick" if args.quick else "")
    command += f" --model {args.model}" if args.model else ""
    write_markdown(args.out, "real_photos", command, "\n\n".join(sections), args.quick)


if __name__ == "__main__":
    main()
