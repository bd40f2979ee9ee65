"""Part 3 of the demo, and the plumbing of the real-photo benchmark: 4x super-resolution of held-out photos with
the built-in model (:mod:`kds_hook.sr`), plain and with KDS from the same initial noise.

A ground-truth crop of a held-out photo is shrunk 4x by antialiased bicubic resampling and rounded to 8 bits
(the low-resolution input a user would have); the model upscales it back with N particles, plainly and with KDS,
and each output is scored against the crop: PSNR and SSIM (scikit-image) and LPIPS where its weights are
present (:mod:`kds_hook.metrics`). The KDS output is the particle closest to the ensemble mean in the model's
latent space (Eq. 9); plain sampling's output is chosen the same way from its own particles, so the two differ
only by the steering.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..kds import KDS
from ..selection import select_particles

__all__ = [
    "PhotoRun",
    "photo_crop",
    "low_resolution",
    "sample_particles",
    "score_images",
    "load_lpips_or_none",
    "matched_shrinkage",
    "plot_crops",
    "run_photo_part",
    "score_label",
]


@dataclass
class PhotoRun:
    """N particles per input from one sampling run: latents and images (B*N rows), and its CPU time."""

    latents: torch.Tensor  # (B*N, 3, H, W), the model's diffusion variable (scaled residual)
    images: torch.Tensor  # (B*N, 3, H, W) in [0, 1]
    num_particles: int
    seconds: float  # CPU time of the sampling call (process time: the machine may be shared)

    def selected(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The particle closest to its ensemble mean in latent space, per input: images (B, 3, H, W), index (B,)."""
        index = select_particles(self.latents, self.num_particles, "mean").index
        return self.grouped()[torch.arange(index.numel()), index], index

    def grouped(self) -> torch.Tensor:
        """Images as (B, N, 3, H, W)."""
        return self.images.reshape(-1, self.num_particles, *self.images.shape[1:])


