"""Part 1 of the demo: the paper's Figure 2, plain DDIM against DDIM + KDS on three 2-D Gaussians.

The model is the mixture's exact denoiser, the patch is the whole 2-D vector (the paper's choice for this
problem) and each seed is one ensemble of N particles. Plain and KDS runs start from the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..analytic import GaussianMixture, three_gaussians
from .report import add_caption, fmt_mean_se, markdown_table
from .sampler import ddpm_alphas_cumprod, paired_runs, x0_predictor_from_denoiser

__all__ = ["ToyResult", "toy_metrics", "run_toy", "toy_tables", "plot_toy"]

# Beyond 3 standard deviations from every mode: 1.1 % of exact samples of an isotropic 2-D Gaussian.
_BETWEEN_MODES_STDS = 3.0


def toy_metrics(x: torch.Tensor, mixture: GaussianMixture, num_particles: int) -> Dict[str, torch.Tensor]:
    """Per-ensemble metrics of samples x (S*N, 2): tensors of shape (S,), and (S, K) for ``occupancy``.

    ``distance``: mean distance to the nearest mode mean. ``occupancy``: the fraction of particles nearest each
    mode. ``occupancy_tv``: total-variation distance between that occupancy and the true weights. ``between``:
    fraction of particles farther than 3 standard deviations (the mode's largest) from every mode mean.
    """
    dist = torch.cdist(x.double(), mixture.means)  # (S*N, K)
    nearest_dist, nearest = dist.min(dim=1)
    seeds = x.shape[0] // num_particles
    k = mixture.means.shape[0]
    counts = torch.nn.functional.one_hot(nearest, k).double().reshape(seeds, num_particles, k).mean(1)
    radius = _BETWEEN_MODES_STDS * mixture.stds.max(dim=1).values[nearest]
    return {
        "distance": nearest_dist.reshape(seeds, num_particles).mean(1),
        "occupancy": counts,
        "occupancy_tv": 0.5 * (counts - mixture.weights).abs().sum(1),
        "between": (nearest_dist > radius).double().reshape(seeds, num_particles).mean(1),
    }


@dataclass
class ToyResult:
    """Samples and per-seed metrics of every run; ``samples["plain"]`` is the baseline."""

    num_particles: int
    samples: Dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)


def run_toy(
    configs: Dict[str, dict],
    *,
    num_seeds: int = 64,
    num_particles: int = 50,
    num_steps: int = 50,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> ToyResult:
    """Samples ``num_seeds`` ensembles plainly and with each KDS configuration (``KDS(**kwargs)``)."""
    mixture = three_gaussians()
    predict_x0 = x0_predictor_from_denoiser(mixture, ddpm_alphas_cumprod())
    noise = torch.randn(num_seeds * num_particles, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    result = ToyResult(num_particles)
    for name, x in paired_runs(predict_x0, noise, configs, num_particles, num_steps, "part 1 (Figure 2)", progress):
        result.samples[name] = x
        result.metrics[name] = toy_metrics(x, mixture, num_particles)
    return result


_TOY_COLUMNS = [
    ("distance", "mean distance to nearest mode", 3, 1.0),
    ("occupancy_tv", "mode occupancy TV vs weights", 3, 1.0),
    ("between", "% particles between modes", 2, 100.0),
]


def toy_tables(result: ToyResult) -> str:
    """Markdown: absolute metrics (mean ± SE over seeds) and paired differences KDS - plain."""
    names = list(result.metrics)
    headers = ["sampler"] + [label for _, label, _, _ in _TOY_COLUMNS]
    weights = " / ".join(f"{float(w):.2f}" for w in three_gaussians().weights)
    absolute = [
        [name]
        + [fmt_mean_se(result.metrics[name][key] * scale, digits) for key, _, digits, scale in _TOY_COLUMNS]
        + [" / ".join(f"{float(f):.3f}" for f in result.metrics[name]["occupancy"].mean(0))]
        for name in names
    ]
    plain = result.metrics["plain"]
    paired: List[List[str]] = [
        [f"{name} - plain"]
        + [
            fmt_mean_se((result.metrics[name][key] - plain[key]) * scale, digits, signed=True)
            for key, _, digits, scale in _TOY_COLUMNS
        ]
        for name in names
        if name != "plain"
    ]
    seeds = plain["distance"].numel()
    return (
        f"Mean ± standard error over {seeds} seeds (each an ensemble of N={result.num_particles} particles); "
        f"true weights {weights}; 'between modes' = farther than 3 std from every mode (1.1 % of exact "
        "samples).\n\n"
        + markdown_table(headers + [f"mode occupancy (true {weights})"], absolute)
        + "\n\nPaired differences (same initial noise), negative = KDS lower:\n\n"
        + markdown_table(["difference"] + headers[1:], paired)
    )


def plot_toy(
    result: ToyResult, kds_names: Sequence[str], path: Union[str, IO[bytes]], *, num_steps: Optional[int] = None
) -> None:
    """Scatter panels of plain DDIM and of each run in ``kds_names``, all from the same noise, saved as PNG
    to ``path`` (a file name or a binary file object). The figure reads on its own: axis labels, a legend for
    every mark, panel titles that say what the gate does, and a caption (``num_steps`` goes into it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    mixture = three_gaussians()
    gx, gy = torch.meshgrid(
        torch.linspace(-4.5, 4.5, 181, dtype=torch.float64),
        torch.linspace(-2.5, 5.5, 161, dtype=torch.float64),
        indexing="xy",
    )
    density = mixture.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(gx.shape)
    names = ["plain"] + list(kds_names)
    colours = {"plain": "tab:purple", "kds": "tab:green"}
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 5.6), sharex=True, sharey=True)
    for ax, name in zip(axes, names):
        ax.contour(gx.numpy(), gy.numpy(), density.numpy(), levels=6, colors="0.75", linewidths=0.7)
        x = result.samples[name].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.35, linewidths=0,
                   color=colours["plain" if name == "plain" else "kds"])
        ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker="x", color="black", s=40)
        dist = float(result.metrics[name]["distance"].mean())
        ax.set_title(f"{_panel_title(name)}\nmean distance to nearest mode {dist:.3f}", fontsize=10)
        ax.set_xlabel("$x_1$")
        ax.set_aspect("equal")
    axes[0].set_ylabel("$x_2$")
    legend = [
        Line2D([], [], marker="o", linestyle="", color=colours["plain"], label="final sample, plain DDIM"),
        Line2D([], [], marker="o", linestyle="", color=colours["kds"], label="final sample, DDIM + KDS"),
        Line2D([], [], marker="x", linestyle="", color="black", label="mode centre (component mean)"),
        Line2D([], [], color="0.75", label="true density (contour lines)"),
    ]
    fig.legend(handles=legend, loc="upper center", ncol=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.995))
    ensembles = result.samples["plain"].shape[0] // result.num_particles
    steps = f"{num_steps} " if num_steps else ""
    weights = " / ".join(f"{float(w):.1f}" for w in mixture.weights)
    caption = (
        f"Three 2-D Gaussians (weights {weights}) sampled with their exact score by DDIM ({steps}steps, eta 0): "
        f"{ensembles} ensembles of N = {result.num_particles} particles, the same initial noise in every panel. "
        "KDS moves each particle toward the densest region of its own ensemble. t/T is the diffusion time as a "
        "fraction of the training steps (1 = pure noise): the paper steers (delta = 0.3) only while t/T\u00a0\u2265\u00a00.3; "
        '"no gate" steers at every step. Lower distance to the nearest mode = tighter modes.'
    )
    add_caption(fig, caption)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _panel_title(name: str) -> str:
    """'KDS h=0.3' -> 'DDIM + KDS, h = 0.3, steered while t/T ≥ 0.3'; 'plain' -> 'plain DDIM (no KDS)'."""
    if name == "plain":
        return "plain DDIM (no KDS)"
    setting = name.replace("KDS ", "", 1).replace(", no gate", "").replace("h=", "h = ")
    setting = "h auto" if setting == "auto" else setting
    gate = "no gate: steered at every step" if "no gate" in name else "steered while t/T \u2265 0.3"
    return f"DDIM + KDS, {setting}, {gate}"
