"""How the commands report problems: one line ``kds-hook: error: ...`` and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2  # the same code argparse uses for usage errors
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
TRACEBACK_VARIABLE = "KDS_HOOK_TRACEBACK"  # set it to see the traceback of an unexpected error


class CommandError(Exception):
    """A problem reported as one line ``kds-hook: error: ...`` with exit code ``code`` (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with its :class:`CommandError`, Ctrl-C and unforeseen exceptions turned into one line on stderr
    and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CommandError as error:
            print(f"kds-hook: error: {error}", file=sys.stderr)
            return error.code
        except KeyboardInterrupt:
            print("kds-hook: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as error:  # noqa: BLE001 - a bug or a library failure we did not foresee: still one line
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            print(f"kds-hook: error: unexpected {type(error).__name__}: {first_line(error)} "
                  f"(set {TRACEBACK_VARIABLE}=1 to see the traceback)", file=sys.stderr)
            return EXIT_RUN_FAILED

    run.__doc__ = command.__doc__
    return run


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters."""
    text = (str(error).strip().splitlines() or [repr(error)])[0]
    return text if len(text) <= 300 else text[:297] + "..."
