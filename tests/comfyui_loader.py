"""Imports ComfyUI's own code for the tests, from the checkout named by the ``COMFYUI_PATH`` environment variable.

ComfyUI is not a package on the index; ``make test`` and ``.ci/run`` point ``COMFYUI_PATH`` at the vendored copy
in ``../shared/vendor/ComfyUI`` when it exists, and tests that need ComfyUI skip with a reason without it.

:func:`comfyui_imported` is a context manager that leaves the interpreter as it found it where it can:
1. ``sys.dont_write_bytecode`` is set while ComfyUI is imported, so no ``__pycache__`` lands in its folder.
2. CPU is forced (``comfy.cli_args.args.cpu``) before ``comfy.model_management`` is imported, which otherwise
   fails on a machine without CUDA.
3. ``comfy/model_base.py`` (through ``comfy/ldm/cosmos``) and ``comfy/sd.py`` (through Stable Cascade's coder)
   import torchvision at import time, whose index wheel does not load with the CPU torch. An empty stand-in
   ``torchvision`` / ``torchvision.transforms`` is registered for the import only (SD-style models never use it)
   and removed afterwards. transformers, which ``comfy/sd.py`` needs, is imported before the stand-in goes in, so
   its own probe for torchvision sees the real absence.
4. On exit ``sys.path`` is restored and every module loaded from the ComfyUI folder is removed from
   ``sys.modules``. Third-party modules ComfyUI imported (scipy, torchsde, av, ...) stay: unloading compiled
   extensions is not safe.

:func:`tiny_model` builds a tiny random-weight SD1.x-style UNet (``comfy.model_base.BaseModel``, about 1 M
parameters) with discrete (eps) or flow (``CONST``) model sampling, wrapped in a CPU ``ModelPatcher``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

__all__ = ["COMFYUI_PATH_VARIABLE", "comfyui_root", "comfyui_imported", "tiny_model", "sample"]

COMFYUI_PATH_VARIABLE = "COMFYUI_PATH"
_STAND_INS = ("torchvision", "torchvision.transforms")
_CORE_MODULES = (
    "comfy.model_management",
    "comfy.model_patcher",
    "comfy.model_base",
    "comfy.model_sampling",
    "comfy.patcher_extension",
    "comfy.samplers",
    "comfy.sample",
    "comfy.supported_models_base",
    "comfy.latent_formats",
)


def comfyui_root() -> Optional[Path]:
    """The ComfyUI folder from ``COMFYUI_PATH`` when it holds ComfyUI's code, else None."""
    value = os.environ.get(COMFYUI_PATH_VARIABLE, "").strip()
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return root if (root / "comfy" / "samplers.py").is_file() else None


def skip_reason() -> str:
    value = os.environ.get(COMFYUI_PATH_VARIABLE, "").strip()
    if not value:
        return f"{COMFYUI_PATH_VARIABLE} is not set (make test sets it when ../shared/vendor/ComfyUI exists)"
    return f"{COMFYUI_PATH_VARIABLE}={value} holds no ComfyUI checkout (no comfy/samplers.py)"


@contextlib.contextmanager
def comfyui_imported(*, with_nodes: bool = False) -> Iterator[types.SimpleNamespace]:
    """Yields ``ns`` with ``ns.root`` and ComfyUI's modules as attributes (``ns.samplers`` is ``comfy.samplers``, ...;
    ``ns.nodes`` is ``nodes`` when ``with_nodes``); skips the calling test when ComfyUI is unavailable."""
    root = comfyui_root()
    if root is None:
        pytest.skip(skip_reason())
    saved_path, saved_bytecode = list(sys.path), sys.dont_write_bytecode
    before = set(sys.modules)
    sys.dont_write_bytecode = True
    try:
        if with_nodes:
            importlib.import_module("transformers")  # before the torchvision stand-in (see the module docstring)
        sys.path.insert(0, str(root))
        _check_not_shadowed(root)
        with _torchvision_stand_in():
            cli_args = importlib.import_module("comfy.cli_args")
            cli_args.args.cpu = True
            loaded = {name.split(".")[-1]: importlib.import_module(name) for name in _CORE_MODULES}
            if with_nodes:
                loaded["nodes"] = importlib.import_module("nodes")
        sys.dont_write_bytecode = True  # ComfyUI's own imports must not have switched it back
        yield types.SimpleNamespace(root=root, **loaded)
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode
        # Decide for all before removing any: a namespace package's __path__ is computed from its parent's.
        unload = [name for name in set(sys.modules) - before if _loaded_from(sys.modules.get(name), root)]
        for name in unload:
            del sys.modules[name]


