"""Runs documentation code blocks for tests/test_docs_snippets.py, each group in a process of its own.

A *group* is one block, or a block and those that continue it (see test_docs_snippets.py). Its blocks run in
order in one fresh ``__main__`` namespace, with the process's working directory set to the group's folder; a
block marked as needing hub weights runs inside :func:`kds_hook.testing.stand_ins`. For block i the runner
writes ``i.out`` and ``i.err`` (everything written to file descriptors 1 and 2, so C-level output too) and
``i.json`` (``{"ok": bool, "error": str, "seconds": float}``) into the group's log folder, and stops at the
first failure.

Two ways to run (both used by the test):

- ``python snippet_runner.py run REQUEST.json``: a fresh interpreter per group.
- ``python snippet_runner.py serve``: a server that imports the heavy libraries (torch, diffusers, transformers,
  kds_hook; never k_diffusion) once, then forks a child per group from that state. Requests and replies are one
  JSON object per line on stdin/stdout. A child starts with a fresh ``__main__`` namespace, so a block that
  forgets an import still fails; what it shares is only the module cache (the import itself is free). This
  keeps the whole snippet test within its time budget; ``KDS_SNIPPETS_FRESH=1`` uses fresh interpreters.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import signal
import sys
import time
import traceback
import types


def run_group(request: dict) -> None:
    """Runs a group's blocks as described in the module docstring (in this process)."""
    os.chdir(request["cwd"])
    log = request["log"]
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = ["snippet"]
    for index, block in enumerate(request["blocks"]):
        with _output_to(os.path.join(log, f"{index}.out"), os.path.join(log, f"{index}.err")):
            start = time.perf_counter()
            error = ""
            try:
                code = compile(block["code"], block["name"], "exec")
                if block["stand_in"]:
                    from kds_hook.testing import stand_ins

                    with stand_ins():
                        exec(code, main.__dict__)
                else:
                    exec(code, main.__dict__)
            except BaseException:  # SystemExit and KeyboardInterrupt count as failures of the block too
                error = traceback.format_exc()
        with open(os.path.join(log, f"{index}.json"), "w") as f:
            json.dump({"ok": not error, "error": error, "seconds": time.perf_counter() - start}, f)
        if error:
            return


@contextlib.contextmanager
def _output_to(out_path: str, err_path: str):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def preload() -> None:
    """Imports what most blocks import, so that forked children find it in the module cache."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import kds_hook  # noqa: F401
    import kds_hook.analytic  # noqa: F401
    import kds_hook.diffusers  # noqa: F401
    import kds_hook.k_diffusion  # noqa: F401
    import kds_hook.k_diffusion_loader  # noqa: F401  (the module only: k_diffusion stays unimported)

    try:
        import diffusers
        import transformers  # noqa: F401
        from PIL import Image  # noqa: F401

        import kds_hook.testing
    except ImportError:  # no diffusers extra: the test skips the blocks that need it
        return
    for name in list(kds_hook.testing.STAND_INS) + ["DiffusionPipeline", "AutoPipelineForText2Image"]:
        with contextlib.suppress(Exception):
            getattr(diffusers, name)
    with contextlib.suppress(Exception):
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def serve() -> None:
    """The forking server: see the module docstring."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the replies
    preload()
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the group, then leave without running the server's exit handlers
            status = 1
            try:
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                replies.close()
                signal.alarm(int(request["timeout"]))  # SIGALRM's default action ends the process
                run_group(request)
                status = 0
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        signalled = os.WIFSIGNALED(wait_status)
        replies.write(json.dumps({
            "returncode": -os.WTERMSIG(wait_status) if signalled else os.WEXITSTATUS(wait_status),
            "timed_out": signalled and os.WTERMSIG(wait_status) == signal.SIGALRM,
        }) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        with open(sys.argv[2]) as f:
            run_group(json.load(f))
    else:
        sys.exit("usage: snippet_runner.py serve | run REQUEST.json")
