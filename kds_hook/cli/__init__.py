"""The ``kds-hook`` command: ``demo``, ``upscale`` and ``inpaint``.

One module per sub-command, each with a ``register(commands)`` that adds its parser to the sub-parsers: adding a
sub-command is a new module and one entry in :data:`COMMANDS`. The shared parts, one concern each:

- :mod:`.parser`: the argparse parser class (one-line usage errors, every default in ``--help``);
- :mod:`.errors`: one-line errors and exit codes; :mod:`.extras`: the optional dependencies a command needs;
- :mod:`.options`: the KDS, sampling and file options of the restoring commands, and their checks;
- :mod:`.images`: input images; :mod:`.outputs`: output names, checks and safe writing;
- :mod:`.models`: model loading and its messages; :mod:`.sampling`: sampler set-up and the run loop;
- :mod:`.progress`: progress bars on a terminal, plain lines in logs.

Only the standard library is imported until a command runs, so ``kds-hook --help`` and usage errors do not
import torch. Reference: ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

from .. import __version__
from .parser import Parser

__all__ = ["COMMANDS", "build_parser", "main"]

# The modules (relative to this package) whose register(commands) adds a sub-command, in the order --help lists.
COMMANDS = (".demo", ".upscale", ".inpaint", ".comfyui_install")


def build_parser() -> argparse.ArgumentParser:
    """The ``kds-hook`` parser with every sub-command of :data:`COMMANDS`."""
    parser = Parser(prog="kds-hook", description="Kernel Density Steering for diffusion samplers.")
    parser.add_argument("--version", action="version", version=f"kds-hook {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name in COMMANDS:
        importlib.import_module(name, __name__).register(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``kds-hook`` with ``argv`` (default: the process's arguments) and returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)

