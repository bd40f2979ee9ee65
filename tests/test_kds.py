"""KDS: the time gate, steer_x0, selection, from_minkds, the recorded diagnostics and bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from rounding import assert_equal_to_rounding

from kds_hook import KDS, PatchMeanShift, StepRecord, TimeGate, select_particles
from kds_hook.analytic import three_gaussians


def _x(rows: int = 8, shape=(3, 4, 4), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn((rows,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- the time gate (Eq. 10)


def test_gate_is_the_papers_step():
    gate = TimeGate()
    assert (gate.strength, gate.threshold) == (0.3, 0.3)
    assert gate(1.0) == 0.3 and gate(0.3) == 0.3  # open at t/T >= threshold
    assert gate(math.nextafter(0.3, 0.0)) == 0.0 and gate(0.0) == 0.0
    values = gate(torch.tensor([0.9, 0.3, 0.1]))
    assert values.tolist() == [0.3, 0.3, 0.0]


def test_gate_with_a_schedule():
    gate = TimeGate(schedule=lambda t: 0.5 * t)
    assert gate(0.8) == pytest.approx(0.4)
    assert gate(0.0) == 0.0
    with pytest.raises(ValueError, match=r"schedule\(t/T\) must lie in \[0, 1\]"):
        TimeGate(schedule=lambda t: 2.0)(0.5)


def test_kds_with_a_schedule_steers_by_its_value():
    seen = []

    def schedule(t_frac: float) -> float:
        seen.append(t_frac)
        return 0.5 * t_frac

    kds = KDS(num_particles=4, bandwidth=1.0, strength=0.9, threshold=0.9, schedule=schedule)
    x = _x()
    # The schedule replaces strength and threshold: steered at t/T = 0.2 (below threshold), by 0.5 * 0.2.
    torch.testing.assert_close(kds.steer_x0(x, t_frac=0.2), PatchMeanShift(1, 1.0)(x, 4, 0.1), rtol=0, atol=0)
    assert seen == [0.2] and kds.strength_at(0.8) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"strength": 1.5}, ValueError, r"strength must lie in \[0, 1\]"),
        ({"strength": float("nan")}, ValueError, r"strength must lie in \[0, 1\]"),
        ({"threshold": float("nan")}, ValueError, "threshold must be a number"),
        ({"threshold": "0.3"}, ValueError, "threshold must be a number"),
        ({"schedule": 0.3}, TypeError, "schedule must be a callable"),
    ],
)
def test_bad_gate(kwargs, error, match):
    with pytest.raises(error, match=match):
        TimeGate(**kwargs)


def test_gate_rejects_nan_time():
    with pytest.raises(ValueError, match="NaN"):
        TimeGate()(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        TimeGate()(torch.tensor([0.5, float("nan")]))


# ---------------------------------------------------------------- steer_x0


def test_the_documented_call_forms():
    kds = KDS(num_particles=10, patch_size=1, bandwidth=0.3, strength=0.3, threshold=0.3, sigma_to_t_frac=lambda s: s)
    denoised = _x(rows=20, seed=1)
    steered = kds.steer_x0(denoised, 0.5)  # sigma positional, mapped to t/T = 0.5 >= 0.3
    assert torch.equal(steered, PatchMeanShift(patch_size=1, bandwidth=0.3)(denoised, num_particles=10, strength=0.3))
    assert kds.steer_x0(denoised, 0.1) is denoised
    sample, index = kds.select(steered)
    assert sample.shape == (2, 3, 4, 4) and index.shape == (2,)
    assert torch.equal(sample[1], steered[10 + int(index[1])])


def test_steer_x0_while_the_gate_is_open_is_the_mean_shift():
    kds = KDS(num_particles=4, patch_size=2, bandwidth=0.7, strength=0.3, threshold=0.3)
    x = _x()
    expected = PatchMeanShift(2, 0.7)(x, 4, 0.3)
    assert torch.equal(kds.steer_x0(x, t_frac=0.5), expected)
    assert torch.equal(kds.steer_x0(x, t_frac=torch.tensor(0.3)), expected)
    assert not torch.equal(expected, x)


def test_steer_x0_returns_the_input_itself_when_nothing_steers():
    x = _x()
    assert KDS(num_particles=4).steer_x0(x, t_frac=0.29) is x  # gate closed
    assert KDS(num_particles=4, strength=0.0).steer_x0(x, t_frac=0.9) is x
    assert KDS(num_particles=1).steer_x0(x, t_frac=0.9) is x
    assert KDS(num_particles=4).steer_x0(x, t_frac=0.9, strength=0.0) is x
    assert KDS(num_particles=4, schedule=lambda t: 0.0).steer_x0(x, t_frac=0.9) is x


def test_steer_x0_maps_sigma_to_time():
    seen = []

    def sigma_to_t_frac(sigma):
        seen.append(sigma)
        return 0.9 if sigma > 1.0 else 0.1

    kds = KDS(num_particles=4, bandwidth=1.0, sigma_to_t_frac=sigma_to_t_frac)
    x = _x()
    assert torch.equal(kds.steer_x0(x, 5.0), PatchMeanShift(1, 1.0)(x, 4, 0.3))
    assert kds.steer_x0(x, 0.5) is x
    assert seen == [5.0, 0.5]
    # An explicit t/T wins over the map.
    assert kds.steer_x0(x, 5.0, t_frac=0.1) is x


def test_steer_x0_strength_override_needs_no_time():
    kds = KDS(num_particles=4, bandwidth=1.0)
    x = _x()
    assert torch.equal(kds.steer_x0(x, strength=0.6), PatchMeanShift(1, 1.0)(x, 4, 0.6))
    assert torch.equal(kds.steer_x0(x, t_frac=0.0, strength=0.6), PatchMeanShift(1, 1.0)(x, 4, 0.6))


def test_steer_x0_with_one_time_per_row():
    kds = KDS(num_particles=2, bandwidth=1.0, strength=0.5, threshold=0.5)
    x = _x(rows=6)
    t = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.7, 0.7])  # items 0 and 2 steered, item 1 not
    out = kds.steer_x0(x, t_frac=t)
    assert torch.equal(out[2:4], x[2:4])
    torch.testing.assert_close(out[:2], PatchMeanShift(1, 1.0)(x[:2], 2, 0.5))
    torch.testing.assert_close(out[4:], PatchMeanShift(1, 1.0)(x[4:], 2, 0.5))
    same = kds.steer_x0(x, t_frac=torch.full((6,), 0.9))
    assert torch.equal(same, PatchMeanShift(1, 1.0)(x, 2, 0.5))


def test_steer_x0_keeps_dtype_device_and_shape():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = _x(dtype=dtype)
        out = KDS(num_particles=4, bandwidth="auto").steer_x0(x, t_frac=0.9)
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda k, x: k.steer_x0(x), ValueError, "needs t/T"),
        (lambda k, x: k.steer_x0(x, 1.0), ValueError, "needs t/T"),
        (lambda k, x: k.steer_x0(x[:7], t_frac=0.1), ValueError, "batch size 7 is not divisible by num_particles=4"),
        (lambda k, x: k.steer_x0(x[:7], strength=0.0), ValueError, "not divisible"),
        (lambda k, x: k.steer_x0(x, t_frac=0.9, strength=1.2), ValueError, r"strength must lie in \[0, 1\]"),
        (lambda k, x: k.steer_x0(x, t_frac=torch.rand(3)), ValueError, "give one per row or one in all"),
        (lambda k, x: k.steer_x0(x, t_frac=torch.linspace(0, 1, 8)), ValueError, "same diffusion time"),
        (lambda k, x: k.steer_x0(x.masked_fill(x > 2, float("nan")), t_frac=0.9), ValueError, "NaN or Inf"),
        (lambda k, x: k.steer_x0(x.long(), t_frac=0.9), TypeError, "floating-point"),
        (lambda k, x: k.steer_x0(x[:0], t_frac=0.9), ValueError, "x is empty"),
        (lambda k, x: k.steer_x0(x.requires_grad_(), t_frac=0.9), ValueError, "x0 requires grad, but KDS steering"),
    ],
)
def test_steer_x0_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(KDS(num_particles=4), _x())


def test_gradients_are_refused_only_where_steering_happens():
    x = _x().requires_grad_()
    kds = KDS(num_particles=4, bandwidth=1.0)
    assert kds.steer_x0(x, t_frac=0.1) is x  # gate closed: nothing to differentiate through, nothing refused
    with torch.no_grad():
        assert torch.equal(kds.steer_x0(x, t_frac=0.9), PatchMeanShift(1, 1.0)(x.detach(), 4, 0.3))


def test_sigma_without_a_map_needs_sigma_or_time():
    kds = KDS(num_particles=4, sigma_to_t_frac=lambda s: 0.5)
    with pytest.raises(ValueError, match="needs sigma"):
        kds.steer_x0(_x())


def test_the_nan_check_can_be_turned_off():
    x = _x()
    x[0, 0, 0, 0] = float("nan")
    out = KDS(num_particles=4, bandwidth=1.0, check_finite=False).steer_x0(x, t_frac=0.9)
    # The NaN stays in its own item: item 1 is steered as on its own (to rounding: the batch differs), while one
    # ensemble of all eight rows would carry the NaN into it.
    pooled = PatchMeanShift(1, 1.0)(x, 8, 0.3, check_finite_values=False)
    assert_equal_to_rounding(out[4:], PatchMeanShift(1, 1.0)(x[4:], 4, 0.3), leaked=pooled[4:])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_particles": 0}, ValueError, "num_particles must be >= 1"),
        ({"num_particles": 2.5}, TypeError, "num_particles must be an int"),
        ({"bandwidth": -0.3}, ValueError, "bandwidth must be positive"),
        ({"bandwidth": float("nan")}, ValueError, "bandwidth must be positive"),
        ({"strength": -0.1}, ValueError, r"strength must lie in \[0, 1\]"),
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
        ({"selection": "best"}, ValueError, "unknown selection method 'best'"),
        ({"sigma_to_t_frac": 3}, TypeError, "sigma_to_t_frac must be a callable"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        KDS(**kwargs)


# ---------------------------------------------------------------- diagnostics


def test_history_records_every_call():
    kds = KDS(num_particles=4, bandwidth="auto", record=True)
    x = _x()
    kds.steer_x0(x, t_frac=0.9)
    kds.steer_x0(x, t_frac=0.1)
    kds.steer_x0(x, strength=0.5)
    first, closed, forced = kds.history
    assert isinstance(first, StepRecord)
    op = PatchMeanShift(1, "auto")
    op(x, 4, 0.3)
    assert (first.t_frac, first.strength) == (0.9, 0.3)
    assert first.self_weight == pytest.approx(op.last_self_weight)
    assert first.bandwidth == pytest.approx(float(op.last_bandwidth.mean()))
    assert 0.25 < first.self_weight < 1.0
    assert closed == StepRecord(0.1, 0.0, None, None)
    assert math.isnan(forced.t_frac) and forced.strength == 0.5
    kds.reset_history()
    assert kds.history == []


def test_no_history_unless_asked():
    kds = KDS(num_particles=4)
    kds.steer_x0(_x(), t_frac=0.9)
    assert kds.history == []


def test_self_weight_flags_a_bandwidth_that_does_nothing():
    # The diagnostic's purpose: h far below the particle spread -> self-weight 1 and nothing moves.
    x = _x()
    kds = KDS(num_particles=4, bandwidth=1e-4, record=True)
    assert torch.equal(kds.steer_x0(x, t_frac=0.9), x)
    assert kds.history[-1].self_weight == 1.0
    wide = KDS(num_particles=4, bandwidth=1e4, record=True)
    wide.steer_x0(x, t_frac=0.9)
    assert wide.history[-1].self_weight == pytest.approx(0.25, abs=1e-6)


# ---------------------------------------------------------------- selection (Eq. 9 and alternatives)


def _literal_selection(x: torch.Tensor, n: int, method: str):
    indices = []
    for item in range(x.shape[0] // n):
        ps = [x[item * n + k].double().reshape(-1) for k in range(n)]
        if method == "mean":
            mean = sum(ps) / n
            scores = [float((p - mean).square().sum()) for p in ps]
        else:  # medoid
            scores = [sum(float((p - q).norm()) for q in ps) for p in ps]
        indices.append(min(range(n), key=lambda k: scores[k]))
    return indices


@pytest.mark.parametrize("method", ["mean", "medoid"])
def test_selection_is_the_literal_rule(method):
    x = _x(rows=12, shape=(2, 3, 3), seed=4)
    chosen = select_particles(x, 4, method)
    assert chosen.index.tolist() == _literal_selection(x, 4, method)
    for item, k in enumerate(chosen.index.tolist()):
        assert torch.equal(chosen.sample[item], x[item * 4 + k])
    assert chosen.sample.shape == (3, 2, 3, 3)


def test_density_selection_is_the_highest_kde_density():
    x = _x(rows=12, shape=(2, 3, 3), seed=5)
    chosen = select_particles(x, 4, "density", patch_size=1, bandwidth=0.8)
    density = PatchMeanShift(1, 0.8).log_density(x, 4).reshape(3, 4)
    assert chosen.index.tolist() == density.argmax(dim=1).tolist()


def test_selection_averages_over_particles_not_pixels():
    # minKDS's flaw: it averaged over pixels, so each particle was compared with its own pixel mean (picking the
    # flattest particle). Here every particle is flat, so that rule sees a four-way tie, while Eq. 9 picks the
    # particle closest to the mean over particles. A second, far-away item must not change the first's choice.
    base = torch.tensor([3.0, -1.0, -1.5, 1.0]).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    x = torch.cat([base, base + 100.0])
    chosen = select_particles(x, 4, "mean")
    assert chosen.index.tolist() == [3, 3]  # mean over particles 0.375: particle 3 (1.0) is nearest
    pixel_rule = (base - base.mean(dim=(1, 2, 3), keepdim=True)).square().flatten(1).sum(1)
    assert int(pixel_rule.argmin()) == 0


def test_mean_selection_can_pick_a_particle_between_modes():
    # The documented hazard: a bimodal ensemble (two particles near -1, two near +1, one at 0). The particle
    # closest to the mean is the one between the modes; "density" picks a particle inside a mode.
    x = torch.tensor([[-1.0], [-1.05], [0.0], [1.0], [1.05]]).reshape(5, 1)
    assert int(select_particles(x, 5, "mean").index) == 2
    density = select_particles(x, 5, "density", bandwidth=0.2)
    assert int(density.index) in (0, 1, 3, 4)


def test_selection_ties_go_to_the_lowest_index_and_items_are_independent():
    x = torch.zeros(6, 2)
    for method in ("mean", "medoid", "density"):
        assert select_particles(x, 3, method).index.tolist() == [0, 0]
    y = _x(rows=8, shape=(2, 2), seed=9)
    alone = select_particles(y[:4], 4, "density").index
    together = select_particles(torch.cat([y[:4], 50 * y[4:]]), 4, "density").index
    assert together[0] == alone[0]


def test_kds_select_uses_its_configuration():
    x = _x(rows=8, seed=6)
    kds = KDS(num_particles=4, patch_size=2, bandwidth=0.9, selection="density")
    assert torch.equal(kds.select(x).index, select_particles(x, 4, "density", patch_size=2, bandwidth=0.9).index)
    assert torch.equal(kds.select(x, "medoid").index, select_particles(x, 4, "medoid").index)


@pytest.mark.parametrize(
    "x, n, method, error, match",
    [
        (torch.randn(7, 2), 2, "mean", ValueError, "not divisible"),
        (torch.randn(8, 2), 2, "closest", ValueError, "unknown selection method 'closest'"),
        (torch.full((8, 2), float("inf")), 2, "mean", ValueError, "NaN or Inf"),
        (torch.ones(8, 2, dtype=torch.int32), 2, "mean", TypeError, "floating-point"),
    ],
)
def test_selection_bad_input(x, n, method, error, match):
    with pytest.raises(error, match=match):
        select_particles(x, n, method)


@pytest.mark.parametrize("method", ["mean", "density", "medoid"])
def test_selection_checks_its_kernel_settings_for_every_method(method):
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        select_particles(x, 2, method, bandwidth=-1.0)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        select_particles(x, 2, method, patch_size=0)


# ---------------------------------------------------------------- from_minkds


def test_from_minkds_converts_the_squared_bandwidth():
    kds = KDS.from_minkds(band_width=0.3, patch_size=2, gamma_0=0.2, num_particles=5)
    assert kds.bandwidth == pytest.approx(0.09)
    assert (kds.patch_size, kds.gate.strength, kds.num_particles) == (2, 0.2, 5)
    # The conversion is exact: minKDS's kernel exp(-(||d|| / b^2)^2 / 2) is ours with h = b^2.
    d = torch.linspace(0, 1, 11, dtype=torch.float64)
    b = 0.3
    torch.testing.assert_close(torch.exp(-((d / b**2) ** 2) / 2), torch.exp(-(d**2) / (2 * kds.bandwidth**2)))


def _minkds_shift(x: torch.Tensor, band_width: float, patch_size: int) -> torch.Tensor:
    """minKDS's mean shift as docs/minkds.md describes it (one image, sizes divisible by the patch): the patch
    distance divided by band_width**2, then exp(-u**2 / 2); naive broadcasting, float64."""
    n, c, height, width = x.shape
    p = x.double().reshape(n, c, height // patch_size, patch_size, width // patch_size, patch_size)
    p = p.permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * patch_size**2)  # (N, L, D)
    u = (p.unsqueeze(1) - p.unsqueeze(0)).norm(dim=-1) / band_width**2  # (N, N, L)
    w = torch.exp(-(u**2) / 2)
    shift = torch.einsum("ikl,kld->ild", w, p) / w.sum(dim=1).unsqueeze(-1) - p
    shift = shift.reshape(n, height // patch_size, width // patch_size, c, patch_size, patch_size)
    return shift.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


@pytest.mark.parametrize("band_width, patch_size", [(0.6, 1), (1.5, 2), (2.5, 4)])
def test_from_minkds_reproduces_minkds_steering(band_width, patch_size):
    x = _x(rows=4, shape=(3, 8, 8), seed=2, dtype=torch.float64)
    kds = KDS.from_minkds(band_width=band_width, patch_size=patch_size, gamma_0=0.3, num_particles=4)
    expected = x + 0.3 * _minkds_shift(x, band_width, patch_size)
    assert (expected - x).abs().max() > 1e-2  # the case steers visibly
    torch.testing.assert_close(kds.steer_x0(x, t_frac=0.9), expected, rtol=0, atol=1e-12)
    # Taking band_width as h directly would be a different kernel.
    unconverted = KDS(num_particles=4, patch_size=patch_size, bandwidth=band_width).steer_x0(x, t_frac=0.9)
    assert (unconverted - expected).abs().max() > 1e-3


def test_from_minkds_defaults_and_switches():
    kds = KDS.from_minkds()
    assert (kds.num_particles, kds.patch_size, kds.bandwidth, kds.gate.strength) == (4, 4, 1.0, 0.1)
    off = KDS.from_minkds(use_KDE=False)
    x = _x()
    assert off.steer_x0(x, t_frac=0.9) is x
    forwarded = KDS.from_minkds(threshold=0.5, record=True)
    assert forwarded.gate.threshold == 0.5 and forwarded.record


def test_from_minkds_bad_input():
    with pytest.raises(ValueError, match='no "auto" band_width'):
        KDS.from_minkds(band_width="auto")
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        KDS.from_minkds(band_width=0.0)
    with pytest.raises(ValueError, match=r"band_width=1e-200 is too small: its square .* underflows to 0"):
        KDS.from_minkds(band_width=1e-200)
    with pytest.raises(ValueError, match="use_KDE=False switches steering off, but a schedule"):
        KDS.from_minkds(use_KDE=False, schedule=lambda t: 0.5)


# ---------------------------------------------------------------- KDS in a sampler, paired against plain sampling


def _euler(model, x: torch.Tensor, sigmas: torch.Tensor, kds=None) -> torch.Tensor:
    """Deterministic Euler in k-diffusion's VE convention, steering the x0 prediction when kds is given."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, sigma)
        if kds is not None:
            denoised = kds.steer_x0(denoised, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def test_kds_concentrates_the_ensemble_paired_over_seeds():
    # Same initial noise with and without KDS: the steered ensemble ends with a smaller spread around its
    # own modes (mean-shift is mode seeking), in every seed, and strength 0 is bit-identical to plain sampling.
    mixture = three_gaussians()
    sigmas = torch.cat([torch.linspace(8.0, 0.05, 12, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    sigmas[-1] = 0.0
    t_of = lambda s: float(s) / 8.0  # noqa: E731 -- a monotone sigma -> t/T map for this toy schedule
    n = 10
    differences = []
    for seed in range(5):
        noise = torch.randn(4 * n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 8.0
        plain = _euler(mixture, noise, sigmas)
        steered = _euler(mixture, noise, sigmas, KDS(num_particles=n, bandwidth=1.0, sigma_to_t_frac=t_of))
        off = _euler(mixture, noise, sigmas, KDS(num_particles=n, strength=0.0, sigma_to_t_frac=t_of))
        assert torch.equal(off, plain)
        spread = lambda x: x.reshape(4, n, 2).var(dim=1).sum(-1).mean()  # noqa: E731
        differences.append(float(spread(steered) - spread(plain)))
    diffs = torch.tensor(differences)
    assert bool((diffs < 0).all()), differences
    assert float(diffs.mean()) < -3 * float(diffs.std() / math.sqrt(len(diffs)))


# ---------------------------------------------------------------- the API reference


def test_api_reference_lists_every_public_name():
    import kds_hook
    import kds_hook.analytic
    import kds_hook.diffusers
    import kds_hook.k_diffusion

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for module in (kds_hook, kds_hook.analytic, kds_hook.diffusers, kds_hook.k_diffusion):
        heading = f"## `{module.__name__}`"
        assert heading in text, heading
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)", section, flags=re.M))
        missing = set(module.__all__) - listed
        assert not missing, f"{module.__name__}: {sorted(missing)} not in docs/api.md"


def test_readme_quickstart_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python") + 9)]
    exec(compile(code, "README.md#quickstart", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("torch.Size([2, 4, 64, 64]) tensor([")
