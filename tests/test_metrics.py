"""PSNR and SSIM (scikit-image) against literal formulas; input checks."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("skimage", reason="PSNR/SSIM need scikit-image (pip install 'kds-hook[metrics]')")

from kds_hook.metrics import psnr, ssim  # noqa: E402


def _images(batch=3, size=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    truth = torch.rand(batch, 3, size, size, generator=gen, dtype=torch.float64)
    noisy = (truth + 0.1 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return noisy, truth


def test_psnr_is_the_literal_formula():
    image, truth = _images()
    mse = (image - truth).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(image, truth), 10 * torch.log10(1.0 / mse), rtol=1e-12, atol=0)
    torch.testing.assert_close(psnr(2 * image, 2 * truth, data_range=2.0), psnr(image, truth), rtol=1e-12, atol=0)
    single = psnr(image[1], truth[1])
    assert single.ndim == 0 and float(single) == pytest.approx(float(psnr(image, truth)[1]), rel=1e-12)
    assert math.isinf(float(psnr(truth[0], truth[0])))


def _literal_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), population statistics, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2 with L = 1, mean of the map where the window fits, averaged over channels."""
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-r.square() / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).reshape(1, 1, 11, 11)
    values = []
    for c in range(x.shape[0]):
        a, b = x[c][None, None], y[c][None, None]
        blur = lambda t: torch.nn.functional.conv2d(t, window)  # noqa: E731
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a.square()
        var_b = blur(b * b) - mu_b.square()
        cov = blur(a * b) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
        values.append(float(s.mean()))
    return sum(values) / len(values)


def test_ssim_is_wang_et_al():
    image, truth = _images()
    expected = torch.tensor([_literal_ssim(image[i], truth[i]) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(ssim(image, truth), expected, rtol=1e-6, atol=1e-9)
    assert float(ssim(truth[0], truth[0])) == pytest.approx(1.0, abs=1e-12)
    worse = (truth + 0.3 * torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert bool((ssim(worse.clamp(0, 1), truth) < ssim(image, truth)).all())


def test_bad_inputs_are_refused():
    image, truth = _images()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(image[:, :, :20], truth)
    with pytest.raises(ValueError, match="NaN"):
        psnr(image.clone().fill_(float("nan")), truth)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ssim(image.numpy(), truth)
    with pytest.raises(ValueError, match="shape"):
        psnr(image[0, 0], truth[0, 0])
    with pytest.raises(ValueError, match="11x11"):
        ssim(image[..., :8, :8], truth[..., :8, :8])


def test_api_reference_lists_the_metrics():
    import re
    from pathlib import Path

    import kds_hook.metrics

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    heading = "## `kds_hook.metrics`"
    assert heading in text
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)", section, flags=re.M))
    assert not set(kds_hook.metrics.__all__) - listed
