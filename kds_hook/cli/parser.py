"""The argparse parser class of ``kds-hook`` and its sub-commands: usage errors in one line with a hint (not the
whole usage), and every option's default in ``--help``."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .errors import EXIT_BAD_INPUT


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, adding "(default X)" to every option whose help does not already name its default.
    Flags (off unless given) and options without a default are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-parsers are of the same class (argparse's default) and share its ways."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"kds-hook: error: {message} (try '{self.prog} --help')\n")
