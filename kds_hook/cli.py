"""The ``kds-hook`` command: ``demo``, ``upscale`` and ``inpaint``.

Each sub-command lives in its own module and registers itself here; heavy imports (diffusers, matplotlib)
happen inside the commands, so ``kds-hook --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .demo import register as register_demo
from .restore import register as register_restore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kds-hook", description="Kernel Density Steering for diffusion samplers.")
    parser.add_argument("--version", action="version", version=f"kds-hook {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for register in (register_demo, register_restore):
        register(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
