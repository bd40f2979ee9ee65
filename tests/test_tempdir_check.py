"""The suite's temp-dir check (tests/tempdir_check.py) on two tiny suites run in a subprocess: one that cleans
up, one that leaves a folder in the temp dir behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SUITE = '''
import tempfile

def test_uses_tmp_path(tmp_path):
    (tmp_path / "fine.txt").write_text("pytest removes this")

def test_cleans_up():
    with tempfile.TemporaryDirectory() as folder:
        pass

def test_leaves_a_folder():
    if LEAK:
        tempfile.mkdtemp(prefix="forgotten-")
'''


def run_suite(tmp_path: Path, leak: bool) -> subprocess.CompletedProcess:
    suite = tmp_path / f"suite_leak_{leak}"
    suite.mkdir()
    (suite / "test_tiny.py").write_text(f"LEAK = {leak}\n{SUITE}")
    # PYTHONPATH: where tempdir_check lives; no third-party plugins (hypothesis ...): they only slow the start.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tempdir_check",
         "--basetemp", str(tmp_path / f"basetemp_{leak}"), "test_tiny.py"],
        cwd=suite, capture_output=True, text=True, env=env, timeout=120,
    )


def test_a_clean_suite_passes_and_a_leaking_one_fails_naming_what_it_left(tmp_path):
    clean = run_suite(tmp_path, leak=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "temp-dir check" not in clean.stdout

    leaking = run_suite(tmp_path, leak=True)
    assert leaking.returncode == 1, leaking.stdout + leaking.stderr
    assert "3 passed" in leaking.stdout  # the tests themselves pass: the check fails the run
    line = next(line for line in leaking.stdout.splitlines() if "temp-dir check" in line)
    assert "1 item(s)" in line and "forgotten-" in line
    # The private temp folders of both runs are gone: nothing is left in the temp dir this test runs with.
    import tempfile

    assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith("kds-hook-tests-")]
