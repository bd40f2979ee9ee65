"""Train the built-in 4x super-resolution model (kds_hook.sr) on the training photos; write weights, curve, card.

    OMP_NUM_THREADS=2 python benchmarks/train_sr.py --out kds_hook/sr/builtin        # CPU, at most an hour
    python benchmarks/train_sr.py --device cuda --data sr-data --out OUT ...          # a lent GPU

Deterministic from ``--seed``: the batch of step k (photo, crop, flips, timesteps, noise) is drawn from a generator
seeded with (seed, k), so a resumed run draws exactly what an uninterrupted one would. Resumable: a checkpoint is
written to ``--checkpoint-dir`` every ``--checkpoint-minutes`` and at the end; ``--resume`` continues from it.
``--max-minutes`` stops training cleanly (the weights are still written); ``--steps auto`` measures the speed over
the first steps and then fixes the step count that fits the budget (the card records it, so ``--steps K``
repeats the run).

Outputs in ``--out``: the pipeline (``model_index.json``, ``unet/`` with float16 safetensors of the EMA weights,
``scheduler/``), ``loss_curve.png``, ``MODEL_CARD.md`` and ``training.json`` (settings, loss history, timings and
held-out metrics). The held-out photos are used only for the card's metrics, after training.

``--prepare-data DIR`` writes the photos into ``DIR/train.npz`` and ``DIR/heldout.npz`` (uint8) and exits, so that a
machine without scikit-image / scikit-learn reads the same pixels with ``--data DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kds_hook.sr.data import HELD_OUT_PHOTOS, PHOTOS, TRAIN_PHOTOS, load_photo, sampling_weight  # noqa: E402
from kds_hook.sr.model import RESIDUAL_SCALE, SCHEDULER_CONFIG, UNET_CONFIG  # noqa: E402
from kds_hook.sr.resize import SCALE, bicubic_downsample, bicubic_upsample, quantize  # noqa: E402

SOURCE_SCALES = (1.0, 0.75, 0.5)  # every photo is also seen downscaled: sharper pixels, more variety
LOG_EVERY = 25  # steps per loss record (and per sync with the device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="sr-train/model", help="output folder (default sr-train/model)")
    p.add_argument("--checkpoint-dir", default="sr-train/checkpoint", help="default sr-train/checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint interval (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="auto",
                   help='optimizer steps, or "auto" (default): measure the speed, then fit --max-minutes')
    p.add_argument("--max-minutes", type=float, default=55.0, help="stop training after this long (default 55)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--crop", type=int, default=64, help="high-resolution crop side, a multiple of 8 (default 64)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    p.add_argument("--decay-fraction", type=float, default=0.2,
                   help="the learning rate falls linearly to 0 over this last part of the steps (default 0.2)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the UNet (cuda)")
    p.add_argument("--data", default=None, help="read the photos from DIR/train.npz, DIR/heldout.npz")
    p.add_argument("--prepare-data", default=None, metavar="DIR", help="write the photo cache to DIR and exit")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps for the held-out metrics (default 20)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out metrics")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the model in --out and rewrite its card (from its training.json)")
    args = p.parse_args(argv)
    if args.crop % 8 or args.crop < 16:
        p.error("--crop must be a multiple of 8, at least 16")
    if args.steps != "auto":
        try:
            args.steps = int(args.steps)
        except ValueError:
            p.error('--steps must be an integer or "auto"')
        if args.steps < 1:
            p.error("--steps must be positive")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------------ data


def prepare_data(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, names in (("train", TRAIN_PHOTOS), ("heldout", HELD_OUT_PHOTOS)):
        path = os.path.join(directory, f"{name}.npz")
        np.savez_compressed(path, **{photo: load_photo(photo) for photo in names})
        log(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {len(names)} photos)")


def read_photos(names, data_dir: Optional[str], split: str) -> Dict[str, np.ndarray]:
    if data_dir is None:
        return {name: load_photo(name) for name in names}
    with np.load(os.path.join(data_dir, f"{split}.npz")) as cache:
        missing = [name for name in names if name not in cache.files]
        if missing:
            raise SystemExit(f"{data_dir}/{split}.npz lacks {missing}; rerun --prepare-data")
        return {name: cache[name] for name in names}


def to_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


class CropSampler:
    """Random training crops from every photo at every source scale, held on the device as one padded uint8
    tensor so that a whole batch is cut out with one indexing operation."""

    def __init__(self, photos: Dict[str, np.ndarray], crop: int, device: torch.device):
        sources, weights = [], []
        for name in TRAIN_PHOTOS:
            image = to_unit(photos[name])
            for scale in SOURCE_SCALES:
                size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
                if min(size) < crop:
                    continue
                scaled = image if scale == 1.0 else F.interpolate(
                    image, size=size, mode="bicubic", antialias=True, align_corners=False
                )
                sources.append(((scaled.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0])
                weights.append(sampling_weight(name) / len(SOURCE_SCALES))
        height = max(s.shape[-2] for s in sources)
        width = max(s.shape[-1] for s in sources)
        self.images = torch.zeros(len(sources), 3, height, width, dtype=torch.uint8)
        for i, source in enumerate(sources):
            self.images[i, :, : source.shape[-2], : source.shape[-1]] = source
        self.images = self.images.to(device)
        self.sizes = torch.tensor([s.shape[-2:] for s in sources], device=device)
        self.weights = torch.tensor(weights, device=device)
        self.crop, self.device = crop, device
        self.offsets = torch.arange(crop, device=device)

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, 3, crop, crop) float32 in [-1, 1], randomly flipped and transposed."""
        g, crop = generator, self.crop
        index = torch.multinomial(self.weights, batch, replacement=True, generator=g)
        room = (self.sizes[index] - crop + 1).float()
        top = (torch.rand(batch, device=self.device, generator=g) * room[:, 0]).long()
        left = (torch.rand(batch, device=self.device, generator=g) * room[:, 1]).long()
        rows = (top[:, None] + self.offsets)[:, None, :, None]
        cols = (left[:, None] + self.offsets)[:, None, None, :]
        channels = torch.arange(3, device=self.device)[None, :, None, None]
        crops = self.images[index[:, None, None, None], channels, rows, cols].float() / 127.5 - 1.0
        flips = torch.rand(batch, 3, device=self.device, generator=g) < 0.5
        crops = torch.where(flips[:, 0, None, None, None], crops.flip(-1), crops)
        crops = torch.where(flips[:, 1, None, None, None], crops.flip(-2), crops)
        return torch.where(flips[:, 2, None, None, None], crops.transpose(-1, -2), crops)


