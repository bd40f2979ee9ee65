"""Every ```python block of README.md and docs/*.md runs as written: one test per block, named file:line.

Each block runs in a process of its own (tests/snippet_runner.py), with a fresh ``__main__`` namespace, its
working directory an empty temporary folder, offline (``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME``),
``OMP_NUM_THREADS=1`` and a timeout. Pages added later are picked up automatically. Conventions for writers:

- A block that needs hub weights has ``<!-- snippet: stand-in -->`` on the line right before its fence: it then
  runs inside :func:`kds_hook.testing.stand_ins`, where ``from_pretrained`` of diffusers pipelines returns tiny
  random-weight stand-ins (``STAND_INS``).
- A block whose first line is a comment starting with ``# continues`` (e.g. ``# continues the example above``)
  runs in the same process right after the previous python block of its page and may use what that defined;
  the comment is the visible statement of what it assumes. Everything else must be self-contained.
- Files a block opens with ``Image.open("name")`` or ``load_image("name")`` stand for the reader's own pictures:
  the test writes a 32 x 32 picture of that name into the folder first (a mask if the name contains "mask").
- Blocks never use CUDA unconditionally (``torch.Generator("cuda")``, ``.to("cuda")``): pick the device.
- Something that must not run (a shell transcript, output) goes in a ```bash or ```text block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("snippet_runner.py")
STAND_IN_MARKER = "<!-- snippet: stand-in -->"
CONTINUES = re.compile(r"#\s*continues\b", re.I)
OPENED_FILE = re.compile(r"""(?:Image\.open|load_image)\(\s*["']([^"':]+)["']""")
CUDA_UNCONDITIONAL = re.compile(r"""Generator\(\s*["']cuda|\.to\(\s*["']cuda|device\s*=\s*["']cuda["']\s*(#|$)""", re.M)
GROUP_TIMEOUT_S = 180
PICTURE_SIZE = 32  # pixels: LDM-SR crops to a multiple of 32; SD pipelines resize to their own default size


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # line of the opening fence
    code: str
    stand_in: bool
    continues: bool

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> List[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks_of(path: Path) -> List[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"(\s*)```python\s*", lines[i])
        if not fence:
            i += 1
            continue
        indent, start = len(fence.group(1)), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        code = "\n".join(body) + "\n"
        first = next((line.strip() for line in body if line.strip()), "")
        found.append(Block(
            page=str(path.relative_to(ROOT)),
            line=start + 1,
            code=code,
            stand_in=start > 0 and lines[start - 1].strip() == STAND_IN_MARKER,
            continues=bool(CONTINUES.match(first)),
        ))
        i += 1
    return found


BLOCKS = [block for path in pages() for block in blocks_of(path)]


def groups() -> Dict[str, List[Block]]:
    """Blocks by group: a continuing block joins its page's previous block's group."""
    result: Dict[str, List[Block]] = {}
    last: Dict[str, str] = {}
    for block in BLOCKS:
        key = last[block.page] if block.continues and block.page in last else block.name
        result.setdefault(key, []).append(block)
        last[block.page] = key
    return result


GROUPS = groups()
GROUP_OF = {block.name: key for key, members in GROUPS.items() for block in members}


class Runner:
    """Runs groups through tests/snippet_runner.py: a forking server, or fresh interpreters (see there)."""

    def __init__(self, base: Path):
        self.base = base
        self.env = dict(
            os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            HF_HOME=str(base / "hf-home"), MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.results: Dict[str, List[Optional[dict]]] = {}
        self.server: Optional[subprocess.Popen] = None
        if hasattr(os, "fork") and os.environ.get("KDS_SNIPPETS_FRESH") != "1":
            self.server_err = open(base / "server.err", "wb")
            self.server = subprocess.Popen(
                [sys.executable, str(RUNNER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self.server_err, env=self.env, cwd=base, text=True,
            )
            ready = self.server.stdout.readline()
            assert ready.strip() == '{"ready": true}', (ready, (base / "server.err").read_text()[-3000:])

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
            self.server.stdout.close()
            self.server_err.close()

    def run(self, key: str, members: List[Block], timeout: int = GROUP_TIMEOUT_S) -> List[Optional[dict]]:
        """Runs a group (once; later calls return the first results). Per block: its result dict (``ok``,
        ``error``, ``seconds``, ``out``, ``err``), or None where it did not run because a block before failed."""
        if key in self.results:
            return self.results[key]
        folder = self.base / re.sub(r"[^A-Za-z0-9]+", "-", key)
        cwd, log = folder / "cwd", folder / "log"
        cwd.mkdir(parents=True)
        log.mkdir()
        write_input_pictures(members, cwd)
        request = {
            "cwd": str(cwd), "log": str(log), "timeout": timeout,
            "blocks": [{"name": b.name, "code": b.code, "stand_in": b.stand_in} for b in members],
        }
        if self.server is not None:
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            line = self.server.stdout.readline()
            if not line:
                raise RuntimeError("the snippet server died:\n" + (self.base / "server.err").read_text()[-3000:])
            reply = json.loads(line)
        else:
            (folder / "request.json").write_text(json.dumps(request))
            try:
                done = subprocess.run([sys.executable, str(RUNNER), "run", str(folder / "request.json")],
                                      env=self.env, cwd=cwd, timeout=timeout)
                reply = {"returncode": done.returncode, "timed_out": False}
            except subprocess.TimeoutExpired:
                reply = {"returncode": None, "timed_out": True}
        results: List[Optional[dict]] = []
        for index in range(len(members)):
            status = log / f"{index}.json"
            if any(result is None or not result["ok"] for result in results):
                results.append(None)  # a block before it failed: the runner stopped there
                continue
            if not status.exists():
                results.append({"ok": False, "error": f"the process ended without a result: {reply}", "seconds": 0})
                continue
            result = json.loads(status.read_text())
            result["out"] = (log / f"{index}.out").read_text(errors="replace")
            result["err"] = (log / f"{index}.err").read_text(errors="replace")
            results.append(result)
        self.results[key] = results
        return results


def write_input_pictures(members: List[Block], cwd: Path) -> None:
    names = sorted({name for block in members for name in OPENED_FILE.findall(block.code)})
    if not names:
        return
    from kds_hook.testing import stand_in_image

    for name in names:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stand_in_image(PICTURE_SIZE, mask="mask" in Path(name).name.lower()).save(path)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    started = Runner(tmp_path_factory.mktemp("snippets"))
    yield started
    started.close()


def needs(block: Block) -> List[str]:
    """Optional packages the block's group imports."""
    code = "".join(b.code for b in GROUPS[GROUP_OF[block.name]])
    wanted = []
    if re.search(r"\bdiffusers\b|stand_ins|kds_hook\.testing", code):
        wanted += ["diffusers", "transformers"]
    if "k_diffusion" in code:
        wanted += ["scipy", "torchsde", "torchdiffeq"]
    return wanted


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_python_block_runs_as_written(block, runner):
    for module in needs(block):
        pytest.importorskip(module)
    key = GROUP_OF[block.name]
    members = GROUPS[key]
    result = runner.run(key, members)[members.index(block)]
    if result is None:
        pytest.fail(f"{block.name} did not run: a block before it in the same process failed ({key})")
    assert result["ok"], (
        f"{block.name} failed (group {key}):\n{result['error']}\n--- stderr (end) ---\n{result.get('err', '')[-3000:]}"
    )


def test_blocks_are_found_and_follow_the_rules():
    assert len([b for b in BLOCKS if b.page == "README.md"]) >= 3
    assert {b.page for b in BLOCKS} >= {"README.md", "docs/diffusers.md", "docs/k_diffusion.md"}
    problems = []
    for block in BLOCKS:
        if CUDA_UNCONDITIONAL.search(block.code):
            problems.append(f"{block.name}: uses CUDA unconditionally; pick the device with torch.cuda.is_available()")
        if block.continues and GROUP_OF[block.name] == block.name:
            problems.append(f"{block.name}: says it continues, but is the first python block of its page")
    assert not problems, "\n".join(problems)


def test_the_block_parser_reads_markers_continuations_and_indented_fences(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n<!-- snippet: stand-in -->\n```python\nx = 1\n```\n\n- item:\n\n  ```python\n  # continues above\n"
        "  print(x)\n  ```\n```bash\nnot python\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    first, second = blocks_of(page)
    assert (first.line, first.code, first.stand_in, first.continues) == (3, "x = 1\n", True, False)
    assert (second.line, second.code, second.stand_in, second.continues) == (9, "# continues above\nprint(x)\n",
                                                                           False, True)


def test_the_runner_catches_failures_isolates_blocks_and_times_out(runner):
    """The runner itself: a missing import fails although the server has torch loaded, a block after a failed
    one in its group does not run, names do not leak between groups, and a block that hangs is stopped."""
    def block(code, line, continues=False):
        return Block(page="fake.md", line=line, code=code, stand_in=False, continues=continues)

    first = runner.run("fake.md:1", [block("import torch\nx = torch.ones(2)\nprint(float(x.sum()))\n", 1),
                                     block("# continues\nassert x.shape == (2,)\n", 5, True)])
    assert [r["ok"] for r in first] == [True, True] and first[0]["out"] == "2.0\n"
    leaked = runner.run("fake.md:9", [block("print(x)\n", 9)])[0]  # x belonged to the other group
    assert not leaked["ok"] and "NameError: name 'x' is not defined" in leaked["error"]
    forgot = runner.run("fake.md:12", [block("torch.zeros(1)\n", 12), block("# continues\npass\n", 14, True),
                                       block("# continues\npass\n", 16, True)])
    assert not forgot[0]["ok"] and "NameError: name 'torch'" in forgot[0]["error"]
    assert forgot[1:] == [None, None]
    hung = runner.run("fake.md:20", [block("import time\ntime.sleep(60)\n", 20)], timeout=2)[0]
    assert not hung["ok"] and "timed_out" in hung["error"]
