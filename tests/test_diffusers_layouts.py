"""Latent layouts: packed 2x2 latents (Flux, Qwen-Image, Chroma) steer exactly as their unpacked form does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from kds_hook.diffusers import (  # noqa: E402
    SPATIAL,
    VIDEO,
    PackedLayout,
    apply_patch,
    packed_2x2,
    patched_layout,
    remove_patch,
)
from reference import reference_mean_shift  # noqa: E402
from scheduler_harness import BANDWIDTH, MARKS, N, kds, make, model, start  # noqa: E402

pytestmark = MARKS

H, W, C = 4, 6, 2  # latent grid and channels


def spatial_noise(seed: int) -> torch.Tensor:
    return torch.randn(2 * N, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_packed_2x2_is_diffusers_pack_and_unpack():
    """The layout's conversions are diffusers' own _pack_latents / _unpack_latents (Flux, Qwen-Image, Chroma)."""
    flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    x = spatial_noise(0)
    layout = packed_2x2(H, W)
    packed = flux.FluxPipeline._pack_latents(x, x.shape[0], C, H, W)
    assert torch.equal(layout.from_spatial(x, packed), packed)
    vae_scale = 8  # _unpack_latents takes the image size
    unpacked = flux.FluxPipeline._unpack_latents(packed, H * vae_scale, W * vae_scale, vae_scale)
    assert torch.equal(layout.to_spatial(packed), unpacked)


def test_packed_channel_order_is_channel_major():
    """Feature c*p*p + dy*p + dx of token (i, j) is channel c at pixel (i*p + dy, j*p + dx)."""
    x = spatial_noise(1)
    packed = packed_2x2(H, W).from_spatial(x, torch.empty(x.shape[0], H * W // 4, 4 * C, dtype=x.dtype))
    for i in range(H // 2):
        for j in range(W // 2):
            for c in range(C):
                for dy in range(2):
                    for dx in range(2):
                        assert packed[3, i * (W // 2) + j, c * 4 + dy * 2 + dx] == x[3, c, 2 * i + dy, 2 * j + dx]


def packed_model(scheduler, packed: torch.Tensor, t, layout) -> torch.Tensor:
    """The harness's exact model, asked in the spatial layout and answering packed (as a Flux transformer would)."""
    return layout.from_spatial(model(scheduler, layout.to_spatial(packed), t), packed)


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("name, prediction", [("flow_euler", None), ("dpmpp", "flow_prediction")])
def test_steering_packed_latents_with_their_layout_equals_steering_the_unpacked_latents(name, prediction, patch_size):
    """Same noise, same model: the packed run (layout=packed_2x2) unpacks to exactly the spatial run."""
    extra = {"use_flow_sigmas": True} if prediction else {}
    layout = packed_2x2(H, W)
    spatial_scheduler = apply_patch(make(name, prediction, **extra), kds(patch_size=patch_size, threshold=0.0))
    steerer = kds(patch_size=patch_size, threshold=0.0)
    packed_scheduler = apply_patch(make(name, prediction, **extra), steerer, layout=layout)
    x = start(spatial_scheduler, spatial_noise(2))
    start(packed_scheduler, spatial_noise(2))
    packed = layout.from_spatial(x, torch.empty(x.shape[0], H * W // 4, 4 * C, dtype=x.dtype))
    for t in spatial_scheduler.timesteps:
        x = spatial_scheduler.step(model(spatial_scheduler, x, t), t, x).prev_sample
        packed = packed_scheduler.step(packed_model(packed_scheduler, packed, t, layout), t, packed).prev_sample
        assert packed.shape == (2 * N, H * W // 4, 4 * C)
        assert torch.equal(layout.to_spatial(packed), x)
    plain = make(name, prediction, **extra)
    y = start(plain, spatial_noise(2))
    for t in plain.timesteps:
        y = plain.step(model(plain, y, t), t, y).prev_sample
    assert (y - x).abs().max() > 1e-3  # the steering acted


def test_a_packed_step_steers_the_spatial_patches():
    """One steered step on packed latents moves x0 by the reference mean shift of its *spatial* patches."""
    layout = packed_2x2(H, W)
    scheduler = apply_patch(make("flow_euler"), kds(patch_size=2, strength=0.4, threshold=0.0), layout=layout)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    scheduler._init_step_index(t)
    sigma, sigma_next = scheduler.sigmas[1].double(), scheduler.sigmas[2].double()
    packed = layout.from_spatial(spatial_noise(3), torch.empty(2 * N, H * W // 4, 4 * C, dtype=torch.float64))
    v = packed_model(scheduler, packed, t, layout)
    prev = scheduler.step(v, t, packed).prev_sample
    steered_x0 = packed - sigma * (prev - packed) / (sigma_next - sigma)
    expected = reference_mean_shift(layout.to_spatial(packed - sigma * v), N, BANDWIDTH, 2, 0.4)
    torch.testing.assert_close(layout.to_spatial(steered_x0), expected, rtol=1e-5, atol=1e-5)


def test_video_latents_are_spatial_with_three_dims():
    """(B, C, F, H, W) is already spatial: VIDEO is SPATIAL, and patch_size=(1, 2, 2) gives per-frame patches."""
    assert VIDEO is SPATIAL
    scheduler = apply_patch(make("flow_euler"), kds(patch_size=(1, 2, 2), strength=0.4, threshold=0.0), layout=VIDEO)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    scheduler._init_step_index(t)
    sigma, sigma_next = scheduler.sigmas[1].double(), scheduler.sigmas[2].double()
    video = torch.randn(N, C, 3, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = 0.5 * video + torch.tanh(video)
    prev = scheduler.step(v, t, video).prev_sample
    steered_x0 = video - sigma * (prev - video) / (sigma_next - sigma)
    expected = reference_mean_shift(video - sigma * v, N, BANDWIDTH, (1, 2, 2), 0.4)
    torch.testing.assert_close(steered_x0, expected, rtol=1e-5, atol=1e-5)


def test_patched_layout_and_removal():
    scheduler = make("flow_euler")
    assert patched_layout(scheduler) is None
    apply_patch(scheduler, kds())
    assert patched_layout(scheduler) is SPATIAL
    layout = packed_2x2(H, W)
    apply_patch(scheduler, kds(), layout=layout)
    assert patched_layout(scheduler) is layout
    remove_patch(scheduler)
    assert patched_layout(scheduler) is None


def test_layout_errors():
    with pytest.raises(TypeError, match="to_spatial"):
        apply_patch(make("flow_euler"), kds(), layout="packed")
    for bad in ((3, 4), (0, 4), (4, 4.0)):
        with pytest.raises(ValueError, match="height|width"):
            packed_2x2(*bad)
    layout = packed_2x2(H, W)
    with pytest.raises(ValueError, match=r"expects packed latents \(B, 6, C\*4\)"):
        layout.to_spatial(torch.zeros(N, 5, 8))
    with pytest.raises(ValueError, match="cannot pack"):
        layout.from_spatial(torch.zeros(N, C, H, W + 2), torch.zeros(N, 6, 4 * C))
    # the wrong grid for the latents reaches the user at the first steered step, not as a silent mix-up
    scheduler = apply_patch(make("flow_euler"), kds(threshold=0.0), layout=packed_2x2(2, 2))
    scheduler.set_timesteps(3)
    packed = torch.zeros(N, H * W // 4, 4 * C)
    with pytest.raises(ValueError, match="expects packed latents"):
        scheduler.step(packed, scheduler.timesteps[0], packed)


def test_a_layout_must_keep_rows_and_shape():
    class DropsRows:
        def to_spatial(self, x):
            return x[:1]

        def from_spatial(self, x, like):
            return x

    class WrongShape:
        def to_spatial(self, x):
            return x

        def from_spatial(self, x, like):
            return x[..., :1]

    for layout, message in ((DropsRows(), "must keep the"), (WrongShape(), "must return the shape")):
        scheduler = apply_patch(make("flow_euler"), kds(threshold=0.0), layout=layout)
        scheduler.set_timesteps(3)
        x = torch.randn(N, C, H, W)
        with pytest.raises(ValueError, match=message):
            scheduler.step(x, scheduler.timesteps[0], x)


def test_packed_layout_general_patch():
    """patch=1 is the token layout of FLUX.2 (B, H*W, C); the round trip is exact for any patch."""
    for patch in (1, 2, 3):
        layout = PackedLayout(6, 6, patch)
        x = torch.randn(2, 5, 6, 6)
        like = torch.empty(2, (6 // patch) ** 2, 5 * patch * patch)
        assert torch.equal(layout.to_spatial(layout.from_spatial(x, like)), x)
    tokens = PackedLayout(6, 6, 1).from_spatial(x, torch.empty(2, 36, 5))
    assert torch.equal(tokens, x.reshape(2, 5, 36).permute(0, 2, 1))


@pytest.mark.parametrize("patch, patch_t", [(1, 1), (2, 1), (2, 3)])
def test_packed_video_is_ltx_pack_and_unpack(patch, patch_t):
    """Video packed into tokens (LTX-Video): PackedLayout(..., frames=F, patch_t=pt) is diffusers' own packing."""
    ltx = pytest.importorskip("diffusers.pipelines.ltx.pipeline_ltx")
    frames, height, width = 3 * patch_t, 4, 6
    x = torch.randn(N, C, frames, height, width, generator=torch.Generator().manual_seed(6))
    layout = PackedLayout(height, width, patch, frames=frames, patch_t=patch_t)
    packed = ltx.LTXPipeline._pack_latents(x, patch, patch_t)
    assert torch.equal(layout.from_spatial(x, packed), packed)
    unpacked = ltx.LTXPipeline._unpack_latents(packed, frames // patch_t, height // patch, width // patch, patch, patch_t)
    assert torch.equal(layout.to_spatial(packed), unpacked)
    assert torch.equal(unpacked, x)
