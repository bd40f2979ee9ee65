"""``kds-hook demo``: offline evidence on problems with a known answer.

Part 1 is the paper's Figure 2 (three 2-D Gaussians, exact score, N = 50); part 2 is a restoration problem with
an exact posterior (:mod:`kds_hook.demo.posterior`). Both compare plain DDIM and DDIM + KDS from the same
initial noise and report paired differences. Outputs in ``--out`` (default ``./kds-demo``): ``figure2.png``,
``figure2.md``, ``restoration.md`` and ``README.md`` (both tables); no other file is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict

__all__ = ["register", "run_demo", "OUTPUT_FILES"]

OUTPUT_FILES = ("figure2.png", "figure2.md", "restoration.md", "README.md")
# Written into the output folder; its presence marks our own earlier outputs as safe to replace.
_MARKER = ".kds-hook-demo"

# The paper's setting (delta = 0.3 while t/T >= 0.3) with its h and "auto", and the same without the gate
# (threshold 0), which shows how much of the effect the gate leaves out on these problems.
TOY_CONFIGS = {
    "KDS h=0.3": {"bandwidth": 0.3},
    "KDS auto": {"bandwidth": "auto"},
    "KDS h=0.3, no gate": {"bandwidth": 0.3, "threshold": 0.0},
    "KDS auto, no gate": {"bandwidth": "auto", "threshold": 0.0},
}
RESTORATION_CONFIGS = {f"KDS h={h}": {"bandwidth": h} for h in (0.1, 0.3, 0.6, 1.0)}
RESTORATION_CONFIGS.update(
    {
        "KDS auto": {"bandwidth": "auto"},
        "KDS h=0.3, no gate": {"bandwidth": 0.3, "threshold": 0.0},
        "KDS auto, no gate": {"bandwidth": "auto", "threshold": 0.0},
    }
)


def register(commands) -> None:
    """Adds the ``demo`` sub-command to the ``kds-hook`` parser's sub-commands."""
    parser = commands.add_parser(
        "demo",
        help="run the offline demo (Figure 2 toy and an exact-posterior restoration problem)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--out", default="kds-demo", help="output directory (default ./kds-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few seeds (a smoke test, seconds)")
    parser.add_argument("--force", action="store_true", help="replace same-named files not written by the demo")
    parser.set_defaults(func=main)


def _prepare_out(out: str, force: bool) -> None:
    """Creates ``out``; refuses to replace a same-named file the demo did not write, unless forced."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"kds-hook demo: --out {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    ours = os.path.exists(os.path.join(out, _MARKER))
    clashes = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out, name))]
    if clashes and not ours and not force:
        raise SystemExit(
            f"kds-hook demo: {out!r} already holds {', '.join(clashes)}, not written by the demo; "
            "choose another --out or pass --force to replace them"
        )
    with open(os.path.join(out, _MARKER), "w") as f:
        f.write("outputs of `kds-hook demo`; the demo may replace: " + " ".join(OUTPUT_FILES) + "\n")


def _print(message: str) -> None:
    print(message, flush=True)


def run_demo(
    out: str, *, quick: bool = False, force: bool = False, log: Callable[[str], None] = _print
) -> Dict[str, str]:
    """Runs both parts, writes the outputs into ``out`` and returns {file name: path}.

    ``quick`` shrinks every size (for tests); the tables then carry a warning that they are not the
    documented numbers.
    """
    from .restoration import restoration_tables, run_restoration
    from .toy import plot_toy, run_toy, toy_tables

    _prepare_out(out, force)
    start = time.perf_counter()

    def progress(message: str) -> None:
        log(f"[{time.perf_counter() - start:5.1f}s] {message}")

    sizes = (
        dict(toy_seeds=6, toy_particles=20, steps=10, images=4, size=4, particles=5)
        if quick
        else dict(toy_seeds=64, toy_particles=50, steps=50, images=16, size=16, particles=10)
    )
    note = "\n\n*Quick run (`--quick`): tiny sizes, not the documented numbers.*" if quick else ""

    toy = run_toy(
        TOY_CONFIGS, num_seeds=sizes["toy_seeds"], num_particles=sizes["toy_particles"],
        num_steps=sizes["steps"], progress=progress,
    )
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    progress("part 1: plotting figure2.png")
    plot_toy(toy, ["KDS h=0.3", "KDS h=0.3, no gate"], paths["figure2.png"])
    toy_md = (
        "## Part 1: the paper's Figure 2 (three 2-D Gaussians, exact score, DDIM "
        f"{sizes['steps']} steps, eta=0, delta=0.3 while t/T >= 0.3)\n\n" + toy_tables(toy) + note
        + "\n\n![plain DDIM vs DDIM + KDS](figure2.png)\n"
    )
    restoration = run_restoration(
        RESTORATION_CONFIGS, num_images=sizes["images"], size=sizes["size"],
        num_particles=sizes["particles"], num_steps=sizes["steps"], progress=progress,
    )
    size = sizes["size"]
    restoration_md = (
        f"## Part 2: restoration with an exact posterior (4 x {size} x {size} latents, per-pixel 3-component "
        "prior, y = A x0 + 0.1 n with A averaging channel pairs; DDIM "
        f"{sizes['steps']} steps, patch size 1, delta=0.3 while t/T >= 0.3)\n\n"
        + restoration_tables(restoration) + note + "\n"
    )
    with open(paths["figure2.md"], "w") as f:
        f.write(toy_md)
    with open(paths["restoration.md"], "w") as f:
        f.write(restoration_md)
    with open(paths["README.md"], "w") as f:
        f.write("# kds-hook demo\n\nRegenerate with `kds-hook demo" + (" --quick" if quick else "")
                + "`.\n\n" + toy_md + "\n" + restoration_md)
    log("\n" + toy_md + "\n" + restoration_md)
    progress(f"done: outputs in {os.path.abspath(out)}")
    return paths


def main(args: argparse.Namespace) -> int:
    """Entry point of ``kds-hook demo``."""
    run_demo(args.out, quick=args.quick, force=args.force)
    return 0
