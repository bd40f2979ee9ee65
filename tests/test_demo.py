"""The demo's sampler, its paired experiments, and a quick run of `kds-hook demo` through the real CLI."""

import os
import shutil

import pytest
import torch

from kds_hook import KDS
from kds_hook.analytic import three_gaussians
from kds_hook.cli import main
from kds_hook.demo import OUTPUT_FILES
from kds_hook.demo.report import mean_se
from kds_hook.demo.restoration import run_restoration
from kds_hook.demo.sampler import ddim_sample, ddim_timesteps, ddpm_alphas_cumprod, x0_predictor_from_denoiser
from kds_hook.demo.toy import run_toy, toy_metrics

N = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def toy_setup(items=3, seed=0):
    mixture = three_gaussians()
    predict = x0_predictor_from_denoiser(mixture, ddpm_alphas_cumprod())
    noise = torch.randn(items * N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return mixture, predict, noise


@pytest.mark.parametrize(
    "kds",
    [KDS(num_particles=N, strength=0.0), KDS(num_particles=1), KDS(num_particles=N, threshold=1.01)],
    ids=["strength-0", "one-particle", "gate-never-open"],
)
def test_kds_that_does_nothing_is_bit_identical_to_plain_ddim(kds):
    _, predict, noise = toy_setup()
    plain = ddim_sample(predict, noise, num_steps=20)
    assert torch.equal(ddim_sample(predict, noise, num_steps=20, kds=kds), plain)


def test_sampler_matches_diffusers_ddim_step_for_step():
    """Our DDIM loop is diffusers' DDIMScheduler (eta=0, linear betas, leading spacing, alpha_T0 = 1)."""
    from diffusers import DDIMScheduler

    mixture, predict, noise = toy_setup()
    alphas = ddpm_alphas_cumprod()
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
        timestep_spacing="leading", steps_offset=0,
    )
    sched.set_timesteps(25)
    assert [int(t) for t in sched.timesteps] == ddim_timesteps(25)
    z = noise.clone()
    for t in sched.timesteps:
        a = alphas[int(t)]
        eps = (z - a.sqrt() * predict(z, int(t))) / (1 - a).sqrt()
        out = sched.step(eps, t, z, eta=0.0)
        z = out.prev_sample
    # diffusers keeps its schedule in float32: agreement to float32 precision.
    torch.testing.assert_close(ddim_sample(predict, noise, num_steps=25), out.pred_original_sample, rtol=0, atol=2e-4)


def test_steering_uses_the_paper_gate_with_t_over_T():
    _, predict, noise = toy_setup()
    kds = KDS(num_particles=N, record=True)
    ddim_sample(predict, noise, num_steps=10, kds=kds)
    assert [r.t_frac for r in kds.history] == [t / 1000 for t in ddim_timesteps(10)]
    assert [r.strength for r in kds.history] == [0.3 if t >= 300 else 0.0 for t in ddim_timesteps(10)]


def test_kds_concentrates_the_toy_samples_paired_over_seeds():
    """Figure 2: from the same noise, KDS lowers the distance to the nearest mode, also with the paper's gate."""
    result = run_toy(
        {"gated": {"bandwidth": 0.3}, "no gate": {"bandwidth": 0.3, "threshold": 0.0}},
        num_seeds=12, num_particles=20, num_steps=20,
    )
    plain = result.metrics["plain"]["distance"]
    for name in ("gated", "no gate"):
        mean, se = mean_se(result.metrics[name]["distance"] - plain)
        assert mean < -3 * se, (name, mean, se)
    assert result.metrics["no gate"]["distance"].mean() < result.metrics["gated"]["distance"].mean()