def photo_crop(name: str, size: int, centre: Tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """A ``size`` x ``size`` crop of the photo ``name`` (:func:`kds_hook.sr.load_photo`) around the relative
    position ``centre`` = (y, x) in [0, 1], as a float32 tensor (3, size, size) in [-1, 1]."""
    from ..sr import load_photo

    photo = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float() / 127.5 - 1.0
    height, width = photo.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds photo {name!r} ({height}x{width})")
    top = min(max(int(round(centre[0] * height - size / 2)), 0), height - size)
    left = min(max(int(round(centre[1] * width - size / 2)), 0), width - size)
    return photo[:, top : top + size, left : left + size].contiguous()


def low_resolution(truth: torch.Tensor) -> torch.Tensor:
    """The 8-bit low-resolution input of ground truths (B, 3, H, W) in [-1, 1]: bicubic 4x down, then rounded."""
    from ..sr import bicubic_downsample, quantize

    return quantize(bicubic_downsample(truth))


def sample_particles(
    pipe, low_res: torch.Tensor, noise: torch.Tensor, num_particles: int, *, kds: Optional[KDS] = None,
    num_inference_steps: int = 20,
) -> PhotoRun:
    """Runs the super-resolution pipeline on N particles per input from the initial ``noise`` (B*N, 3, H, W),
    plainly (``kds=None``) or steered by ``kds`` (through :func:`kds_hook.diffusers.apply_patch`, removed after).
    """
    from ..diffusers import apply_patch, remove_patch

    if kds is not None and kds.num_particles != num_particles:
        raise ValueError(f"kds has {kds.num_particles} particles, the run {num_particles}")
    rows = low_res.repeat_interleave(num_particles, dim=0)
    if kds is not None:
        apply_patch(pipe, kds)
    start = time.process_time()
    try:
        latents = pipe(rows, num_inference_steps=num_inference_steps, latents=noise, output_type="latent").images
    finally:
        if kds is not None:
            remove_patch(pipe)
    seconds = time.process_time() - start
    height, width = rows.shape[-2] * 4, rows.shape[-1] * 4
    upsampled = pipe.upsample(rows)
    images = (pipe.decoder.decode(latents[..., :height, :width], upsampled) + 1.0) / 2.0
    return PhotoRun(latents[..., :height, :width].float(), images.float(), num_particles, seconds)


def load_lpips_or_none(log: Optional[Callable[[str], None]] = None):
    """The LPIPS model, or None (with one message through ``log``) when its weights are missing."""
    from ..metrics import LPIPSWeightsMissing, load_lpips

    try:
        return load_lpips()
    except LPIPSWeightsMissing as missing:
        if log:
            log(f"LPIPS skipped: {str(missing).splitlines()[0]} (python -m kds_hook.metrics.convert_lpips makes them)")
        return None


def score_images(images: torch.Tensor, truth: torch.Tensor, lpips_model=None) -> Dict[str, torch.Tensor]:
    """PSNR, SSIM and (with a model) LPIPS of images (B, 3, H, W) in [0, 1] against truths in [-1, 1]; each (B,)."""
    from ..metrics import lpips, psnr, ssim

    reference = ((truth + 1.0) / 2.0).clamp(0.0, 1.0)
    scores = {"psnr": psnr(images, reference), "ssim": ssim(images, reference)}
    if lpips_model is not None:
        scores["lpips"] = lpips(images, reference, model=lpips_model)
    return scores


def matched_shrinkage(plain: PhotoRun, steered: PhotoRun) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain output s moved toward the plain ensemble mean m, s + a (m - s), with a per input such that
    ||s_a - m|| / ||s - m|| = ||k - m_k|| / ||s - m|| for KDS's output k and its ensemble mean m_k (in latent
    space; a clipped to [0, 1]). Returns a (B,) and the shrunk latents (B, 3, H, W)."""
    n = plain.num_particles
    rows = torch.arange(plain.latents.shape[0] // n)
    lat_p = plain.latents.reshape(-1, n, *plain.latents.shape[1:])
    lat_k = steered.latents.reshape(-1, n, *steered.latents.shape[1:])
    s, m = lat_p[rows, plain.selected()[1]], lat_p.mean(1)
    k, m_k = lat_k[rows, steered.selected()[1]], lat_k.mean(1)
    dist = lambda x, y: (x - y).flatten(1).norm(dim=1)  # noqa: E731
    a = (1.0 - dist(k, m_k) / dist(s, m).clamp_min(1e-12)).clamp(0.0, 1.0)
    return a, s + a.reshape(-1, 1, 1, 1) * (m - s)


def score_label(scores: Dict[str, torch.Tensor]) -> str:
    """"27.31 dB, LPIPS 0.123" for one image's scores (LPIPS only where present)."""
    text = f"{float(scores['psnr']):.2f} dB"
    return text + (f", LPIPS {float(scores['lpips']):.3f}" if "lpips" in scores else "")


def _nearest(image: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="nearest")[0]