def _check_not_shadowed(root: Path) -> None:
    """``comfy`` must come from ``root``, not from something imported before under the same name."""
    module = sys.modules.get("comfy")
    if module is not None and not _loaded_from(module, root):
        raise RuntimeError(f"a module named 'comfy' from {getattr(module, '__file__', '?')} is already imported")


def _loaded_from(module: Optional[types.ModuleType], root: Path) -> bool:
    if module is None:
        return False
    places = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", []) or [])
    return any(place and Path(place).resolve().is_relative_to(root) for place in places)


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    if importlib.util.find_spec("torchvision") is not None:  # a real one (it must then also load)
        yield
        return
    for name in _STAND_INS:
        module = types.ModuleType(name, "empty stand-in registered by tests/comfyui_loader.py for ComfyUI's import")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def tiny_model(comfy: types.SimpleNamespace, *, flow: bool = False, seed: int = 0):
    """A tiny SD1.x-style UNet (4 latent channels, context 32) with seeded weights, in a CPU ``ModelPatcher``.

    ``flow=True`` gives it flow-matching model sampling (``ModelSamplingDiscreteFlow`` + ``CONST``, as SD3)
    instead of discrete eps. ``comfy.ops.disable_weight_init`` leaves weights uninitialised, so every parameter
    is filled from ``torch.Generator().manual_seed(seed)``.
    """
    model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS

    class TinySD(comfy.supported_models_base.BASE):
        unet_config = {"context_dim": 32, "model_channels": 32}
        unet_extra_config = {}
        latent_format = comfy.latent_formats.SD15
        sampling_settings = {"shift": 1.0, "multiplier": 1000} if flow else {}

        def model_type(self, state_dict, prefix=""):
            return model_type

    unet_config = {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 1,
        "channel_mult": (1, 2), "transformer_depth": [0, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 1, 1], "context_dim": 32, "use_spatial_transformer": True,
        "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
        "legacy": False, "num_head_channels": 16, "num_heads": -1, "dtype": torch.float32,
    }  # fmt: skip
    model = TinySD(unet_config).get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:  # unit-variance outputs, so the prediction is not just the noisy input
                parameter.copy_(values / parameter[0].numel() ** 0.5)
            elif name.endswith("weight"):  # normalisation scales
                parameter.copy_(1.0 + 0.1 * values)
            else:
                parameter.copy_(0.1 * values)
    model.eval().requires_grad_(False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(seed: int = 1, scale: float = 1.0):
    """(positive, negative) conditioning for the tiny model: 4 tokens of width 32, the negative all zeros."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 4, 32, generator=generator) * scale, {}]], [[torch.zeros(1, 4, 32), {}]]


def sample(comfy, model, noise, sampler, scheduler, *, steps=4, cfg=5.0, seed=0, latent=None, denoise=1.0):
    """``comfy.sample.sample`` as ComfyUI's executor runs it (inference mode), with the tiny conditioning."""
    positive, negative = conditioning()
    latent = torch.zeros_like(noise) if latent is None else latent
    with torch.inference_mode():
        out = comfy.sample.sample(
            model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
            denoise=denoise, disable_pbar=True, seed=seed,
        )  # fmt: skip
    return out.clone()
