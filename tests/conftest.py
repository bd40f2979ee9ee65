"""Shared test fixtures, and the check that the suite leaves nothing in the temp dir (tests/tempdir_check.py)."""

from pathlib import Path

import pytest
import torch

from tempdir_check import pytest_configure, pytest_sessionfinish  # noqa: F401 - hooks, registered by their names


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small float64 tensors: extra threads only spin, and on a busy 2-core machine make such tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sr_dir(tmp_path_factory) -> Path:
    """A tiny random-weight LDM-SR pipeline (DDIM) saved with save_pretrained, for ``--model DIR``."""
    pytest.importorskip("diffusers")
    from kds_hook.testing import tiny_ldm_sr_pipeline

    directory = tmp_path_factory.mktemp("tiny-ldm-sr")
    tiny_ldm_sr_pipeline("ddim").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def inpaint_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion inpainting pipeline (DDIM) saved with save_pretrained."""
    pytest.importorskip("diffusers")
    from kds_hook.testing import tiny_sd_pipeline

    directory = tmp_path_factory.mktemp("tiny-sd-inpaint")
    tiny_sd_pipeline("inpaint", "ddim").save_pretrained(directory)
    return directory
