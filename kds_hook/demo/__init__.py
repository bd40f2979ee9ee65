"""``kds-hook demo``: offline evidence on problems with a known answer.

Part 1 is the paper's Figure 2 (three 2-D Gaussians, exact score, N = 50); part 2 is a restoration problem with
an exact posterior (:mod:`kds_hook.demo.posterior`); part 3 upscales a held-out photo with the built-in model
(:mod:`kds_hook.demo.photo`; skipped with a message when the model is missing). Each compares plain DDIM and
DDIM + KDS from the same initial noise and reports paired differences. Outputs in ``--out`` (default
``./kds-demo``): ``figure2.png``, ``figure2.md``, ``restoration.png``, ``restoration.md``, ``photo.png``,
``photo.md`` and ``README.md`` (all parts), and a marker ``.kds-hook-demo`` that records what was written; the
demo ends by listing them. No other file is touched, and a same-named file is replaced only if the marker shows
it is unchanged since the demo wrote it (or with ``--force``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from typing import Callable, Dict, Optional

__all__ = ["register", "run_demo", "OUTPUT_FILES"]

OUTPUT_FILES = ("figure2.png", "figure2.md", "restoration.png", "restoration.md", "README.md", "photo.png", "photo.md")
# What each output holds, for the list the demo prints when it is done.
OUTPUT_DESCRIPTIONS = {
    "figure2.png": "part 1 figure: plain DDIM and DDIM + KDS on three Gaussians",
    "figure2.md": "part 1 tables",
    "restoration.png": "part 2 figure: KDS minus plain sampling on the exact-posterior problem",
    "restoration.md": "part 2 tables",
    "README.md": "every part's tables and figures",
    "photo.png": "part 3 figure: LR, bicubic, plain, KDS and ground truth crops of a held-out photo",
    "photo.md": "part 3 tables",
}
# Written into the output folder last: the SHA-256 of every file the demo wrote. A file whose content still has
# its recorded hash is ours and may be replaced; anything else (a user's file, or ours edited since) is not.
_MARKER = ".kds-hook-demo"
_MARKER_HEADER = "outputs of `kds-hook demo` (SHA-256 of each file it wrote; it may replace exactly these)"

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
        help="run the offline demo (Figure 2 toy, an exact-posterior restoration problem, a held-out photo)",
        description=(
            "Offline evidence on problems with a known answer: the paper's Figure 2 (three 2-D Gaussians, exact "
            "score, N=50) and a restoration problem with an exact posterior, each comparing plain DDIM with DDIM + "
            "KDS from the same noise (paired, over seeds); then 4x super-resolution of a held-out photo with the "
            "built-in model, plain and KDS from the same noise. Prints progress and tables; writes figure2.png, "
            "figure2.md, restoration.png, restoration.md, photo.png, photo.md, README.md and a marker "
            ".kds-hook-demo into --out. A same-named file is "
            "replaced only if the marker shows the demo wrote it and it is unchanged since (or with --force); "
            "nothing else is touched."
        ),
    )
    parser.add_argument("--out", default="kds-demo", help="output directory (default ./kds-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few seeds (a smoke test, seconds)")
    parser.add_argument(
        "--force", action="store_true",
        help="replace same-named files even if the demo did not write them (or they changed since)",
    )
    parser.set_defaults(func=main)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _recorded_hashes(out: str) -> Optional[Dict[str, str]]:
    """{file name: SHA-256} from our marker in ``out``; {} without a marker; None if the marker is not ours."""
    path = os.path.join(out, _MARKER)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
        hashes = record["sha256"]
        if record.get("written_by") != _MARKER_HEADER or not isinstance(hashes, dict):
            return None
        return {str(k): str(v) for k, v in hashes.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare_out(out: str, force: bool) -> None:
    """Creates ``out``; refuses to replace a file the demo did not write (or that changed since), unless forced."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"kds-hook demo: --out {out!r} exists and is not a directory")
    if force:
        os.makedirs(out, exist_ok=True)
        return
    recorded = _recorded_hashes(out) if os.path.isdir(out) else {}
    if recorded is None:
        raise SystemExit(
            f"kds-hook demo: {os.path.join(out, _MARKER)!r} exists but was not written by the demo; "
            "choose another --out or pass --force to replace it"
        )
    clashes = [
        name for name in OUTPUT_FILES
        if os.path.exists(os.path.join(out, name)) and recorded.get(name) != _sha256(os.path.join(out, name))
    ]
    if clashes:
        raise SystemExit(
            f"kds-hook demo: {out!r} already holds {', '.join(clashes)}, not written by the demo or changed since; "
            "choose another --out or pass --force to replace them"
        )
    os.makedirs(out, exist_ok=True)


