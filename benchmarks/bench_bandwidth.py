"""Which data-driven bandwidth rule matches the best fixed h? A study on the exact-posterior restoration problem.

For every setting (latent scale s, patch size, gate) the same ground truths and initial noise are sampled plainly,
with KDS at a grid of fixed bandwidths h (in units of s, so the grid follows the data's scale), and with KDS
under each candidate rule for ``bandwidth="auto"``. A rule is a pure function of the ensemble, exactly what
:func:`kds_hook.auto_bandwidth` is: ``rule(sq_dists (B, M), num_particles) -> h (B,)``, applied per item and per
call; the script swaps each candidate in for ``kds_hook.meanshift.auto_bandwidth`` while it runs.

Scores, paired against plain sampling from the same noise (mean ± SE over ground truths):

* ``logp``: posterior log-density per pixel, averaged over all N particles (KDS's claim: particles nearer the
  posterior's modes, fewer low-density artifacts);
* ``psnr``: PSNR of the KDS output (the particle closest to the ensemble mean), dB.

For each score and setting the table gives the best fixed h, and for each rule its gain and its paired
difference to that best fixed h; a rule "matches" where that difference is at least -1 SE of the best gain.

The problem is the demo's (:func:`kds_hook.demo.posterior.default_problem`) scaled by s: prior means and
observation noise times s, covariances times s^2 (the same images in other units; the diffusion schedule is not
scaled, so the sampler sees a different signal-to-noise ratio, as with a latent space's scale factor).

The second part runs the same comparison with the built-in super-resolution model on crops of its *training*
photos (never the held-out ones), scored by PSNR and LPIPS of the output.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bandwidth.py [--quick] [--out DIR] [--part exact|learned|both]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Callable, Dict, List, Sequence

import torch

from _common import progress, write_markdown

import kds_hook.meanshift as meanshift
from kds_hook import KDS
from kds_hook.demo.posterior import LinearRestoration, MixturePrior, default_problem, psnr
from kds_hook.demo.report import mean_se, markdown_table
from kds_hook.demo.restoration import make_instance
from kds_hook.demo.sampler import ddim_sample, ddpm_alphas_cumprod, x0_predictor_from_denoiser
from kds_hook.selection import select_particles

Rule = Callable[[torch.Tensor, int], torch.Tensor]


# ---------------------------------------------------------------- candidate rules


def _positive(sq: torch.Tensor) -> torch.Tensor:
    return sq.masked_fill(sq <= 0, float("nan"))


def statistic_rule(statistic: str, factor: float = 1.0) -> Rule:
    """h^2 = factor * statistic(positive squared distances) / (2 log N); statistic "median", "mean" or "qXX"."""

    def rule(sq: torch.Tensor, n: int) -> torch.Tensor:
        pos = _positive(sq)
        if statistic == "median":
            value = pos.nanmedian(dim=1).values
        elif statistic == "mean":
            value = pos.nanmean(dim=1)
        else:
            value = torch.nanquantile(pos, float(statistic[1:]) / 100.0, dim=1)
        return torch.sqrt(factor * value.nan_to_num(0.0) / (2.0 * math.log(n)))

    return rule


def self_weight_rule(target: float) -> Rule:
    """h such that 1 / (1 + (N - 1) mean_pairs exp(-d / 2h^2)) = target: the mean self-weight the kernel would
    give if every particle saw the average pair weight (solved by bisection on log h)."""

    def rule(sq: torch.Tensor, n: int) -> torch.Tensor:
        pos = _positive(sq)
        want = (1.0 / target - 1.0) / (n - 1)  # mean pair weight that gives the target
        hi_d = pos.nan_to_num(0.0).amax(dim=1).clamp_min(1e-30)
        lo_d = pos.nan_to_num(float("inf")).amin(dim=1).clamp(max=hi_d)
        lo, hi = 0.5 * lo_d.log() - 10.0, 0.5 * hi_d.log() + 10.0  # log h brackets
        valid = ~torch.isnan(pos)
        d = pos.nan_to_num(0.0)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            w = torch.exp(-d / (2.0 * torch.exp(2.0 * mid)).unsqueeze(1)) * valid
            mean_w = w.sum(1) / valid.sum(1).clamp_min(1)
            too_wide = mean_w > want
            hi = torch.where(too_wide, mid, hi)
            lo = torch.where(too_wide, lo, mid)
        h = torch.exp(0.5 * (lo + hi))
        return torch.where(valid.any(1), h, torch.zeros_like(h))

    return rule


RULES: Dict[str, Rule] = {
    "median (auto)": meanshift.auto_bandwidth,
    "2 x median": statistic_rule("median", 2.0),
    "4 x median": statistic_rule("median", 4.0),
    "8 x median": statistic_rule("median", 8.0),
    "mean": statistic_rule("mean"),
    "2 x mean": statistic_rule("mean", 2.0),
    "q90": statistic_rule("q90"),
    "self-weight 0.3": self_weight_rule(0.3),
}
FIXED = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf]
# The learned model costs ~1000x more per run: a coarser grid and the rules that did best on the exact problem.
LEARNED_FIXED = [0.1, 0.3, 1.0, 3.0, math.inf]
LEARNED_RULES = ("median (auto)", "4 x median", "8 x median", "mean", "2 x mean")


@contextlib.contextmanager
def using_rule(rule: Rule):
    """``bandwidth="auto"`` computes h with ``rule`` inside the block."""
    original = meanshift.auto_bandwidth
    meanshift.auto_bandwidth = rule
    try:
        yield
    finally:
        meanshift.auto_bandwidth = original


# ---------------------------------------------------------------- the exact problem


def scaled_problem(scale: float) -> LinearRestoration:
    base = default_problem()
    p = base.prior
    return LinearRestoration(MixturePrior(p.means * scale, p.covs * scale**2, p.weights), base.operator,
                             base.noise_std * scale)


def exact_setting(scale: float, patch: int, threshold: float, *, images: int, size: int, particles: int,
                  steps: int, rules: Dict[str, Rule], fixed: Sequence[float]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per-image scores (G,) of plain sampling, each fixed h ("h=..."), and each rule, from the same noise."""
    inst = make_instance(scaled_problem(scale), images, size, seed=0)
    predict = x0_predictor_from_denoiser(inst.posterior, ddpm_alphas_cumprod())
    noise = torch.randn(images * particles, 4, size, size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))

    def score(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        logp = inst.posterior.log_prob(x).reshape(images, particles, -1).mean(dim=(1, 2))
        chosen = select_particles(x, particles, "mean").sample
        return {"logp": logp, "psnr": psnr(chosen, inst.truth, peak_to_peak=2.0 * scale)}

    out = {"plain": score(ddim_sample(predict, noise, num_steps=steps))}
    for h in fixed:
        kds = KDS(particles, patch_size=patch, bandwidth=h * scale, threshold=threshold)
        out[f"h={h:g}"] = score(ddim_sample(predict, noise, num_steps=steps, kds=kds))
    for name, rule in rules.items():
        with using_rule(rule):
            kds = KDS(particles, patch_size=patch, bandwidth="auto", threshold=threshold, record=True)
            out[name] = score(ddim_sample(predict, noise, num_steps=steps, kds=kds))
        steered = [r.bandwidth / scale for r in kds.history if r.strength > 0 and r.bandwidth is not None]
        out[name]["h_range"] = (steered[0], steered[-1])  # mean h over images at the first and last steered call
    return out


# ---------------------------------------------------------------- the learned model, on training-side photos


def learned_setting(patch: int, *, crops: int, size: int, particles: int, steps: int, rules: Dict[str, Rule],
                    fixed: Sequence[float], progress_line=None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per-crop scores (PSNR, and LPIPS sign-flipped so that higher is better) of the built-in model's output on
    crops of the *training* photos (never the held-out ones), plain and with KDS (paper gate) per fixed h and
    rule, all from the same noise."""
    from kds_hook.demo.photo import load_lpips_or_none, low_resolution, photo_crop, sample_particles, score_images
    from kds_hook.sr import TRAIN_PHOTOS, load_builtin

    pipe = load_builtin()
    lpips_model = load_lpips_or_none(progress)
    # everyday colour scenes among the training photos (not the microscopy or deep-field ones), two crops each
    photos = [name for name in ("astronaut", "rocket", "china", "grace_hopper") if name in TRAIN_PHOTOS]
    centres = [(0.35, 0.4), (0.6, 0.6)]
    truth = torch.stack([photo_crop(name, size, c) for name in photos for c in centres][:crops])
    low_res = low_resolution(truth)
    noise = torch.randn(truth.shape[0] * particles, 3, size, size, generator=torch.Generator().manual_seed(1))

    def score(kds=None) -> Dict[str, torch.Tensor]:
        run = sample_particles(pipe, low_res, noise, particles, kds=kds, num_inference_steps=steps)
        scores = score_images(run.selected()[0], truth, lpips_model)
        out = {"psnr": scores["psnr"]}
        if "lpips" in scores:
            out["neg_lpips"] = -scores["lpips"]
        return out

    out = {"plain": score()}
    for h in fixed:
        if progress_line:
            progress_line(f"  h={h:g}")
        out[f"h={h:g}"] = score(KDS(particles, patch_size=patch, bandwidth=h))
    for name, rule in rules.items():
        if progress_line:
            progress_line(f"  {name}")
        with using_rule(rule):
            out[name] = score(KDS(particles, patch_size=patch, bandwidth="auto"))
    return out


# ---------------------------------------------------------------- reading the results


def gains(results: Dict[str, Dict[str, torch.Tensor]], metric: str, sign: float = 1.0) -> Dict[str, torch.Tensor]:
    """Paired gains over plain (positive = better; ``sign=-1`` for lower-is-better metrics)."""
    base = results["plain"][metric]
    return {name: sign * (values[metric] - base) for name, values in results.items() if name != "plain"}


def verdict(gain: Dict[str, torch.Tensor], rules: Sequence[str]) -> Dict[str, object]:
    """Best fixed h by mean gain; each rule's gain, its paired difference to that h, and whether it matches."""
    fixed = {k: v for k, v in gain.items() if k.startswith("h=")}
    best = max(fixed, key=lambda k: float(fixed[k].mean()))
    best_mean, best_se = mean_se(fixed[best])
    rows = {}
    for rule in rules:
        diff_mean, diff_se = mean_se(gain[rule] - fixed[best])
        rows[rule] = (mean_se(gain[rule]), (diff_mean, diff_se), diff_mean >= -best_se)
    return {"best": best, "best_gain": (best_mean, best_se), "rules": rows}


def fmt(pair, digits=3, signed=True) -> str:
    mean, se = pair
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {se:.{digits}f}"


def settings_table(records: List[dict], metric: str, rules: Sequence[str], digits: int) -> str:
    headers = ["setting", "best fixed h", "its gain"] + [f"{r}" for r in rules]
    rows = []
    for rec in records:
        v = rec["verdicts"][metric]
        cells = []
        for rule in rules:
            (g, diff, ok) = v["rules"][rule]
            cells.append(f"{fmt(g, digits)} ({'ok' if ok else 'no'})")
        rows.append([rec["label"], v["best"], fmt(v["best_gain"], digits)] + cells)
    return markdown_table(headers, rows)


def match_counts(records: List[dict], metric: str, rules: Sequence[str]) -> str:
    counts = {r: sum(bool(rec["verdicts"][metric]["rules"][r][2]) for rec in records) for r in rules}
    return ", ".join(f"{r}: {c}/{len(records)}" for r, c in counts.items())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not the documented numbers")
    parser.add_argument("--out", default="bench-results", help="folder for the markdown (default bench-results)")
    parser.add_argument("--part", choices=("exact", "learned", "both"), default="both",
                        help="the exact problem, the built-in model on training photos, or both (default)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    sections = []
    if args.part in ("exact", "both"):
        sections += exact_sections(args.quick)
    if args.part in ("learned", "both"):
        sections += learned_sections(args.quick)
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bandwidth.py" + (" --quick" if args.quick else "")
               + (f" --part {args.part}" if args.part != "both" else ""))
    write_markdown(args.out, f"bandwidth-{args.part}", command, "\n\n".join(sections), args.quick)


def exact_sections(quick: bool) -> List[str]:
    if quick:
        sizes = dict(images=3, size=8, particles=5, steps=10)
        scales, patches, thresholds = [1.0], [1, 4], [0.3]
        fixed = [0.3, 1.0, math.inf]
        rules = {k: RULES[k] for k in ("median (auto)", "mean")}
    else:
        sizes = dict(images=16, size=16, particles=10, steps=50)
        scales, patches, thresholds = [0.5, 1.0, 4.0], [1, 2, 4, 8], [0.3, 0.0]
        fixed, rules = FIXED, RULES
    records = []
    for threshold in thresholds:
        for scale in scales:
            for patch in patches:
                label = f"s={scale:g}, patch {patch}, " + ("paper gate" if threshold else "no gate")
                progress(label)
                results = exact_setting(scale, patch, threshold, rules=rules, fixed=fixed, **sizes)
                verdicts = {m: verdict(gains(results, m), list(rules)) for m in ("logp", "psnr")}
                ranges = {name: results[name]["h_range"] for name in rules}
                records.append({"label": label, "verdicts": verdicts, "h_range": ranges})
    names = list(rules)
    h_rows = [[rec["label"], rec["verdicts"]["logp"]["best"]]
              + [f"{rec['h_range'][n][0]:.2g} → {rec['h_range'][n][1]:.2g}" for n in names] for rec in records]
    return [
        "## The exact-posterior problem\n\n"
        f"{sizes['images']} ground truths of 4x{sizes['size']}x{sizes['size']}, N={sizes['particles']}, DDIM "
        f"{sizes['steps']} steps; fixed h in units of the scale s: {', '.join(f'{h:g}' for h in fixed)}. Each "
        "cell: the rule's paired gain over plain sampling (mean ± SE over ground truths), 'ok' where it is within "
        "1 SE of the best fixed h's gain (by the paired difference).",
        "### Posterior log-density per pixel, mean over the N particles (higher is better)\n\n"
        + settings_table(records, "logp", names, 3) + "\n\nMatches: " + match_counts(records, "logp", names),
        "### PSNR of the output (closest to the ensemble mean), dB\n\n"
        + settings_table(records, "psnr", names, 3) + "\n\nMatches: " + match_counts(records, "psnr", names),
        "### The h each rule chose, in units of s: first → last steered call (mean over images)\n\n"
        + markdown_table(["setting", "best fixed h (log-density)"] + names, h_rows),
    ]


def learned_sections(quick: bool) -> List[str]:
    if quick:
        sizes = dict(crops=2, size=32, particles=4, steps=3)
        patches, fixed = [1], [0.3, math.inf]
        rules = {k: RULES[k] for k in ("median (auto)", "mean")}
    else:
        sizes = dict(crops=8, size=64, particles=10, steps=20)
        patches, fixed = [1, 2, 4], LEARNED_FIXED
        rules = {k: RULES[k] for k in LEARNED_RULES}
    records = []
    for patch in patches:
        label = f"patch {patch}, paper gate"
        progress(f"built-in model: {label}")
        results = learned_setting(patch, rules=rules, fixed=fixed, progress_line=progress, **sizes)
        metrics = [m for m in ("psnr", "neg_lpips") if m in results["plain"]]
        records.append({"label": label, "verdicts": {m: verdict(gains(results, m), list(rules)) for m in metrics}})
    names = list(rules)
    sections = [
        "## The built-in model on training-side photos\n\n"
        f"{sizes['crops']} crops of {sizes['size']}x{sizes['size']} from training photos (astronaut, rocket, china, "
        f"grace_hopper; never the held-out ones), LR by bicubic 4x downsampling; N={sizes['particles']}, DDIM "
        f"{sizes['steps']} steps, the paper's gate; h in the model's latent units (the scaled residual, std about "
        f"0.5): {', '.join(f'{h:g}' for h in fixed)}. Cells as above, over crops.",
        "### PSNR of the output, dB\n\n" + settings_table(records, "psnr", names, 3)
        + "\n\nMatches: " + match_counts(records, "psnr", names),
    ]
    if "neg_lpips" in records[0]["verdicts"]:
        sections.append("### LPIPS of the output, as a gain (plain - KDS: higher is better)\n\n"
                        + settings_table(records, "neg_lpips", names, 4)
                        + "\n\nMatches: " + match_counts(records, "neg_lpips", names))
    return sections


if __name__ == "__main__":
    main()
