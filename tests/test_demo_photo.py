"""Part 3 of the demo (a held-out photo through the built-in model) and the real-photo benchmark's helpers."""

from __future__ import annotations

import io

import pytest
import torch

from kds_hook.demo.photo import PhotoRun, matched_shrinkage, plot_crops


def _run(latents: torch.Tensor, n: int) -> PhotoRun:
    return PhotoRun(latents, (latents.clamp(-1, 1) + 1) / 2, n, 0.0)


def test_matched_shrinkage_puts_the_plain_output_as_close_to_its_mean_as_kds_is(one_torch_thread):
    gen = torch.Generator().manual_seed(0)
    n = 5
    plain = _run(torch.randn(3 * n, 3, 8, 8, generator=gen), n)
    # a tighter ensemble than plain's, as steering makes it
    steered = _run(0.4 * torch.randn(3 * n, 3, 8, 8, generator=gen), n)
    a, shrunk = matched_shrinkage(plain, steered)
    lat_p = plain.latents.reshape(3, n, 3, 8, 8)
    lat_k = steered.latents.reshape(3, n, 3, 8, 8)
    rows = torch.arange(3)
    s, m = lat_p[rows, plain.selected()[1]], lat_p.mean(1)
    k, m_k = lat_k[rows, steered.selected()[1]], lat_k.mean(1)
    norm = lambda t: t.flatten(1).norm(dim=1)  # noqa: E731
    assert bool(((a > 0) & (a < 1)).all())
    torch.testing.assert_close(norm(shrunk - m) / norm(s - m), norm(k - m_k) / norm(s - m))
    # shrinkage moves along the segment from s to m
    torch.testing.assert_close(shrunk, s + a.reshape(-1, 1, 1, 1) * (m - s))
    # an output farther from its mean than plain's is not "shrunk" away from m: a is clipped to 0
    a_far, far = matched_shrinkage(plain, _run(5.0 * steered.latents, n))
    assert torch.equal(a_far, torch.zeros(3)) and torch.equal(far, s)


def test_the_crop_figure_is_a_png():
    image = torch.rand(3, 32, 32)
    row = {"lr": torch.rand(3, 8, 8), "bicubic": image, "plain": image, "kds": image, "truth": image}
    buffer = io.BytesIO()
    plot_crops([row, row], buffer, titles=["a", "b"])
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_part_three_is_skipped_with_a_message_without_the_model(monkeypatch):
    sr = pytest.importorskip("kds_hook.sr")

    def missing(*args, **kwargs):
        raise ValueError("no super-resolution model weights in /nowhere")

    monkeypatch.setattr(sr, "load_builtin", missing)
    from kds_hook.demo.photo import run_photo_part

    messages = []
    assert run_photo_part(quick=True, progress=messages.append) is None
    assert any("part 3 skipped" in m and "/nowhere" in m for m in messages)


def test_quick_part_three_with_the_builtin_model(one_torch_thread):
    sr = pytest.importorskip("kds_hook.sr")
    pytest.importorskip("skimage")
    try:
        sr.load_builtin()
    except ValueError as missing:
        pytest.skip(f"built-in model weights missing: {missing}")
    from kds_hook.demo.photo import run_photo_part

    messages = []
    markdown, png = run_photo_part(quick=True, progress=messages.append)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| KDS - plain |" in markdown and "Quick run" in markdown
    for row in ("| bicubic |", "| plain |", "| KDS |"):
        assert row in markdown


def test_a_skipped_part_three_keeps_earlier_photo_files_replaceable(tmp_path, monkeypatch):
    import hashlib
    import json

    import kds_hook.demo.photo as photo
    from kds_hook.demo import _MARKER_HEADER, run_demo

    out = tmp_path / "demo"
    out.mkdir()
    # as an earlier run with part 3 would have left them
    (out / "photo.md").write_text("earlier part 3\n")
    (out / "photo.png").write_bytes(b"\x89PNG earlier")
    record = {"written_by": _MARKER_HEADER,
              "sha256": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("photo.md", "photo.png")}}
    (out / ".kds-hook-demo").write_text(json.dumps(record))
    monkeypatch.setattr(photo, "run_photo_part", lambda **kwargs: None)  # the built-in model missing
    run_demo(str(out), quick=True, log=lambda message: None)
    hashes = json.loads((out / ".kds-hook-demo").read_text())["sha256"]
    assert {"photo.md", "photo.png", "figure2.png"} <= set(hashes)
    run_demo(str(out), quick=True, log=lambda message: None)  # and again: still replaceable
    (out / "photo.md").write_text("edited by the user\n")  # once changed, it is the user's
    with pytest.raises(SystemExit, match="photo.md"):
        run_demo(str(out), quick=True, log=lambda message: None)
    assert (out / "photo.md").read_text() == "edited by the user\n"
