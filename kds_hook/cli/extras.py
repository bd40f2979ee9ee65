"""The optional dependencies each command needs, checked before it does anything else, so a missing one is one
line naming the ``pip install`` that brings it, not an ImportError from deep inside a library."""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from .errors import CommandError

# import name -> the name pip knows it by, where the two differ
_DISTRIBUTIONS = {"PIL": "pillow", "huggingface_hub": "huggingface-hub"}


def _installed(module: str) -> bool:
    if module in sys.modules:  # also how a test blocks an import: sys.modules[name] = None
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None  # finds the module without importing it
    except (ImportError, ValueError):
        return False


def require(command: str, extra: str, modules: Sequence[str]) -> None:
    """Raises a :class:`CommandError` (exit 2) naming ``pip install 'kds-hook[EXTRA]'`` unless every one of
    ``modules`` (top-level import names) is installed."""
    missing = [_DISTRIBUTIONS.get(module, module) for module in modules if not _installed(module)]
    if missing:
        raise CommandError(f"kds-hook {command} needs {', '.join(missing)}, not installed here: "
                           f"pip install 'kds-hook[{extra}]'")
