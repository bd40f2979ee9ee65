"""PSNR and SSIM of restored images against their ground truth, computed by scikit-image.

Images are float tensors in [0, 1], shape (3, H, W) or (B, 3, H, W) (any channel count works), compared in
float64 over all channels (RGB, no luminance conversion, no border crop). SSIM uses the settings of Wang et
al. (2004): an 11x11 Gaussian window with sigma 1.5 and population covariances, as most super-resolution
papers report it, averaged over channels.
"""

from __future__ import annotations

import torch

__all__ = ["psnr", "ssim"]


def _pairs(image: torch.Tensor, reference: torch.Tensor):
    """Both as float64 numpy arrays (B, H, W, C), after checking shapes and values."""
    for name, t in (("image", image), ("reference", reference)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim not in (3, 4):
            raise ValueError(f"{name} must have shape (C, H, W) or (B, C, H, W), got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if image.shape != reference.shape:
        raise ValueError(f"image {tuple(image.shape)} and reference {tuple(reference.shape)} differ in shape")
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    ref = reference if reference.ndim == 4 else reference.unsqueeze(0)
    to_np = lambda t: t.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return to_np(batch), to_np(ref), image.ndim == 3


def _metrics_module():
    try:
        from skimage import metrics
    except ImportError:
        raise ImportError("PSNR and SSIM need scikit-image: pip install 'kds-hook[metrics]'") from None
    return metrics


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (a 0-d tensor for one (C, H, W) image, else shape (B,)).

    ``skimage.metrics.peak_signal_noise_ratio`` with the given ``data_range`` (1 for images in [0, 1]).
    Identical images give ``inf``.
    """
    import numpy

    metrics = _metrics_module()
    a, b, single = _pairs(image, reference)
    with numpy.errstate(divide="ignore"):  # identical images: inf, as documented
        values = torch.tensor(
            [metrics.peak_signal_noise_ratio(r, x, data_range=data_range) for x, r in zip(a, b)], dtype=torch.float64
        )
    return values[0] if single else values


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004 settings), shape as :func:`psnr`.

    ``skimage.metrics.structural_similarity`` with ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False`` over the channel axis. Images need at least 11 pixels per side.
    """
    metrics = _metrics_module()
    a, b, single = _pairs(image, reference)
    if min(a.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[1]}x{a.shape[2]}")
    values = torch.tensor(
        [
            metrics.structural_similarity(
                r, x, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False,
            )
            for x, r in zip(a, b)
        ],
        dtype=torch.float64,
    )
    return values[0] if single else values