def training_pair(hr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(bicubic upsampling of the 8-bit LR, scaled residual x0) for a batch of HR crops."""
    upsampled = bicubic_upsample(quantize(bicubic_downsample(hr, SCALE)), SCALE)
    return upsampled, (hr - upsampled) * RESIDUAL_SCALE


# ------------------------------------------------------------------------------------------------ training


class Trainer:
    def __init__(self, args: argparse.Namespace):
        from diffusers import DDPMScheduler, UNet2DModel

        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        self.unet = UNet2DModel(**UNET_CONFIG).to(self.device).train()
        if self.device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.noise = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
        self.alphas_cumprod = self.noise.alphas_cumprod.to(self.device)
        self.step = 0
        self.total_steps: Optional[int] = None if args.steps == "auto" else args.steps
        self.losses: List[Tuple[int, float]] = []  # (step, mean loss over the last LOG_EVERY steps)
        self.train_seconds = 0.0

    # -- checkpoints
    def state(self) -> dict:
        return {
            "step": self.step, "total_steps": self.total_steps, "unet": self.unet.state_dict(),
            "ema": [t.cpu() for t in self.ema], "optimizer": self.optimizer.state_dict(), "losses": self.losses,
            "train_seconds": self.train_seconds, "seed": self.args.seed,
        }

    def save_checkpoint(self) -> None:
        os.makedirs(self.args.checkpoint_dir, exist_ok=True)
        path = os.path.join(self.args.checkpoint_dir, "checkpoint.pt")
        torch.save(self.state(), path + ".tmp")
        os.replace(path + ".tmp", path)  # never a half-written checkpoint
        log(f"checkpoint at step {self.step}: {path}")

    def load_checkpoint(self) -> None:
        path = os.path.join(self.args.checkpoint_dir, "checkpoint.pt")
        if not os.path.exists(path):
            raise SystemExit(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["seed"] != self.args.seed:
            raise SystemExit(f"--resume: the checkpoint was trained with --seed {state['seed']}")
        self.unet.load_state_dict(state["unet"])
        for mine, saved in zip(self.ema, state["ema"]):
            mine.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses, self.train_seconds = state["step"], state["losses"], state["train_seconds"]
        if self.total_steps is None or state["total_steps"] is not None:
            self.total_steps = state["total_steps"] if self.total_steps is None else self.total_steps
        log(f"resumed at step {self.step} ({self.train_seconds / 60:.1f} min trained)")

    # -- one step
    def learning_rate(self, step: int) -> float:
        args, total = self.args, self.total_steps
        factor = min(1.0, (step + 1) / max(1, args.warmup))
        if total is not None:
            decay_start = total * (1 - args.decay_fraction)
            if step >= decay_start:
                factor *= max(0.0, (total - step) / max(1.0, total - decay_start))
        return args.lr * factor

    def train_step(self, crops: CropSampler) -> torch.Tensor:
        args, device = self.args, self.device
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + self.step)
        with torch.no_grad():
            upsampled, x0 = training_pair(crops(args.batch_size, g))
            t = torch.randint(0, self.noise.config.num_train_timesteps, (args.batch_size,), device=device, generator=g)
            eps = torch.randn(x0.shape, device=device, generator=g)
            alpha = self.alphas_cumprod[t].sqrt()[:, None, None, None]
            sigma = (1 - self.alphas_cumprod[t]).sqrt()[:, None, None, None]
            x_t = alpha * x0 + sigma * eps
            target = alpha * eps - sigma * x0  # v
            model_input = torch.cat([x_t, upsampled], dim=1)
            if device.type == "cuda":
                model_input = model_input.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            prediction = self.unet(model_input, t).sample
        loss = F.mse_loss(prediction.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        decay = min(args.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.unet.parameters()], 1 - decay)
        self.step += 1
        return loss.detach()

    def train(self, crops: CropSampler) -> None:
        args = self.args
        budget = args.max_minutes * 60
        interactive = sys.stderr.isatty()
        bar = None
        if interactive and self.total_steps is not None:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        running = torch.zeros((), device=self.device)
        count = 0
        start = time.perf_counter() - self.train_seconds
        last_checkpoint = last_line = time.perf_counter()
        auto_from = None
        stopped = "steps"
        while self.total_steps is None or self.step < self.total_steps:
            running += self.train_step(crops)
            count += 1
            now = time.perf_counter()
            self.train_seconds = now - start
            if self.total_steps is None:  # --steps auto: measure steps 20..60, then fix the count
                if self.step == 20:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    auto_from = (self.step, time.perf_counter())
                elif auto_from is not None and self.step == auto_from[0] + 40:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    rate = 40 / (time.perf_counter() - auto_from[1])
                    self.total_steps = self.step + int(rate * (budget - self.train_seconds) * 0.9)
                    log(f"--steps auto: {rate:.1f} steps/s, training {self.total_steps} steps")
            if count == LOG_EVERY or (self.total_steps is not None and self.step >= self.total_steps):
                mean = float(running) / count
                self.losses.append((self.step, mean))
                running.zero_()
                count = 0
                if bar is not None:
                    bar.update(self.step - bar.n)
                    bar.set_postfix(loss=f"{mean:.4f}")
                elif now - last_line >= 30 or self.step == LOG_EVERY:
                    total = self.total_steps or "?"
                    log(f"step {self.step}/{total} loss {mean:.4f} lr {self.learning_rate(self.step):.2e} "
                        f"{self.step / max(self.train_seconds, 1e-9):.2f} steps/s")
                    last_line = now
            if now - last_checkpoint >= args.checkpoint_minutes * 60:
                self.save_checkpoint()
                last_checkpoint = time.perf_counter()
            if self.train_seconds >= budget:
                stopped = "time"
                break
        if bar is not None:
            bar.close()
        if count:
            self.losses.append((self.step, float(running) / count))
        self.stopped = stopped
        log(f"stopped ({'--max-minutes' if stopped == 'time' else 'all steps done'}) at step {self.step} after "
            f"{self.train_seconds / 60:.1f} min")
        self.save_checkpoint()

    def ema_pipeline(self):
        """The pipeline with the EMA weights, float32 on the training device, in eval mode."""
        from diffusers import UNet2DModel

        from kds_hook.sr.model import build_scheduler
        from kds_hook.sr.pipeline import KDSSuperResolutionPipeline

        unet = UNet2DModel(**UNET_CONFIG)
        names = [name for name, _ in self.unet.named_parameters()]
        unet.load_state_dict(dict(zip(names, self.ema)), strict=True)  # strict: the UNet has no buffers
        unet = unet.to(self.device).eval()
        return KDSSuperResolutionPipeline(unet=unet, scheduler=build_scheduler(), residual_scale=RESIDUAL_SCALE)


# -------------------------------------------------------------------------------------------------- outputs


def save_pipeline(pipe, out: str) -> None:
    """Writes the pipeline with float16 UNet weights (half the size; loaded back as float32)."""
    import copy

    shipped = copy.deepcopy(pipe)
    shipped.unet.cpu().half()
    shipped.save_pretrained(out, safe_serialization=True)
    size = os.path.getsize(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    log(f"wrote {out} (weights {size / 2**20:.1f} MiB)")


def evaluate(pipe_dir: str, device: str, data_dir: Optional[str], steps: int, seed: int) -> List[dict]:
    """PSNR/SSIM (scikit-image, on 8-bit RGB) of one sample per held-out photo and of bicubic upsampling."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from kds_hook.sr.builtin import load_pipeline

    pipe = load_pipeline(pipe_dir, device=device)  # the saved float16 weights, as users load them
    rows = []
    for name, photo in read_photos(HELD_OUT_PHOTOS, data_dir, "heldout").items():
        height, width = (photo.shape[0] // SCALE) * SCALE, (photo.shape[1] // SCALE) * SCALE
        truth = photo[:height, :width]
        low = quantize(bicubic_downsample(to_unit(truth), SCALE))
        bicubic = quantize(bicubic_upsample(low, SCALE))
        generator = torch.Generator(device=device).manual_seed(seed)
        start = time.perf_counter()
        sample = pipe(low, num_inference_steps=steps, generator=generator, output_type="pt").images
        seconds = time.perf_counter() - start
        to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
        sr_image, bicubic_image = to_uint8(sample), to_uint8((bicubic + 1) / 2)
        row = {"photo": name, "size": f"{width}x{height}", "seconds": seconds}
        for label, image in (("model", sr_image), ("bicubic", bicubic_image)):
            row[f"psnr_{label}"] = float(peak_signal_noise_ratio(truth, image, data_range=255))
            row[f"ssim_{label}"] = float(structural_similarity(truth, image, channel_axis=-1, data_range=255))
        rows.append(row)
        log(f"held-out {name}: PSNR {row['psnr_model']:.2f} (bicubic {row['psnr_bicubic']:.2f}), "
            f"SSIM {row['ssim_model']:.4f} (bicubic {row['ssim_bicubic']:.4f}), {seconds:.1f}s")
    return rows


def plot_losses(losses: List[Tuple[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in losses])
    values = np.array([v for _, v in losses])
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, color="0.75", lw=0.8, label=f"mean of {LOG_EVERY} steps")
    ax.plot(steps[window - 1:], smooth, color="C0", lw=1.5, label=f"moving average ({window} points)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_title("kds_hook.sr built-in model: training loss")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(out: str, record: dict) -> None:
    settings = record["settings"]
    lines = [
        "# kds_hook.sr built-in model: model card",
        "",
        "A pixel-space conditional diffusion model for 4x super-resolution (SR3-style, residual to bicubic), "
        "trained by `benchmarks/train_sr.py` of kds-hook. Page: `docs/sr-model.md`.",
        "",
        "## Architecture",
        "",
        f"- diffusers `UNet2DModel`, {record['parameters'] / 1e6:.2f} M parameters: "
        f"`{json.dumps({k: v for k, v in UNET_CONFIG.items()})}`",
        f"- input: x_t (3 channels) concatenated with the bicubic 4x upsampling of the LR image (3 channels); "
        f"diffusion on x0 = {RESIDUAL_SCALE:g} * (hr - bicubic), images in [-1, 1]",
        f"- schedule: `{json.dumps(SCHEDULER_CONFIG)}` (training: DDPM noise; sampling: DDIM)",
        "- weights: exponential moving average of the training weights, stored as float16 safetensors",
        "",
        "## Data",
        "",
        "Photos that installed packages ship (nothing downloaded). Training crops: "
        f"{settings['crop']}x{settings['crop']} from each photo at scales {', '.join(map(str, SOURCE_SCALES))} "
        "(antialiased bicubic), random flips and transposes; LR by antialiased bicubic 4x downsampling, rounded "
        "to 8 bits. Grey-level photos are repeated into RGB and drawn half as often as colour ones.",
        "",
        "| photo | split | package | license | credit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in TRAIN_PHOTOS + HELD_OUT_PHOTOS:
        photo = PHOTOS[name]
        split = "train" + (" (grey)" if photo.gray else "") if name in TRAIN_PHOTOS else "held out"
        lines.append(f"| {name} | {split} | {photo.package} (`{photo.source}`) | {photo.license} | {photo.credit} |")
    lines += [
        "",
        "`motorcycle_right` (scikit-image) is used nowhere: it is the second stereo view of the held-out "
        "`motorcycle_left`. The held-out photos were fixed before training and are used only for the metrics "
        "below; nothing was tuned on them.",
        "",
        "## Training",
        "",
        f"- command: `{record['command']}`",
        f"- to repeat exactly: `{record['repeat_command']}`",
        f"- device: {record['device']}; torch {record['torch']}, diffusers {record['diffusers']}, "
        f"python {record['python']}",
        f"- steps: {record['steps_done']} of {record['total_steps']} ({record['stopped']}), batch "
        f"{settings['batch_size']}, crop {settings['crop']}, AdamW lr {settings['lr']:g} (warm-up "
        f"{settings['warmup']} steps, linear decay to 0 over the last {settings['decay_fraction']:.0%}), "
        f"EMA {settings['ema']}, gradient clipping 1.0, seed {settings['seed']}"
        + (", bfloat16 autocast" if settings["bf16"] else ""),
        f"- training time: {record['train_seconds'] / 60:.1f} min ({record['steps_done'] / record['train_seconds']:.2f}"
        f" steps/s); final loss (mean of the last 10 records): {record['final_loss']:.4f}",
        "- loss curve: `loss_curve.png`",
        "",
        "## Held-out metrics",
        "",
    ]
    metrics = record.get("metrics")
    if not metrics:
        lines.append("Not evaluated (`--no-eval`, or scikit-image missing).")
    else:
        lines += [
            f"Whole photos (cropped to a multiple of 4), LR by bicubic 4x downsampling rounded to 8 bits; one sample "
            f"per photo, DDIM {record['eval_steps']} steps, eta 0, seed {settings['seed']}, no KDS; PSNR (dB) and "
            f"SSIM of 8-bit RGB with scikit-image. Evaluated on {record['eval_device']}.",
            "",
            "| photo | size | PSNR model | PSNR bicubic | SSIM model | SSIM bicubic |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in metrics:
            lines.append(f"| {row['photo']} | {row['size']} | {row['psnr_model']:.2f} | {row['psnr_bicubic']:.2f} | "
                         f"{row['ssim_model']:.4f} | {row['ssim_bicubic']:.4f} |")
        mean = lambda key: sum(r[key] for r in metrics) / len(metrics)
        lines.append(f"| mean | | {mean('psnr_model'):.2f} | {mean('psnr_bicubic'):.2f} | "
                     f"{mean('ssim_model'):.4f} | {mean('ssim_bicubic'):.4f} |")
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_evaluation(args: argparse.Namespace, record: dict) -> None:
    try:
        import skimage.metrics  # noqa: F401
    except ImportError:
        log("scikit-image is not installed: held-out metrics skipped")
        return
    record["metrics"] = evaluate(args.out, args.device, args.data, args.eval_steps, args.seed)
    record["eval_steps"] = args.eval_steps
    record["eval_device"] = _device_name(args.device)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        prepare_data(args.prepare_data)
        return 0
    record_path = os.path.join(args.out, "training.json")
    if args.eval_only:
        with open(record_path) as f:
            record = json.load(f)
        run_evaluation(args, record)
    else:
        import diffusers

        photos = read_photos(TRAIN_PHOTOS, args.data, "train")
        trainer = Trainer(args)
        if args.resume:
            trainer.load_checkpoint()
        crops = CropSampler(photos, args.crop, trainer.device)
        parameters = sum(p.numel() for p in trainer.unet.parameters())
        log(f"{parameters / 1e6:.2f} M parameters, {len(crops.sizes)} training sources, device {args.device}")
        trainer.train(crops)
        os.makedirs(args.out, exist_ok=True)
        save_pipeline(trainer.ema_pipeline(), args.out)
        plot_losses(trainer.losses, os.path.join(args.out, "loss_curve.png"))
        command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)))
        repeat = [a for a in (sys.argv[1:] if argv is None else argv)]
        repeat_cmd = command
        if args.steps == "auto":
            for form in ("--steps auto", "--steps=auto"):
                repeat_cmd = repeat_cmd.replace(form, f"--steps {trainer.total_steps}")
        tail = [v for _, v in trainer.losses[-10:]]
        record = {
            "command": command, "repeat_command": repeat_cmd, "argv": repeat,
            "settings": {k: getattr(args, k) for k in ("seed", "batch_size", "crop", "lr", "warmup", "decay_fraction",
                                                       "ema", "bf16", "max_minutes")} | {"steps": args.steps},
            "parameters": parameters, "steps_done": trainer.step, "total_steps": trainer.total_steps,
            "stopped": "stopped by --max-minutes" if trainer.stopped == "time" else "all steps done",
            "train_seconds": trainer.train_seconds, "final_loss": sum(tail) / len(tail),
            "device": _device_name(args.device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "losses": trainer.losses,
        }
        if not args.no_eval:
            run_evaluation(args, record)
    write_card(args.out, record)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'MODEL_CARD.md')} and {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
