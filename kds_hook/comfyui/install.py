"""Installing the nodes into a ComfyUI folder: a two-line loader file in its ``custom_nodes/``.

ComfyUI imports every ``.py`` file in ``custom_nodes/`` and registers its ``NODE_CLASS_MAPPINGS``. The loader
imports them from the installed ``kds_hook`` package, so updating kds-hook (``pip install -U``) updates the nodes
and nothing of ours is copied into the ComfyUI folder. Its first line marks it as ours: :func:`install` rewrites
only a file that carries it and refuses to touch any other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Union

__all__ = ["LOADER_NAME", "LOADER_SOURCE", "InstallResult", "install"]

LOADER_NAME = "kds_hook_nodes.py"
_MARKER = "# kds-hook ComfyUI nodes"
LOADER_SOURCE = (
    f"{_MARKER}, written by `kds-hook comfyui-install` (kds-hook must be installed in the Python that runs ComfyUI)\n"
    "from kds_hook.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n"
)


class InstallResult(NamedTuple):
    """``path``: the loader file; ``written``: False when it was already there, byte for byte."""

    path: Path
    written: bool


def install(comfyui_path: Union[str, "os.PathLike[str]"]) -> InstallResult:
    """Writes the loader ``custom_nodes/kds_hook_nodes.py`` into the ComfyUI folder ``comfyui_path``.

    ``comfyui_path`` is the folder holding ComfyUI's ``main.py`` and ``custom_nodes/``. Idempotent: when the loader
    is already there unchanged nothing is written; a loader from another kds-hook version (recognised by its first
    line) is replaced. Any other file of that name is left alone and raises ``FileExistsError``; a folder that is
    not ComfyUI's raises ``ValueError``. Restart ComfyUI afterwards; it then lists ``KDSSteer`` and ``KDSSelect``.
    """
    if not isinstance(comfyui_path, (str, os.PathLike)):
        raise TypeError(f"comfyui_path must be a path to the ComfyUI folder, got {type(comfyui_path).__name__}")
    root = Path(comfyui_path).expanduser()
    custom_nodes = root / "custom_nodes"
    if not (root / "main.py").is_file() or not custom_nodes.is_dir():
        raise ValueError(f"{root} is not a ComfyUI folder (one with main.py and custom_nodes/){_hint(root)}")
    target = custom_nodes / LOADER_NAME
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise FileExistsError(f"{target} exists and is not a plain file; kds-hook leaves it alone")
    if target.exists():
        current = target.read_bytes()
        if current == LOADER_SOURCE.encode():
            return InstallResult(target, False)
        if not current.startswith(_MARKER.encode()):
            raise FileExistsError(
                f"{target} exists and was not written by kds-hook; it is left as it is. Move it away and run the "
                "install again if kds-hook should write its loader there"
            )
    partial = target.with_name(f".{LOADER_NAME}.partial")
    partial.write_text(LOADER_SOURCE, encoding="utf-8")
    os.replace(partial, target)  # never a half-written loader, even when interrupted
    return InstallResult(target, True)


def _hint(root: Path) -> str:
    """Where the user probably meant, for the two common mix-ups."""
    if root.name == "custom_nodes" and (root.parent / "main.py").is_file():
        return f"; give its parent, {root.parent}"
    if (root / "ComfyUI" / "main.py").is_file():  # the portable build's outer folder
        return f"; did you mean {root / 'ComfyUI'}?"
    return ""
