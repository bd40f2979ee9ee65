"""``kds-hook demo``: its parser and run live in :mod:`kds_hook.demo`; here it gets the up-front check of the
demo extra that the other commands have (its own errors propagate as before)."""

from __future__ import annotations

import argparse

from ..demo import register as _register_demo
from .errors import reporting_errors
from .extras import require

# What the demo imports: torch for the sampling, numpy and matplotlib for the figure.
MODULES = ("torch", "numpy", "matplotlib")


def _check_extras(args: argparse.Namespace) -> int:
    require("demo", "demo", MODULES)
    return 0


def register(commands) -> None:
    """Adds the ``demo`` sub-command to an argparse sub-parsers object."""
    _register_demo(commands)
    parser = commands.choices["demo"]
    run_demo = parser.get_default("func")
    check_extras = reporting_errors(_check_extras)

    def demo_command(args: argparse.Namespace) -> int:
        return check_extras(args) or run_demo(args)

    parser.set_defaults(func=demo_command)