def test_toy_metrics_on_known_points():
    mixture = three_gaussians()
    # Two items of 2 particles: one exactly at modes 0 and 1, one at mode 0 and one between modes.
    x = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    m = toy_metrics(x, mixture, 2)
    torch.testing.assert_close(m["distance"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    # (0, 0) is 2 from its nearest mode, beyond 3 std = 1.5: half of item 1 lies between modes.
    torch.testing.assert_close(m["between"], torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(m["occupancy"], torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(m["occupancy_tv"][0], torch.tensor(0.5 * (0.0 + 0.2 + 0.2), dtype=torch.float64))


def test_kds_without_gate_improves_every_particle_on_the_exact_posterior_problem():
    result = run_restoration(
        {"no gate": {"bandwidth": 0.3, "threshold": 0.0}}, num_images=8, size=8, num_particles=8, num_steps=20
    )
    plain, kds = result.metrics["plain"], result.metrics["no gate"]
    for key in ("psnr_random", "psnr_worst", "log_density"):
        mean, se = mean_se(kds[key] - plain[key])
        assert mean > 3 * se, (key, mean, se)
    # The MMSE limit is the posterior mean: no sampler output beats it on average.
    assert result.references["posterior mean (MMSE)"]["psnr"].mean() > kds["psnr_average"].mean()


def test_quick_demo_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--out", str(out), "--quick"]) == 0
        assert torch.get_num_threads() == 2  # the demo runs on one thread and restores the caller's setting
    finally:
        torch.set_num_threads(1)
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    for figure in ("figure2.png", "restoration.png"):
        with open(out / figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", figure
    assert "![KDS minus plain sampling, paired](restoration.png)" in (out / "restoration.md").read_text()
    restoration = (out / "restoration.md").read_text()
    for row in ("| plain |", "| KDS h=0.3 |", "| KDS auto |", "*posterior mean (MMSE)*", "*posterior mode*", "KDS h=0.3 - plain"):
        assert row in restoration, row
    for column in ("PSNR random", "PSNR worst", "PSNR N-average", "PSNR closest-to-mean", "log-density", "low-density"):
        assert column in restoration, column
    figure2 = (out / "figure2.md").read_text()
    assert "| KDS h=0.3 - plain |" in figure2 and "mode occupancy (true 0.50 / 0.30 / 0.20)" in figure2
    assert (out / "README.md").read_text().startswith("# kds-hook demo\n\nRegenerate with `kds-hook demo --quick`")
    printed = capsys.readouterr().out
    assert "part 2 (restoration" in printed and "| plain |" in printed  # progress and tables on stdout
    # It ends by listing every file it wrote, each with what it holds.
    listing = printed.rstrip("\n").split("\n")[-len(OUTPUT_FILES) - 2:]
    assert listing[0].endswith(f"done: wrote {len(OUTPUT_FILES) + 1} files into {out}")
    assert [line.split()[0] for line in listing[1:]] == list(OUTPUT_FILES) + [".kds-hook-demo"]
    assert all(len(line.split()) > 2 for line in listing[1:])
    # Its own, unchanged outputs are replaced on a second run.
    assert main(["demo", "--out", str(out), "--quick"]) == 0


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """One quick demo run; tests copy its folder rather than rerun it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def test_demo_refuses_to_overwrite_files_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "data.csv").write_text("1,2")
    with pytest.raises(SystemExit, match="README.md"):
        main(["demo", "--out", str(out), "--quick"])
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(out)) == ["README.md", "data.csv"]  # nothing written, not even the marker
    assert main(["demo", "--out", str(out), "--quick", "--force"]) == 0
    assert (out / "README.md").read_text().startswith("# kds-hook demo")
    assert (out / "data.csv").read_text() == "1,2"  # files with other names are never touched
    file_path = tmp_path / "a-file"
    file_path.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        main(["demo", "--out", str(file_path), "--quick"])
    assert file_path.read_text() == "x"


def test_demo_keeps_its_own_outputs_once_the_user_edited_them(tmp_path, demo_folder):
    out = tmp_path / "demo"
    shutil.copytree(demo_folder, out)
    (out / "restoration.md").write_text("annotated by hand")
    with pytest.raises(SystemExit, match="restoration.md"):
        main(["demo", "--out", str(out), "--quick"])
    assert (out / "restoration.md").read_text() == "annotated by hand"


def test_demo_refuses_a_marker_it_did_not_write(tmp_path, demo_folder):
    out = tmp_path / "demo"
    shutil.copytree(demo_folder, out)
    (out / ".kds-hook-demo").write_text("someone else's file")
    with pytest.raises(SystemExit, match="kds-hook-demo"):
        main(["demo", "--out", str(out), "--quick"])
    assert (out / ".kds-hook-demo").read_text() == "someone else's file"


def test_demo_writes_nothing_when_it_fails(tmp_path, monkeypatch):
    import kds_hook.demo.restoration as restoration

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(restoration, "run_restoration", broken)
    out = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="boom"):
        main(["demo", "--out", str(out), "--quick"])
    assert os.listdir(out) == []


def test_each_figure_reads_on_its_own(monkeypatch):
    """Axis labels, a legend for every mark, and a caption that says what the gate and the points mean."""
    import io

    import matplotlib.figure

    from kds_hook.demo.restoration import plot_restoration
    from kds_hook.demo.toy import plot_toy

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    toy = run_toy({"KDS h=0.3": {"bandwidth": 0.3}, "KDS h=0.3, no gate": {"bandwidth": 0.3, "threshold": 0.0}},
                  num_seeds=2, num_particles=4, num_steps=4)
    plot_toy(toy, ["KDS h=0.3", "KDS h=0.3, no gate"], io.BytesIO(), num_steps=4)
    restoration = run_restoration({"KDS h=0.3": {"bandwidth": 0.3}}, num_images=2, size=2, num_particles=3,
                                  num_steps=4)
    plot_restoration(restoration, io.BytesIO(), num_steps=4, size=2)
    figure2, figure_restoration = saved

    axes = figure2.axes
    assert [ax.get_xlabel() for ax in axes] == ["$x_1$"] * 3 and axes[0].get_ylabel() == "$x_2$"
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("plain DDIM") and "steered while t/T ≥ 0.3" in titles[1]
    assert "no gate: steered at every step" in titles[2]
    legend = [text.get_text() for text in figure2.legends[0].get_texts()]
    assert legend == ["final sample, plain DDIM", "final sample, DDIM + KDS", "mode centre (component mean)",
                      "true density (contour lines)"]
    caption = " ".join(text.get_text() for text in figure2.texts).replace("\n", " ")
    assert "DDIM (4 steps" in caption and "2 ensembles of N = 4" in caption and '"no gate" steers' in caption

    gain, density = figure_restoration.axes
    assert gain.get_ylabel() == "PSNR, KDS minus plain (dB)" and density.get_ylabel().startswith("log-density")
    assert all("no gate" in ax.get_xlabel() for ax in (gain, density))
    assert [t.get_text() for t in gain.get_legend().get_texts()] == [
        "a random particle", "the worst of the N particles", "the output (particle closest to the mean)"
    ]
    caption = " ".join(text.get_text() for text in figure_restoration.texts).replace("\n", " ")
    assert "above 0 = KDS better" in caption and "N = 3 particles" in caption