def _write_marker(out: str, paths: Dict[str, str]) -> None:
    record = {"written_by": _MARKER_HEADER, "sha256": {name: _sha256(path) for name, path in paths.items()}}
    with open(os.path.join(out, _MARKER), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "kds-hook demo needs matplotlib for its figure: pip install 'kds-hook[demo]'"
        ) from None


def _print(message: str) -> None:
    print(message, flush=True)


def run_demo(
    out: str, *, quick: bool = False, force: bool = False, log: Callable[[str], None] = _print
) -> Dict[str, str]:
    """Runs both parts, writes the outputs into ``out`` and returns {file name: path}.

    ``quick`` shrinks every size (for tests); the tables then carry a warning that they are not the
    documented numbers. Files the demo did not write are never replaced unless ``force``; see the module
    docstring.
    """
    import torch  # here, not at the top: the kds-hook parser imports this package and --help stays light

    _check_matplotlib()
    _prepare_out(out, force)
    # Every tensor here is small (at most a few hundred kB): threads only add synchronisation, and on a busy
    # machine torch's spinning worker threads made the demo ~7x slower. One thread gives identical numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, quick, log)
    finally:
        torch.set_num_threads(threads)


def _run(out: str, quick: bool, log: Callable[[str], None]) -> Dict[str, str]:
    from .restoration import plot_restoration, restoration_tables, run_restoration
    from .toy import plot_toy, run_toy, toy_tables

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
    progress("part 1: plotting figure2.png")
    figure = io.BytesIO()  # files are written together at the end, so a failed run leaves the folder as it was
    plot_toy(toy, ["KDS h=0.3", "KDS h=0.3, no gate"], figure, num_steps=sizes["steps"])
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
    progress("part 2: plotting restoration.png")
    restoration_figure = io.BytesIO()
    plot_restoration(restoration, restoration_figure, num_steps=sizes["steps"], size=size)
    restoration_md = (
        f"## Part 2: restoration with an exact posterior (4 x {size} x {size} latents, per-pixel 3-component "
        "prior, y = A x0 + 0.1 n with A averaging channel pairs; DDIM "
        f"{sizes['steps']} steps, patch size 1, delta=0.3 while t/T >= 0.3)\n\n"
        + restoration_tables(restoration) + note
        + "\n\n![KDS minus plain sampling, paired](restoration.png)\n"
    )
    from .photo import run_photo_part  # part 3: a held-out photo and the built-in model (skipped without them)

    photo = run_photo_part(quick=quick, progress=progress)
    photo_md = photo[0] if photo else ""
    readme = (
        "# kds-hook demo\n\nRegenerate with `kds-hook demo" + (" --quick" if quick else "") + "`.\n\n"
        + toy_md + "\n" + restoration_md + ("\n" + photo_md if photo else "")
    )
    contents = {
        "figure2.png": figure.getvalue(),
        "figure2.md": toy_md.encode(),
        "restoration.png": restoration_figure.getvalue(),
        "restoration.md": restoration_md.encode(),
        "README.md": readme.encode(),
    }
    if photo:
        contents.update({"photo.md": photo_md.encode(), "photo.png": photo[1]})
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES if name in contents}
    # An output this run did not write (part 3 skipped) but an earlier run did, unchanged since, stays recorded
    # as the demo's, so that a later run may still replace it.
    recorded = _recorded_hashes(out) or {}
    kept = {
        name: os.path.join(out, name) for name in OUTPUT_FILES
        if name not in contents and os.path.isfile(os.path.join(out, name))
        and recorded.get(name) == _sha256(os.path.join(out, name))
    }
    for name, data in contents.items():
        with open(paths[name], "wb") as f:
            f.write(data)
    _write_marker(out, {**paths, **kept})
    log("\n" + toy_md + "\n" + restoration_md + ("\n" + photo_md if photo else ""))
    progress(f"done: wrote {len(paths) + 1} files into {os.path.abspath(out)}")
    width = max(len(name) for name in [*paths, _MARKER])
    for name in paths:
        log(f"  {name:<{width}}  {OUTPUT_DESCRIPTIONS[name]}")
    log(f"  {_MARKER:<{width}}  what the demo wrote, so that a rerun replaces exactly these files")
    return paths


def main(args: argparse.Namespace) -> int:
    """Entry point of ``kds-hook demo``."""
    run_demo(args.out, quick=args.quick, force=args.force)
    return 0
