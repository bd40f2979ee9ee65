"""PatchMeanShift: the literal Algorithm 2 reference, the mean-shift invariants (hypothesis), dtypes, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from kds_hook import PatchMeanShift, auto_bandwidth
from reference import reference_mean_shift
from rounding import assert_equal_to_rounding

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def ensembles(draw, max_particles: int = 5, min_particles: int = 1):
    """(x float64 of shape (B*N, C, *spatial) or (B*N, D), N, patch_size), sizes often not divisible."""
    n = draw(st.integers(min_particles, max_particles))
    batch = draw(st.integers(1, 3))
    ndim = draw(st.integers(0, 3))
    if ndim == 0:
        shape = (draw(st.integers(1, 6)),)
        patch = draw(st.integers(1, 4))
    else:
        shape = (draw(st.integers(1, 3)),) + tuple(draw(st.integers(1, 5)) for _ in range(ndim))
        patch = draw(st.one_of(st.integers(1, 4), st.tuples(*[st.integers(1, 4)] * ndim)))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn((batch * n,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, n, patch


def _locations(x: torch.Tensor, patch):
    """Index tuples (into one particle, channel dim included) of every patch location, the literal way."""
    spatial = x.shape[2:]
    if x.ndim == 2:
        yield (slice(None),)
        return
    tiles = (patch,) * len(spatial) if isinstance(patch, int) else patch
    for corner in itertools.product(*[range(0, s, t) for s, t in zip(spatial, tiles)]):
        yield (slice(None),) + tuple(slice(a, min(a + t, s)) for a, t, s in zip(corner, tiles, spatial))


def _literal_auto_bandwidth(x: torch.Tensor, n: int, patch) -> torch.Tensor:
    """h per item from h^2 = median over (location, pair i<k) of ||p_i - p_k||^2 / (2 log N), by loops."""
    hs = []
    for item in range(x.shape[0] // n):
        sq = []
        for where in _locations(x, patch):
            patches = [x[item * n + k][where].reshape(-1) for k in range(n)]
            sq += [float((patches[i] - patches[k]).square().sum()) for i in range(n) for k in range(i + 1, n)]
        sq = sorted(v for v in sq if v > 0)  # exact zeros (coinciding particles) are left out
        median = sq[(len(sq) - 1) // 2] if sq else 0.0  # torch's lower median
        hs.append(math.sqrt(median / (2 * math.log(n))))
    return torch.tensor(hs, dtype=torch.float64)


# ---------------------------------------------------------------- the literal reference (Algorithm 2, lines 5-15)


@SETTINGS
@given(ensembles(), st.sampled_from([0.4, 1.0, 3.0]), st.floats(0.0, 1.0))
def test_matches_literal_algorithm(case, bandwidth, strength):
    x, n, patch = case
    out = PatchMeanShift(patch, bandwidth)(x, n, strength)
    expected = reference_mean_shift(x, n, bandwidth, patch, strength)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_the_documented_call_forms():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = PatchMeanShift(patch_size=1, bandwidth=0.3)
    out = op(x, num_particles=3, strength=0.4)
    m = op.shift(x, num_particles=3)
    assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device)
    torch.testing.assert_close(out, reference_mean_shift(x, 3, 0.3, 1, 0.4), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, reference_mean_shift(x, 3, 0.3, 1, 1.0) - x, rtol=0, atol=1e-12)


def _literal_two_items(x: torch.Tensor, patch, bandwidth, strength: float) -> torch.Tensor:
    """The literal Algorithm 2 on a batch of two items of 3 particles, with "auto" resolved by its literal rule."""
    if bandwidth == "auto":
        h = _literal_auto_bandwidth(x, 3, patch)
    else:
        h = torch.full((2,), bandwidth, dtype=torch.float64)
    return torch.cat([reference_mean_shift(x[b * 3 : b * 3 + 3], 3, float(h[b]), patch, strength) for b in range(2)])


@pytest.mark.parametrize(
    "shape, patch",
    [
        ((6, 3, 7), 2),  # 1-D, not divisible
        ((6, 2, 5), 4),
        ((6, 2, 9), (1,)),
        ((6, 3, 7, 5), 2),  # 2-D
        ((6, 2, 5, 6), (4, 3)),
        ((6, 2, 5, 4, 3), 2),  # 3-D
        ((6, 1, 3, 5, 4), (2, 3, 1)),
        ((6, 7), 3),  # no spatial dims: the whole vector is one patch, patch_size is ignored
    ],
    ids=["1d", "1d-big-tile", "1d-tuple", "2d", "2d-tuple", "3d", "3d-tuple", "0d"],
)
@pytest.mark.parametrize("bandwidth", [0.7, 2.5, "auto"])
def test_literal_algorithm_on_every_spatial_rank(shape, patch, bandwidth):
    # The hypothesis test above draws these too; this pins 1-D, 3-D and non-divisible sizes down explicitly.
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape)))
    op = PatchMeanShift(patch, bandwidth)
    out = op(x, 3, 0.8)
    torch.testing.assert_close(out, _literal_two_items(x, patch, bandwidth, 0.8), rtol=0, atol=1e-12)
    assert not torch.equal(out, x)


@SETTINGS
@given(ensembles(min_particles=2))
def test_auto_bandwidth_is_the_literal_median_heuristic(case):
    x, n, patch = case
    op = PatchMeanShift(patch, "auto")
    out = op(x, n, 0.7)
    h = _literal_auto_bandwidth(x, n, patch)
    torch.testing.assert_close(op.last_bandwidth, h, rtol=1e-12, atol=1e-12)
    items = [reference_mean_shift(x[b * n : (b + 1) * n], n, float(h[b]), patch, 0.7) for b in range(len(h))]
    torch.testing.assert_close(out, torch.cat(items), rtol=0, atol=1e-12)


def test_patch_larger_than_the_latent_is_one_patch():
    x = torch.randn(6, 2, 3, 5, dtype=torch.float64)
    whole = PatchMeanShift(2, 4.0)(x.reshape(6, 30), 3, 0.5)  # (B*N, D) input: the whole vector is one patch
    torch.testing.assert_close(PatchMeanShift(8, 4.0)(x, 3, 0.5), whole.reshape(x.shape))


def test_auto_bandwidth_ignores_locations_where_particles_coincide():
    # Three quarters of the locations are identical in every particle: a median over all pairs would be 0 and
    # switch steering off everywhere; the rule takes the median over the positive distances instead.
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    x[:, :, :3] = x[0, :, :3]
    op = PatchMeanShift(1, "auto")
    out = op(x, 4, 0.5)
    torch.testing.assert_close(op.last_bandwidth, _literal_auto_bandwidth(x, 4, 1), rtol=1e-12, atol=0)
    assert float(op.last_bandwidth) > 0
    assert torch.equal(out[:, :, :3], x[:, :, :3])  # coinciding particles stay put
    assert not torch.equal(out[:, :, 3], x[:, :, 3])  # the others are steered
    assert torch.equal(PatchMeanShift(1, "auto")(x[:1].expand(4, 3, 4, 4), 4, 0.5), x[:1].expand(4, 3, 4, 4))


def test_auto_bandwidth_function():
    sq = torch.tensor([[1.0, 4.0, 9.0], [2.0, 2.0, 8.0]], dtype=torch.float64)
    medians = torch.tensor([4.0, 2.0], dtype=torch.float64)  # the lower median of each row
    torch.testing.assert_close(auto_bandwidth(sq, 4), torch.sqrt(medians / (2 * math.log(4))))


# ---------------------------------------------------------------- exact no-ops


@SETTINGS
@given(ensembles(max_particles=1), st.floats(0.0, 1.0), st.sampled_from([0.3, "auto"]))
def test_one_particle_returns_the_input_itself(case, strength, bandwidth):
    x, n, patch = case
    op = PatchMeanShift(patch, bandwidth)
    assert op(x, n, strength) is x
    assert torch.equal(op.shift(x, n), torch.zeros_like(x))


@SETTINGS
@given(ensembles(), st.sampled_from([0.3, "auto"]))
def test_strength_zero_returns_the_input_itself(case, bandwidth):
    x, n, patch = case
    x = x.float()
    assert PatchMeanShift(patch, bandwidth)(x, n, 0.0) is x
    assert PatchMeanShift(patch, bandwidth)(x, n, 0) is x


def test_zero_strength_tensor_is_bit_identical():
    x = torch.randn(6, 3, 4, 4)
    assert torch.equal(PatchMeanShift(1, 1.0)(x, 3, torch.zeros(2)), x)


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.3, 2.0, "auto"]), st.floats(0.0, 1.0))
def test_identical_particles_do_not_move(case, bandwidth, strength):
    x, n, patch = case
    same = x[::n].repeat_interleave(n, dim=0)  # every particle of an item equal to its first
    op = PatchMeanShift(patch, bandwidth)
    assert torch.equal(op(same, n, strength), same)
    assert torch.equal(op.shift(same, n), torch.zeros_like(same))


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.5, "auto"]), st.booleans())
def test_the_input_is_never_modified(case, bandwidth, matmul):
    import kds_hook.meanshift as meanshift_module

    x, n, patch = case
    original = x.clone()
    saved = meanshift_module._use_matmul
    meanshift_module._use_matmul = lambda num_particles, dim: matmul
    try:
        op = PatchMeanShift(patch, bandwidth)
        op(x, n, 0.7)
        op(x, n, torch.full((x.shape[0] // n,), 0.7))
        op.shift(x, n)
        op.log_density(x, n)
    finally:
        meanshift_module._use_matmul = saved
    assert torch.equal(x, original)


# ---------------------------------------------------------------- equivariances


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.5, 2.0, "auto"]), st.randoms(use_true_random=False))
def test_permuting_particles_permutes_the_output(case, bandwidth, rnd):
    x, n, patch = case
    perm = list(range(n))
    rnd.shuffle(perm)
    rows = torch.tensor([b * n + p for b in range(x.shape[0] // n) for p in perm])
    op = PatchMeanShift(patch, bandwidth)
    torch.testing.assert_close(op(x[rows], n, 0.6), op(x, n, 0.6)[rows], rtol=0, atol=1e-12)


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.5, 2.0, "auto"]), st.floats(-100, 100))
def test_translation_equivariance(case, bandwidth, scale):
    x, n, patch = case
    offset = scale * torch.randn((1,) + x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op = PatchMeanShift(patch, bandwidth)
    torch.testing.assert_close(op(x + offset, n, 0.6), op(x, n, 0.6) + offset, rtol=0, atol=1e-9)


@SETTINGS
@given(ensembles(min_particles=2), st.floats(1e-3, 1e3))
def test_scale_equivariance_with_auto_bandwidth(case, scale):
    x, n, patch = case
    op = PatchMeanShift(patch, "auto")
    expected = scale * op(x, n, 0.6)
    h = op.last_bandwidth
    torch.testing.assert_close(op(scale * x, n, 0.6), expected, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(op.last_bandwidth, scale * h, rtol=1e-9, atol=0)


def test_fixed_bandwidth_is_not_scale_equivariant():
    # Guards the scale test above against an implementation that ignores the bandwidth.
    x = torch.randn(8, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = PatchMeanShift(1, 1.0)
    assert (op(10 * x, 4, 0.6) - 10 * op(x, 4, 0.6)).abs().max() > 0.1


def test_auto_bandwidth_grows_like_the_square_root_of_the_patch_dimension():
    # iid particles: ||p_i - p_k||^2 is about 2 D, so "auto" gives h ~ sqrt(D) and a self-weight that hardly
    # depends on the patch size, while a fixed h tuned for patch size 1 does nothing at patch size 4.
    n = 8
    x = torch.randn(2 * n, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_sqrt_dim, self_weight = {}, {}
    for patch in (1, 2, 4):
        op = PatchMeanShift(patch, "auto")
        op.shift(x, n)
        per_sqrt_dim[patch] = float(op.last_bandwidth.mean()) / math.sqrt(4 * patch**2)
        self_weight[patch] = op.last_self_weight
    assert max(per_sqrt_dim.values()) < 1.2 * min(per_sqrt_dim.values())
    assert all(1 / n + 0.05 < w < 0.9 for w in self_weight.values()), self_weight
    assert max(self_weight.values()) - min(self_weight.values()) < 0.15, self_weight
    fixed = PatchMeanShift(4, per_sqrt_dim[1] * 2)  # the "auto" h of patch size 1, kept fixed
    fixed.shift(x, n)
    assert fixed.last_self_weight > 0.99


# ---------------------------------------------------------------- convexity and the bandwidth limits


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.2, 1.0, 5.0, "auto"]), st.floats(0.0, 1.0))
def test_steered_values_stay_in_the_ensemble_range(case, bandwidth, strength):
    x, n, patch = case
    out = PatchMeanShift(patch, bandwidth)(x, n, strength)
    grouped = x.reshape(-1, n, *x.shape[1:])
    low = grouped.min(dim=1, keepdim=True).values.expand_as(grouped).reshape(x.shape)
    high = grouped.max(dim=1, keepdim=True).values.expand_as(grouped).reshape(x.shape)
    assert bool((out >= low - 1e-12).all()) and bool((out <= high + 1e-12).all())


@SETTINGS
@given(ensembles(min_particles=2), st.floats(0.0, 1.0))
def test_infinite_bandwidth_pulls_toward_the_mean(case, strength):
    x, n, patch = case
    op = PatchMeanShift(patch, float("inf"))
    mean = x.reshape(-1, n, *x.shape[1:]).mean(dim=1).repeat_interleave(n, dim=0)
    torch.testing.assert_close(op(x, n, strength), x + strength * (mean - x), rtol=0, atol=1e-12)
    op.shift(x, n)  # strength 0 returns early; the diagnostic comes from a call that computes
    assert op.last_self_weight == pytest.approx(1 / n, abs=1e-12)


@SETTINGS
@given(ensembles(min_particles=2), st.floats(0.0, 1.0))
def test_wide_bandwidth_tends_to_the_pull_toward_the_mean(case, strength):
    # The limit itself, not the special value inf: at h = 1e4 the weights differ from 1 by at most ~1e-7.
    x, n, patch = case
    mean = x.reshape(-1, n, *x.shape[1:]).mean(dim=1).repeat_interleave(n, dim=0)
    out = PatchMeanShift(patch, 1e4)(x, n, strength)
    torch.testing.assert_close(out, x + strength * (mean - x), rtol=0, atol=1e-6)


@SETTINGS
@given(ensembles(min_particles=2), st.floats(0.0, 1.0), st.sampled_from([1e-6, 1e-300]))
def test_vanishing_bandwidth_leaves_x_unchanged(case, strength, bandwidth):
    x, n, patch = case
    op = PatchMeanShift(patch, bandwidth)  # 1e-300: h^2 underflows to 0
    assert torch.equal(op(x, n, strength), x)
    op.shift(x, n)
    assert op.last_self_weight == 1.0


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.3, 1.0, 3.0, "auto"]))
def test_self_weight_lies_between_one_over_n_and_one(case, bandwidth):
    x, n, patch = case
    op = PatchMeanShift(patch, bandwidth)
    assert op.last_self_weight is None
    op(x, n, 0.5)
    assert 1 / n - 1e-12 <= op.last_self_weight <= 1 + 1e-12
    if bandwidth == "auto":  # distinct particles: the median rule is neither a no-op nor a plain mean
        assert 1 / n < op.last_self_weight < 1


def test_self_weight_is_the_mean_of_the_literal_self_weights():
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    op = PatchMeanShift(2, 1.0)
    op(x, 3, 0.3)
    ratios = []
    for item, i in itertools.product(range(2), range(3)):
        for where in _locations(x, 2):
            p = [x[item * 3 + k][where].reshape(-1) for k in range(3)]
            w = [math.exp(-float((p[i] - q).square().sum()) / 2.0) for q in p]
            ratios.append(w[i] / sum(w))
    assert op.last_self_weight == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)


# ---------------------------------------------------------------- locality: locations and items are independent


@SETTINGS
@given(ensembles(min_particles=2), st.sampled_from([0.5, 2.0]), st.data())
def test_locations_and_items_are_independent(case, bandwidth, data):
    x, n, patch = case
    locations = list(_locations(x, patch))
    where = data.draw(st.sampled_from(locations))
    row = data.draw(st.integers(0, x.shape[0] - 1))
    changed = x.clone()
    changed[row][where] += 3.0
    op = PatchMeanShift(patch, bandwidth)
    before, after = op(x, n, 0.8), op(changed, n, 0.8)
    item = row // n
    touched = torch.zeros_like(x, dtype=torch.bool)
    touched[item * n : (item + 1) * n][(slice(None),) + where] = True
    assert torch.equal(before[~touched], after[~touched])
    assert not torch.equal(before[touched], after[touched])


def test_auto_bandwidth_is_per_item():
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scaled = x.clone()
    scaled[4:] *= 100.0
    op = PatchMeanShift(1, "auto")
    out = op(scaled, 4, 0.5)
    # Item 0 is steered as on its own (to rounding: the batch differs); pooling both items would not be.
    assert_equal_to_rounding(out[:4], op(x[:4], 4, 0.5), leaked=op(scaled, 8, 0.5)[:4])
    torch.testing.assert_close(out[4:], 100.0 * op(x[4:], 4, 0.5), rtol=1e-9, atol=1e-9)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "elementwise"])
@pytest.mark.parametrize("bandwidth", [0.8, "auto"])
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_no_n_by_n_by_d_tensor(monkeypatch, matmul, bandwidth, patch):
    # Every intermediate is at most the size of x or of the pairwise maps (B, L, N, N); the naive formulation's
    # difference tensor (B, L, N, N, D) is N times the size of x.
    import kds_hook.meanshift as meanshift_module

    monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: matmul)
    n, batch = 16, 2
    x = torch.randn(batch * n, 4, 8, 7, generator=torch.Generator().manual_seed(0))
    locations = math.ceil(8 / patch) * math.ceil(7 / patch)
    bound = max(x.numel(), batch * locations * n * n)
    op = PatchMeanShift(patch, bandwidth)
    for call in (lambda: op(x, n, 0.5), lambda: op.shift(x, n), lambda: op.log_density(x, n)):
        with _LargestTensor() as seen:
            call()
        assert seen.largest <= bound, (seen.largest, bound)
    naive = x.reshape(batch, n, -1)
    with _LargestTensor() as seen:  # the guard can fail: it sees the naive formulation's tensor
        (naive.unsqueeze(1) - naive.unsqueeze(2)).square().sum(-1)
    assert seen.largest == n * x.numel() > bound


# ---------------------------------------------------------------- numerics, dtypes, layouts


@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "elementwise"])
def test_far_apart_particles_give_no_nan(monkeypatch, matmul):
    import kds_hook.meanshift as meanshift_module

    monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: matmul)
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 1e15
    for bandwidth in (1e-3, 1.0, "auto"):
        op = PatchMeanShift(2, bandwidth)
        out = op(x, 4, 1.0)
        assert bool(torch.isfinite(out).all())
        assert 0.25 <= op.last_self_weight <= 1.0
    assert torch.equal(PatchMeanShift(2, 1.0)(x, 4, 1.0), x)  # every other particle has weight exactly 0


def test_very_far_apart_particles_in_the_matmul_layout(monkeypatch):
    import kds_hook.meanshift as meanshift_module

    monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: True)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e18
    assert torch.equal(PatchMeanShift(4, 1.0)(x, 4, 1.0), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    for bandwidth in (1.0, "auto"):
        out = PatchMeanShift(2, bandwidth)(x, 4, 0.5)
        assert out.dtype == dtype
        assert torch.equal(out, PatchMeanShift(2, bandwidth)(x.float(), 4, 0.5).to(dtype))
        shift = PatchMeanShift(2, bandwidth).shift(x, 4)
        assert shift.dtype == dtype
        assert torch.equal(shift, PatchMeanShift(2, bandwidth).shift(x.float(), 4).to(dtype))


def test_float64_stays_float64():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    op = PatchMeanShift(1, 1.0)
    assert op(x, 2, 0.5).dtype == torch.float64
    assert op.shift(x, 2).dtype == torch.float64
    assert op.shift(x.float(), 2).dtype == torch.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.to(memory_format=torch.channels_last),
        lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
        lambda x: torch.stack([x, -x], dim=-1)[..., 0],
    ],
    ids=["channels_last", "transposed", "strided"],
)
def test_non_contiguous_input_gives_the_contiguous_result(make):
    x = torch.randn(6, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    view = make(x)
    assert torch.equal(view, x) and not view.is_contiguous()
    op = PatchMeanShift(2, 1.5)
    torch.testing.assert_close(op(view, 3, 0.5), op(x, 3, 0.5), rtol=0, atol=1e-6)


def test_strength_per_item():
    x = torch.randn(9, 3, 4, 4, dtype=torch.float64)
    op = PatchMeanShift(1, 1.0)
    out = op(x, 3, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(out[:3], x[:3])
    torch.testing.assert_close(out[3:6], op(x[3:6], 3, 0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[6:], op(x[6:], 3, 1.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(op(x, 3, torch.tensor(0.5)), op(x, 3, 0.5), rtol=0, atol=0)


def test_shift_is_the_steering_direction():
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    op = PatchMeanShift(2, 1.0)
    torch.testing.assert_close(op(x, 3, 0.4), x + 0.4 * op.shift(x, 3), rtol=0, atol=1e-12)


def test_log_density_is_the_literal_kde():
    x = torch.randn(6, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.zeros(6, dtype=torch.float64)
    for row in range(6):
        item = row // 3
        for where in _locations(x, 2):
            p = x[row][where].reshape(-1)
            terms = [-(p - x[item * 3 + k][where].reshape(-1)).square().sum() / (2 * 0.7**2) for k in range(3)]
            expected[row] += torch.stack(terms).logsumexp(0)
    torch.testing.assert_close(PatchMeanShift(2, 0.7).log_density(x, 3), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bandwidth": 0.0}, ValueError, "bandwidth must be positive"),
        ({"bandwidth": -1.0}, ValueError, "bandwidth must be positive"),
        ({"bandwidth": float("nan")}, ValueError, "bandwidth must be positive"),
        ({"bandwidth": float("-inf")}, ValueError, "bandwidth must be positive"),
        ({"bandwidth": "median"}, ValueError, "bandwidth must be a positive float or \"auto\""),
        ({"bandwidth": True}, TypeError, "bandwidth"),
        ({"bandwidth": None}, TypeError, "bandwidth"),
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
        ({"patch_size": 1.5}, TypeError, "patch_size must be an int"),
        ({"patch_size": (2, 2, 2, 2)}, ValueError, "1 to 3 entries"),
        ({"patch_size": (2, 0)}, ValueError, "patch_size must be >= 1"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        PatchMeanShift(**kwargs)


@pytest.mark.parametrize(
    "x, n, strength, error, match",
    [
        (torch.randn(5, 3, 4, 4), 2, 0.3, ValueError, "batch size 5 is not divisible by num_particles=2"),
        (torch.randn(4, 3, 4, 4), 0, 0.3, ValueError, "num_particles must be >= 1"),
        (torch.randn(4, 3, 4, 4), 2.0, 0.3, TypeError, "num_particles must be an int"),
        (torch.randn(4, 3, 4, 4), True, 0.3, TypeError, "num_particles must be an int"),
        (torch.randn(4, 3, 4, 4), 2, 1.5, ValueError, r"strength must lie in \[0, 1\]"),
        (torch.randn(4, 3, 4, 4), 2, -0.1, ValueError, r"strength must lie in \[0, 1\]"),
        (torch.randn(4, 3, 4, 4), 2, float("nan"), ValueError, r"strength must lie in \[0, 1\]"),
        (torch.randn(4, 3, 4, 4), 2, float("inf"), ValueError, r"strength must lie in \[0, 1\]"),
        (torch.randn(4, 3, 4, 4), 2, "0.3", TypeError, "strength must be a float"),
        (torch.randn(4, 3, 4, 4), 2, torch.tensor([0.2, 1.2]), ValueError, r"strength must lie in \[0, 1\]"),
        (torch.randn(4, 3, 4, 4), 2, torch.ones(2, 1), ValueError, "0-D or 1-D"),
        (torch.randn(4, 3, 4, 4), 2, torch.tensor([0.1, 0.2, 0.3]), ValueError, "one value per item"),
        (torch.randn(4), 2, 0.3, ValueError, "0 to 3 spatial dims"),
        (torch.randn(0, 3, 4, 4), 2, 0.3, ValueError, r"x is empty \(shape \(0, 3, 4, 4\)\)"),
        (torch.randn(4, 3, 0, 4), 2, 0.3, ValueError, "x is empty"),
        (torch.randn(4, 0), 2, 0.3, ValueError, "x is empty"),
        (torch.randn(4, 1, 2, 2, 2, 2), 2, 0.3, ValueError, "0 to 3 spatial dims"),
        (torch.ones(4, 3, 4, 4, dtype=torch.int64), 2, 0.3, TypeError, "floating-point"),
        ([[0.0]] * 4, 2, 0.3, TypeError, "x must be a torch.Tensor"),
        (torch.randn(4, 3, 4).index_fill(2, torch.tensor([1]), float("nan")), 2, 0.3, ValueError, "NaN or Inf"),
        (torch.randn(4, 3, 4).index_fill(2, torch.tensor([1]), float("inf")), 2, 0.3, ValueError, "NaN or Inf"),
    ],
)
def test_bad_call(x, n, strength, error, match):
    with pytest.raises(error, match=match):
        PatchMeanShift(1, 0.3)(x, n, strength)


def test_bad_patch_size_for_the_input():
    with pytest.raises(ValueError, match=r"patch_size \(2, 2\) has 2 entries but x has 1 spatial dims"):
        PatchMeanShift((2, 2), 0.3)(torch.randn(4, 3, 5), 2, 0.3)


def test_nan_check_can_be_skipped_but_is_on_by_default():
    x = torch.randn(4, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    for call in (lambda op: op(x, 2, 0.3), lambda op: op.shift(x, 2), lambda op: op.log_density(x, 2)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(PatchMeanShift(1, 0.3))
    out = PatchMeanShift(1, 0.3)(x, 2, 0.3, check_finite_values=False)
    # The NaN stays inside its own item (to rounding: the batch differs); one ensemble of all rows would spread it.
    pooled = PatchMeanShift(1, 0.3)(x, 4, 0.3, check_finite_values=False)
    assert_equal_to_rounding(out[2:], PatchMeanShift(1, 0.3)(x[2:], 2, 0.3), leaked=pooled[2:])


@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "elementwise"])
@pytest.mark.parametrize("bandwidth", [0.8, "auto"])
def test_both_layouts_match_the_literal_algorithm(monkeypatch, matmul, bandwidth):
    # The operator picks its layout from N and the patch dimension; force each one on the same inputs.
    import kds_hook.meanshift as meanshift_module

    gen = torch.Generator().manual_seed(2)
    for shape, patch in [((6, 3, 7, 5), 2), ((6, 4, 9, 8), 4), ((6, 2, 5, 4, 3), (2, 3, 1)), ((6, 5), 1)]:
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
        monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: matmul)
        op = PatchMeanShift(patch, bandwidth)
        out = op(x, 3, 0.6)
        density = op.log_density(x, 3)
        torch.testing.assert_close(out, _literal_two_items(x, patch, bandwidth, 0.6), rtol=0, atol=1e-12)
        monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: not matmul)
        torch.testing.assert_close(density, PatchMeanShift(patch, bandwidth).log_density(x, 3), rtol=1e-12, atol=1e-12)


def test_layout_rule():
    from kds_hook.meanshift import _use_matmul

    assert not _use_matmul(64, 4) and not _use_matmul(64, 3)  # patch 1 of a 3-4 channel latent
    assert not _use_matmul(10, 16) and not _use_matmul(10, 12) and _use_matmul(32, 16) and _use_matmul(32, 12)
    assert _use_matmul(4, 48) and _use_matmul(10, 64)


def test_a_call_that_steers_nothing_clears_the_diagnostics():
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    op = PatchMeanShift(1, 1.0)
    op(x, 4, 0.5)
    assert op.last_self_weight is not None and op.last_bandwidth is not None
    assert op(x, 4, 0.0) is x
    assert op.last_self_weight is None and op.last_bandwidth is None
    op.shift(x, 4)
    assert op.last_self_weight is not None
    assert torch.equal(op.shift(x, 1), torch.zeros_like(x))
    assert op.last_self_weight is None and op.last_bandwidth is None


@pytest.mark.parametrize("call", ["steer", "shift", "log_density"])
def test_operator_refuses_a_tensor_that_requires_grad(call):
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    op = PatchMeanShift(1, 0.3)
    run = {"steer": lambda: op(x, 2, 0.3), "shift": lambda: op.shift(x, 2), "log_density": lambda: op.log_density(x, 2)}
    with pytest.raises(ValueError, match="x requires grad, but KDS steering is not differentiable"):
        run[call]()
    with torch.no_grad():
        run[call]()  # under no_grad, as in every sampler, it runs
    assert torch.equal(op(x.detach(), 2, 0.3), op(x.detach(), 2, 0.3))