def plot_crops(rows: Sequence[Dict[str, torch.Tensor]], path_or_file, titles: Sequence[str] = ()) -> None:
    """A grid: one row per crop, columns LR (nearest), bicubic, plain, KDS, ground truth; images in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["LR (nearest)", "bicubic", "plain DDIM", "DDIM + KDS", "ground truth"]
    keys = ["lr", "bicubic", "plain", "kds", "truth"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        size = row["truth"].shape[-1]
        for c, key in enumerate(keys):
            image = row[key] if key != "lr" else _nearest(row[key], size)
            ax = axes[r][c]
            ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = row.get(f"{key}_label", "")
            ax.set_xlabel(label, fontsize=7)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        if r < len(titles):
            axes[r][0].set_ylabel(titles[r], fontsize=8)
    fig.tight_layout()
    fig.savefig(path_or_file, dpi=100, format="png")
    plt.close(fig)


def run_photo_part(
    *, quick: bool, progress: Callable[[str], None], photo: str = "coffee", seeds: int = 2
) -> Optional[Tuple[str, bytes]]:
    """The demo's part 3: returns (markdown, PNG bytes), or None with a message when the built-in model or a
    dependency is missing (the rest of the demo still runs)."""
    from .report import fmt_mean_se, markdown_table

    try:
        from ..sr import HELD_OUT_PHOTOS, load_builtin

        pipe = load_builtin()
    except (ImportError, ValueError) as error:
        progress(f"part 3 skipped: {error}")
        return None
    if photo not in HELD_OUT_PHOTOS:
        raise ValueError(f"the demo upscales a held-out photo, one of {', '.join(HELD_OUT_PHOTOS)}; got {photo!r}")
    size, n, steps = (32, 3, 3) if quick else (96, 8, 20)
    progress(f"part 3: loading the held-out photo {photo!r} and LPIPS")
    lpips_model = load_lpips_or_none(progress)
    centres = [(0.5, 0.5)] if quick else [(0.35, 0.3), (0.5, 0.5), (0.65, 0.7)]
    truth = torch.stack([photo_crop(photo, size, c) for c in centres])
    low_res = low_resolution(truth)
    kds = KDS(num_particles=n)  # the paper's settings: h=0.3, patch 1, delta=0.3 while t/T >= 0.3
    scores: Dict[str, List[Dict[str, torch.Tensor]]] = {"bicubic": [], "plain": [], "KDS": []}
    figure_rows: List[Dict[str, torch.Tensor]] = []
    for seed in range(seeds):
        noise = torch.randn(len(centres) * n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        progress(f"part 3 (seed {seed + 1}/{seeds}): plain, {len(centres)} crops x N={n}, {steps} DDIM steps")
        plain = sample_particles(pipe, low_res, noise, n, num_inference_steps=steps)
        progress(f"part 3 (seed {seed + 1}/{seeds}): KDS from the same noise")
        steered = sample_particles(pipe, low_res, noise, n, kds=kds, num_inference_steps=steps)
        plain_out, _ = plain.selected()
        kds_out, _ = steered.selected()
        bicubic = ((pipe.upsample(low_res) + 1.0) / 2.0).clamp(0, 1).float()
        for name, images in (("bicubic", bicubic), ("plain", plain_out), ("KDS", kds_out)):
            scores[name].append(score_images(images, truth, lpips_model))
        if seed == 0:
            for i in range(len(centres)):
                row = {"lr": (low_res[i] + 1) / 2, "bicubic": bicubic[i], "plain": plain_out[i], "kds": kds_out[i],
                       "truth": (truth[i] + 1) / 2}
                for key, name in (("bicubic", "bicubic"), ("plain", "plain"), ("kds", "KDS")):
                    row[f"{key}_label"] = score_label({m: v[i] for m, v in scores[name][-1].items()})
                figure_rows.append(row)
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips_model is not None else [])
    joined = {name: {m: torch.cat([s[m] for s in runs]) for m in metrics} for name, runs in scores.items()}
    headers = ["output"] + [m.upper() + (" (lower is better)" if m == "lpips" else "") for m in metrics]
    rows = [[name] + [fmt_mean_se(values[m], 3) for m in metrics] for name, values in joined.items()]
    paired = [["KDS - plain"] + [fmt_mean_se(joined["KDS"][m] - joined["plain"][m], 3, signed=True) for m in metrics]]
    units = len(centres) * seeds
    lpips_note = "" if lpips_model is not None else (
        " LPIPS skipped: its weights are missing (`python -m kds_hook.metrics.convert_lpips` makes them)."
    )
    note = "\n\n*Quick run (`--quick`): tiny sizes, not the documented numbers.*" if quick else ""
    markdown = (
        f"## Part 3: 4x super-resolution of a held-out photo ({photo!r}) with the built-in model\n\n"
        f"{len(centres)} crops of {size}x{size}, shrunk 4x (antialiased bicubic, 8-bit) and upscaled back; N={n} "
        f"particles, DDIM {steps} steps; plain and KDS (paper settings: h=0.3, patch 1, delta=0.3 while t/T >= 0.3) "
        f"from the same noise, {seeds} noise seeds; each output is the particle closest to its ensemble mean. "
        f"Mean ± SE over {units} crop-seed pairs (only {units}: a demonstration; the evidence is the benchmark in "
        "docs/real-photos.md, which also shows that on PSNR and LPIPS the gain is what shrinking the plain output "
        f"toward its own ensemble mean by the same amount gives).{lpips_note}\n\n"
        + markdown_table(headers, rows) + "\n\nPaired (same crop, same noise):\n\n"
        + markdown_table(["difference"] + headers[1:], paired)
        + note + "\n\n![LR, bicubic, plain, KDS, ground truth](photo.png)\n"
    )
    png = io.BytesIO()
    plot_crops(figure_rows, png, titles=[f"{photo} crop {i + 1}" for i in range(len(figure_rows))])
    return markdown, png.getvalue()
