"""CUDA correctness and GPU timings, for a machine with a GPU (run by hand; never part of the test-suite).

    python benchmarks/cuda_check.py                 # on a CUDA machine
    python benchmarks/cuda_check.py --device cpu    # a dry run of the same checks on the CPU

1. The core on the device: ``KDS.steer_x0`` and ``select_particles`` on the device in float32, float16 and bfloat16
   against the same (rounded) input steered in float64 on the CPU, for both mean-shift layouts, fixed and "auto"
   bandwidths; then steer_x0 timings at latent sizes of SD/SDXL/Flux.
2. ``run()`` on the device with tiny random pipelines (SD in float16, Flux in bfloat16): strength 0 gives the plain
   pipeline's particles on the same batch bit for bit, steering keeps the dtype and stays finite, and the output
   is the selected particle.
3. The built-in 4x SR model on the device: time per image of plain sampling (N particles, strength 0) and of KDS
   with the paper's settings, side by side in one run, and of one plain sample.

Prints one line per check; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kds_hook import KDS, select_particles  # noqa: E402

FAILURES = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_core(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [(10, 4, 32, 1, 0.3), (10, 4, 32, 2, "auto"), (10, 16, 32, 1, "auto"), (32, 4, 16, 2, "auto"),
             (32, 16, 16, 2, 2.0), (3, 3, 20, 3, 1.0)]
    for n, c, size, patch, bw in cases:
        x = torch.randn(2 * n, c, size, size, generator=gen, dtype=torch.float64) * 0.7
        kds = KDS(num_particles=n, patch_size=patch, bandwidth=bw, strength=0.3)
        for dtype, tol in [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)]:
            xd = x.to(device, dtype)
            out = kds.steer_x0(xd, t_frac=0.8)
            exact = kds.steer_x0(xd.to("cpu", torch.float64), t_frac=0.8)  # the same rounded input, float64
            err = float((out.double().cpu() - exact).abs().max() / exact.abs().max())
            same_pick = torch.equal(select_particles(xd, n).index.cpu(), select_particles(xd.cpu().double(), n).index)
            ok = out.device == xd.device and out.dtype == dtype and err < tol and same_pick
            report(f"core N={n} C={c} {size}^2 patch={patch} h={bw} {str(dtype)[6:]}", ok,
                   f"relative error {err:.2e} (tolerance {tol:g}), same selection: {same_pick}")
    for n, c, size in [(10, 4, 64), (10, 4, 128), (10, 16, 128), (32, 4, 64)]:
        for patch in (1, 2):
            x = torch.randn(n, c, size, size, device=device)
            kds = KDS(num_particles=n, patch_size=patch, bandwidth="auto")
            for _ in range(3):
                kds.steer_x0(x, t_frac=0.8)
            sync(device)
            reps = 20 if device.type == "cuda" else 2
            start = time.perf_counter()
            for _ in range(reps):
                kds.steer_x0(x, t_frac=0.8)
            sync(device)
            ms = (time.perf_counter() - start) / reps * 1e3
            print(f"time steer_x0 N={n} latent {c}x{size}x{size} patch {patch}, auto h, float32: {ms:.2f} ms/call",
                  flush=True)


def check_pipeline(name: str, pipe, dtype: torch.dtype, device: torch.device, **call) -> None:
    from kds_hook.diffusers import run

    pipe = pipe.to(device, dtype)
    n = 3

    def generator():
        return torch.Generator(device).manual_seed(0)

    off = run(pipe, KDS(num_particles=n, strength=0.0), generator=generator(), return_particles=True,
              output_type="latent", **call)
    expanded = dict(call, prompt=[p for p in call["prompt"] for _ in range(n)])
    plain = pipe(generator=generator(), output_type="latent", **expanded).images
    if plain.ndim == 3:  # packed tokens (Flux): compare through the particles' own packing
        from kds_hook.diffusers.families import family_of

        layout = family_of(pipe)[1].layout(pipe, expanded)
        plain = layout.to_spatial(plain)
    scale, shift = pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    # run() reports particles in the scheduler's latent space; output_type="latent" gives exactly that space.
    bit = torch.equal(off.particles.flatten(0, 1), plain)
    close = torch.allclose(off.particles.flatten(0, 1).float(), plain.float(), rtol=1e-2, atol=1e-2)
    report(f"{name} strength 0 = plain pipeline on the same batch ({str(dtype)[6:]})", bit or close,
           f"bit-identical: {bit}, allclose: {close}, particles {off.particles.dtype}, VAE scale/shift {scale}/{shift}")
    on = run(pipe, KDS(num_particles=n, bandwidth="auto", strength=0.5), generator=generator(),
             return_particles=True, output_type="latent", **call)
    moved = float((on.particles.float() - off.particles.float()).abs().max())
    finite = bool(torch.isfinite(on.particles.float()).all())
    picked = torch.equal(on.latents, on.particles[torch.arange(on.index.shape[0]), on.index.to(on.particles.device)])
    report(f"{name} KDS run ({str(dtype)[6:]})", finite and moved > 0 and picked,
           f"finite: {finite}, moved from plain by {moved:.3g}, output is the selected particle: {picked}")


def check_sr_timing(device: torch.device, size: int, n: int, steps: int, repeats: int) -> None:
    import numpy as np

    from kds_hook.diffusers import run
    from kds_hook.sr import load_builtin

    pipe = load_builtin(device=device)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, size, size)).astype(np.float32) * 2 - 1).to(device)
    plain_kds, paper_kds = KDS(num_particles=n, strength=0.0), KDS(num_particles=n)

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    def one_sample():
        return pipe(image, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                    output_type="pt")

    def particles(kds):
        return run(pipe, kds, image=image, num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator(device).manual_seed(0))

    timed(lambda: particles(paper_kds))  # warm-up
    times = {"one sample": [], f"plain N={n}": [], f"KDS N={n}": []}
    for _ in range(repeats):  # interleaved, so drift hits every method alike
        times["one sample"].append(timed(one_sample))
        times[f"plain N={n}"].append(timed(lambda: particles(plain_kds)))
        times[f"KDS N={n}"].append(timed(lambda: particles(paper_kds)))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"time built-in SR {size}x{size} -> {4 * size}x{4 * size}, {steps} DDIM steps, float32: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
          + f"; KDS / plain = {med[f'KDS N={n}'] / med[f'plain N={n}']:.3f} (median of {repeats})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip", nargs="*", default=[], choices=["core", "pipelines", "sr"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    if "core" not in args.skip:
        check_core(device)
    if "pipelines" not in args.skip:
        from kds_hook.testing import tiny_flux_pipeline, tiny_sd_pipeline

        half = torch.float16 if device.type == "cuda" else torch.float32
        bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
        check_pipeline("SD text2img", tiny_sd_pipeline("text2img"), half, device, prompt=["a red cat", "a blue dog"],
                       height=32, width=32, num_inference_steps=4, guidance_scale=5.0)
        check_pipeline("Flux text2img", tiny_flux_pipeline("text2img"), bf16, device, prompt=["a red cat"],
                       height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16)
    if "sr" not in args.skip:
        if device.type == "cuda":
            check_sr_timing(device, size=128, n=10, steps=20, repeats=3)
            check_sr_timing(device, size=256, n=10, steps=20, repeats=3)
        else:
            check_sr_timing(device, size=16, n=4, steps=2, repeats=1)
    print(f"{len(FAILURES)} failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
