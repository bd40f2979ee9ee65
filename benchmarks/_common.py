"""Shared plumbing of the benchmarks: command line, progress lines, markdown output."""

from __future__ import annotations

import argparse
import os
import sys
import time

# Run from a checkout without installing: `python benchmarks/bench_x.py`.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_START = time.perf_counter()


def parse_args(description: str, default_out: str = "bench-results") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not the documented numbers")
    parser.add_argument("--out", default=default_out, help=f"folder for the markdown and figures (default {default_out})")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def write_markdown(out: str, name: str, command: str, body: str, quick: bool) -> str:
    """Prints ``body`` and writes it to ``out/name.md`` under a line naming the command that regenerates it."""
    note = "\n\n*Quick run (`--quick`): tiny sizes, not the documented numbers.*" if quick else ""
    text = f"Regenerate with `{command}`.\n\n{body}{note}\n"
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    progress(f"wrote {path}")
    return path
