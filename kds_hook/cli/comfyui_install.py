"""``kds-hook comfyui-install PATH``: puts the KDS nodes into a ComfyUI folder (see :func:`kds_hook.comfyui.install`)."""

from __future__ import annotations

import argparse
import sys

from .errors import CommandError, reporting_errors


def register(commands) -> None:
    """Adds the ``comfyui-install`` sub-command to the ``kds-hook`` parser's sub-commands."""
    parser = commands.add_parser(
        "comfyui-install",
        help="add the KDSSteer and KDSSelect nodes to a ComfyUI folder",
        description="Writes custom_nodes/kds_hook_nodes.py, a two-line loader that imports the nodes from this "
        "kds-hook installation, into the ComfyUI folder PATH (the one with main.py). Running it again changes "
        "nothing; a file of that name that kds-hook did not write is left alone. ComfyUI must run in a Python "
        "where kds-hook is installed; restart it afterwards.",
    )
    parser.add_argument("comfyui_path", metavar="PATH", help="the ComfyUI folder (holding main.py and custom_nodes/)")
    parser.set_defaults(func=reporting_errors(comfyui_install_command))


def comfyui_install_command(args: argparse.Namespace) -> int:
    """Runs ``kds-hook comfyui-install`` and returns 0; raises :class:`CommandError` on a problem."""
    from ..comfyui import install

    try:
        result = install(args.comfyui_path)
    except (ValueError, FileExistsError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"cannot write the loader: {error}", code=1) from None
    if result.written:
        print(f"wrote {result.path}; restart ComfyUI to load the nodes KDSSteer and KDSSelect")
    else:
        print(f"{result.path} is already installed; nothing changed")
    print(f"ComfyUI must run in a Python that can import kds_hook (this one is {sys.executable})")
    return 0
