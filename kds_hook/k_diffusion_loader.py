"""Loads k-diffusion's samplers and model wrappers, also where k-diffusion was installed with ``--no-deps``.

Why: k-diffusion 0.1.1.post1's package ``__init__`` imports every submodule, among them ``augmentation``
(scikit-image), ``config`` (jsonmerge), ``evaluation`` (clip, clean-fid), ``layers`` (dctorch) and ``utils``
(torchvision). Its declared requirements pull all of these, and torchvision's PyPI wheel is a CUDA build that
replaces a CPU-only torch. Installed with ``pip install --no-deps k-diffusion==0.1.1.post1`` beside
``pip install 'kds-hook[k-diffusion]'``, only what the samplers need is there, and ``import k_diffusion`` fails
(first on scikit-image). The samplers and wrappers (``sampling``, ``external``, and the ``utils`` they import)
need only scipy, torchdiffeq, torchsde, tqdm, pillow and safetensors, plus one torchvision import.

:func:`load_k_diffusion` therefore:

1. imports the complete package when it can (a full install: ``import k_diffusion`` works, nothing special);
2. otherwise locates the installed package with ``importlib.util.find_spec`` (which does not import it) and
   registers a bare package module ``k_diffusion`` whose ``__path__`` is the installed directory, so that
   ``import k_diffusion.sampling`` loads the submodule files but never ``__init__.py``;
3. only when torchvision cannot be imported, registers a stand-in ``torchvision.transforms.functional`` while
   ``k_diffusion.utils`` imports (it runs ``from torchvision.transforms import functional as TF``) and removes
   it right after, so no other code ever sees a fake torchvision. ``TF`` is used only by
   ``utils.from_pil_image`` / ``utils.to_pil_image`` (image I/O helpers); the samplers never call it, and
   calling those two raises an ``AttributeError`` that names the stand-in.

Importing this module imports nothing of k-diffusion; only calling :func:`load_k_diffusion` does. The rest of
``kds_hook`` never imports k-diffusion: you pass its samplers and models to :mod:`kds_hook.k_diffusion`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import NamedTuple

__all__ = ["KDiffusionModules", "load_k_diffusion"]

_STAND_IN_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
INSTALL_HINT = "pip install 'kds-hook[k-diffusion]' && pip install --no-deps k-diffusion==0.1.1.post1"


class KDiffusionModules(NamedTuple):
    """What :func:`load_k_diffusion` returns.

    ``sampling``: ``k_diffusion.sampling`` (``sample_euler``, ``get_sigmas_karras``, ...). ``external``:
    ``k_diffusion.external`` (``CompVisDenoiser``, ``VDenoiser``, ...). ``complete``: True when the whole
    package imported (``import k_diffusion`` works), False when only the samplers and wrappers were loaded.
    """

    sampling: types.ModuleType
    external: types.ModuleType
    complete: bool


def load_k_diffusion() -> KDiffusionModules:
    """Returns the installed ``k_diffusion.sampling`` and ``k_diffusion.external`` modules.

    With a complete k-diffusion install this is ``import k_diffusion``; with a ``--no-deps`` install (see the
    module docstring) just the samplers and model wrappers are loaded, without the package's ``__init__``.
    Calling it again returns the same modules.

    Raises:
        ModuleNotFoundError: k-diffusion, or one of its samplers' own dependencies (scipy, torchdiffeq, torchsde,
            tqdm, pillow, safetensors: the ``[k-diffusion]`` extra), is not installed. No ``k_diffusion`` module
            is then left behind, so a later call starts afresh.
    """
    loaded = sys.modules.get("k_diffusion")
    if loaded is not None:  # by an earlier call, or by a working ``import k_diffusion``
        return _modules(complete=getattr(loaded, "__file__", None) is not None)
    try:
        importlib.import_module("k_diffusion")
        return _modules(complete=True)
    except Exception:  # ImportError of a --no-deps install; also a torchvision that fails to load on this torch
        _forget("k_diffusion")  # submodules the failed import left behind
    spec = importlib.util.find_spec("k_diffusion")  # a top-level name: locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"k-diffusion is not installed ({INSTALL_HINT})", name="k_diffusion")
    package = types.ModuleType("k_diffusion", "k-diffusion's submodules, loaded without its __init__")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules["k_diffusion"] = package
    try:
        with _torchvision_if_missing():
            importlib.import_module("k_diffusion.utils")
        return _modules(complete=False)
    except BaseException:
        _forget("k_diffusion")  # leave nothing half-loaded behind, so a later call retries cleanly
        raise


def _modules(complete: bool) -> KDiffusionModules:
    sampling = importlib.import_module("k_diffusion.sampling")
    return KDiffusionModules(sampling, importlib.import_module("k_diffusion.external"), complete)


class _torchvision_if_missing:
    """Context manager: a stand-in ``torchvision.transforms.functional`` while the block runs, if needed."""

    def __enter__(self):
        self.installed = False
        try:
            import torchvision.transforms.functional  # noqa: F401
        except Exception:  # missing, or a CUDA build that fails to load on CPU torch
            _forget("torchvision")
            for name in _STAND_IN_NAMES:
                module = types.ModuleType(name, "stand-in registered by kds_hook.k_diffusion_loader")
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
        f"torchvision.transforms.functional.{name}: torchvision is not installed; kds_hook.k_diffusion_loader "
        "registered a stand-in only so that k_diffusion.utils imports (its image helpers need the real one)"
    )


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
