"""``kds-hook demo``: the parser and the run live in :mod:`kds_hook.demo`."""

from __future__ import annotations

from ..demo import register

__all__ = ["register"]
