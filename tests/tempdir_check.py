"""A pytest plugin (loaded by conftest.py) that fails the run if the tests leave anything in the temp dir.

At start-up the system temp dir (``tempfile.gettempdir()``) is replaced, for this process (``tempfile.tempdir``)
and the subprocesses it starts (``TMPDIR``), by a fresh private folder inside it. Whatever the tests create
through ``tempfile`` lands there, so other programs using the system temp dir at the same time cannot confuse the
check. At the end, anything still in that folder was left behind by a test: the run reports each name, fails,
and removes them. pytest's own temp base (``tmp_path``, ``tmp_path_factory``) stays where it was and is not
checked: pytest manages it. The real system temp dir thus receives nothing from the suite.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_SUITE_TEMP = pytest.StashKey[dict]()
# Caches a library keeps in the temp dir by design, created on import and reused by every later run (torch's
# inductor cache, made when diffusers imports transformers): not left by a test. They go into the private folder
# too, and are removed with it.
_LIBRARY_CACHES = ("torchinductor_",)
# pytest reads its temp base from here first; pinning it to the system temp dir keeps tmp_path out of the check.
_PYTEST_TEMPROOT = "PYTEST_DEBUG_TEMPROOT"


def pytest_configure(config: pytest.Config) -> None:
    system = tempfile.gettempdir()
    suite = tempfile.mkdtemp(prefix="kds-hook-tests-", dir=system)
    config.stash[_SUITE_TEMP] = {
        "folder": suite,
        "saved": {name: os.environ.get(name) for name in ("TMPDIR", _PYTEST_TEMPROOT)},
        "tempdir": tempfile.tempdir,
    }
    os.environ.setdefault(_PYTEST_TEMPROOT, system)
    os.environ["TMPDIR"] = suite
    tempfile.tempdir = suite


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_SUITE_TEMP, None)
    if state is None:
        return
    tempfile.tempdir = state["tempdir"]
    for name, value in state["saved"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    folder = state["folder"]
    # A trailing "/" marks a folder.
    left = sorted(name + ("/" if os.path.isdir(os.path.join(folder, name)) else "")
                  for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                  if not name.startswith(_LIBRARY_CACHES))
    shutil.rmtree(folder, ignore_errors=True)
    if not left:
        return
    message = (f"the tests left {len(left)} item(s) in the temp dir (tempfile.gettempdir()), removed now; a test "
               f"must clean up what it creates (use tmp_path, or remove it in a fixture): {', '.join(left)}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"kds-hook temp-dir check: {message}", red=True, bold=True)
    else:
        print(f"kds-hook temp-dir check: {message}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
