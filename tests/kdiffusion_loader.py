"""Loads ``k_diffusion.sampling`` and ``k_diffusion.external`` without running ``k_diffusion/__init__.py``.

Why: k-diffusion 0.1.1.post1's package ``__init__`` imports every submodule, among them ``augmentation``
(scikit-image), ``config`` (jsonmerge), ``evaluation`` (clip, clean-fid), ``layers`` (dctorch) and ``utils``
(torchvision). With ``--no-deps`` none of these is installed, and torchvision cannot be on a CPU-only torch: its
PyPI wheel is a CUDA build. The samplers and model wrappers (``sampling``, ``external``, and the ``utils`` they
import) need only scipy, torchdiffeq, torchsde, tqdm, pillow and safetensors, plus that one torchvision import.

How:
1. ``importlib.util.find_spec("k_diffusion")`` locates the installed package without importing it.
2. A bare package module named ``k_diffusion`` whose ``__path__`` is the installed directory is registered in
   ``sys.modules``, so ``import k_diffusion.sampling`` loads the submodule files but never ``__init__.py``.
3. ``k_diffusion/utils.py`` runs ``from torchvision.transforms import functional as TF`` at import time. Only
   when torchvision cannot be imported, a stand-in ``torchvision.transforms.functional`` is registered for the
   duration of that import and removed afterwards, so no other code in the process ever sees a fake
   torchvision. ``TF`` is used only by ``utils.from_pil_image`` / ``utils.to_pil_image`` (image I/O helpers);
   the samplers and wrappers never call it. Calling one of those two helpers raises an ``AttributeError``
   that names the stand-in.

If the real package is already imported (an environment with torchvision and clip), it is used as is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import NamedTuple

__all__ = ["KDiffusionModules", "load_k_diffusion", "importorskip_k_diffusion"]

_STAND_IN_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class KDiffusionModules(NamedTuple):
    sampling: types.ModuleType
    external: types.ModuleType


def load_k_diffusion() -> KDiffusionModules:
    """Returns the installed ``k_diffusion.sampling`` and ``k_diffusion.external`` modules.

    Raises ``ModuleNotFoundError`` when k-diffusion or one of the samplers' own dependencies is not installed,
    and then leaves no ``k_diffusion`` module behind, so that a later call starts afresh. Calling it again after
    a success returns the same modules.
    """
    if "k_diffusion" in sys.modules:  # loaded before, by this function or by a working ``import k_diffusion``
        return _submodules()
    spec = importlib.util.find_spec("k_diffusion")  # a top-level name: locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    _forget("k_diffusion")  # submodules left over from a failed ``import k_diffusion``
    package = types.ModuleType("k_diffusion", "k-diffusion's submodules, loaded without its __init__")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules["k_diffusion"] = package
    try:
        with _torchvision_if_missing():
            importlib.import_module("k_diffusion.utils")
        return _submodules()
    except BaseException:
        _forget("k_diffusion")  # leave nothing half-loaded behind, so a later call retries cleanly
        raise


def _submodules() -> KDiffusionModules:
    sampling = importlib.import_module("k_diffusion.sampling")
    return KDiffusionModules(sampling, importlib.import_module("k_diffusion.external"))


def importorskip_k_diffusion() -> KDiffusionModules:
    """:func:`load_k_diffusion` for tests: skips the calling test module when k-diffusion is unavailable."""
    import pytest

    try:
        return load_k_diffusion()
    except ModuleNotFoundError as error:
        pytest.skip(f"k-diffusion samplers unavailable: {error}", allow_module_level=True)


class _torchvision_if_missing:
    """Context manager: a stand-in ``torchvision.transforms.functional`` while the block runs, if needed."""

    def __enter__(self):
        self.installed = False
        try:
            import torchvision.transforms.functional  # noqa: F401
        except Exception:  # missing, or a CUDA build that fails to load on CPU torch
            _forget("torchvision")
            for name in _STAND_IN_NAMES:
                module = types.ModuleType(name, "stand-in registered by tests/kdiffusion_loader.py")
                module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != _STAND_IN_NAMES[-1])
                sys.modules[name] = module
            sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
            functional = sys.modules["torchvision.transforms.functional"]
            sys.modules["torchvision.transforms"].functional = functional
            functional.__getattr__ = _stand_in_attribute
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            for name in _STAND_IN_NAMES:
                sys.modules.pop(name, None)


def _stand_in_attribute(name: str):
    raise AttributeError(
        f"torchvision.transforms.functional.{name}: torchvision is not installed; tests/kdiffusion_loader.py "
        "registered a stand-in only so that k_diffusion.utils imports (its image helpers need the real one)"
    )


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
