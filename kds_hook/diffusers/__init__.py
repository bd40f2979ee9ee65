"""diffusers integration: steer a pipeline's scheduler in one line (tomesd style, duck-typed).

Importing this module does not import diffusers; the functions work on any object with the right methods.
"""

from .patch import apply_patch, remove_patch  # noqa: E402

__all__ = ["apply_patch", "remove_patch"]
