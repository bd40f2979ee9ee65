"""The k-diffusion tests' entry point: :func:`kds_hook.k_diffusion_loader.load_k_diffusion`, or a skip.

The loader itself is public (``kds_hook.k_diffusion_loader``); only the pytest skip lives here.
"""

from __future__ import annotations

from kds_hook.k_diffusion_loader import KDiffusionModules, load_k_diffusion

__all__ = ["importorskip_k_diffusion"]


def importorskip_k_diffusion() -> KDiffusionModules:
    """:func:`load_k_diffusion` for tests: skips the calling test module when k-diffusion is unavailable."""
    import pytest

    try:
        return load_k_diffusion()
    except ModuleNotFoundError as error:
        pytest.skip(f"k-diffusion samplers unavailable: {error}", allow_module_level=True)
