"""Particles spread over a torch.distributed process group (gloo on CPU, spawned ranks) against one process.

Spawned runs are few and each does many checks (starting a rank costs seconds on a busy 2-core machine): one run
at W = 2 and one at W = 3 compute steering, selection and whole samplers on their shares and return them; the
parent compares with the single-process results. Failure runs check that a mismatch or a failing rank raises on
every rank and that nothing hangs. Every spawned run is bounded by a deadline, after which its ranks are killed
and the test fails.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

from kds_hook import KDS, PatchMeanShift
from kds_hook import distributed as kds_distributed
from kds_hook.analytic import three_gaussians
from kds_hook.distributed import particle_generators, particle_noise, particle_seed, particle_seeds, particle_share
from rounding import assert_equal_to_rounding

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch builds without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# torchsde warns when k-diffusion's float32 sigma_max is compared with its float64 copy; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Should have tb<=t1")

RUN_DEADLINE_S = 120  # a spawned run that has not finished by then is a hang: its ranks are killed
STEER_CASES = [  # (items, N, patch, bandwidth, per-particle shape, dtype)
    (1, 5, 1, 0.8, (3, 6, 5), torch.float64),
    (3, 5, 2, 0.8, (3, 6, 5), torch.float64),
    (2, 7, 1, "auto", (4, 5, 6), torch.float64),
    (2, 7, 2, "auto", (4, 5, 6), torch.float64),
    (2, 5, 2, "auto", (16, 4, 4), torch.float32),  # D = 64: the matmul layout
    (2, 6, (2, 1), 1.5, (2, 5, 4), torch.float32),
    (2, 4, 1, "auto", (6,), torch.float64),  # (B*N, D): one patch per particle
]
SELECT_METHODS = ("mean", "medoid", "density")


# ----------------------------------------------------------------------------------------------- the harness


def _rank_entry(rank: int, world_size: int, folder: str, scenario: str, pg_timeout_s: float) -> None:
    """A spawned rank: joins the gloo group, runs ``scenario``, writes what it returned (or raised) to a file."""
    torch.set_num_threads(1)
    outcome: Dict[str, Any]
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        started = time.perf_counter()
        try:
            outcome = {"result": SCENARIOS[scenario](rank, world_size, folder)}
        except Exception as error:  # reported to the parent, which asserts on it
            outcome = {"error": type(error).__name__, "message": str(error), "trace": traceback.format_exc()}
        outcome["seconds"] = time.perf_counter() - started
    except Exception as error:  # the group itself failed to form
        outcome = {"error": type(error).__name__, "message": str(error), "trace": traceback.format_exc()}
    torch.save(outcome, os.path.join(folder, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(scenario: str, world_size: int, tmp_path: Path, pg_timeout_s: float = 60.0) -> List[Dict[str, Any]]:
    """Runs ``scenario`` on ``world_size`` spawned ranks; returns each rank's outcome. Fails on a hang."""
    context = multiprocessing.get_context("spawn")
    folder = str(tmp_path)
    processes = [
        context.Process(target=_rank_entry, args=(rank, world_size, folder, scenario, pg_timeout_s))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + RUN_DEADLINE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    assert not hung, f"ranks {hung} of {scenario!r} still running after {RUN_DEADLINE_S} s: a hang"
    outcomes = []
    for rank in range(world_size):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} of {scenario!r} wrote no outcome (exit code {processes[rank].exitcode})"
        outcomes.append(torch.load(path, weights_only=False))
    return outcomes


def results(outcomes: List[Dict[str, Any]]) -> List[Any]:
    for rank, outcome in enumerate(outcomes):
        assert "error" not in outcome, f"rank {rank}: {outcome.get('trace', outcome)}"
    return [outcome["result"] for outcome in outcomes]


def _world() -> Any:
    return dist.group.WORLD


def _ensemble(items: int, n: int, shape, dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn((items * n,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rows(x: torch.Tensor, n: int, offset: int, count: int) -> torch.Tensor:
    """Particles offset..offset+count-1 of every item of a (B*N, ...) batch."""
    return x.reshape(-1, n, *x.shape[1:])[:, offset : offset + count].reshape(-1, *x.shape[1:])


class CountCollectives:
    """Counts the collectives of kds_hook.distributed while active (it calls them through two functions)."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.saved = kds_distributed._all_gather_single, kds_distributed._all_reduce_sum

        def counted(function):
            def call(*args, **kwargs):
                self.calls += 1
                return function(*args, **kwargs)

            return call

        kds_distributed._all_gather_single = counted(self.saved[0])
        kds_distributed._all_reduce_sum = counted(self.saved[1])
        return self

    def __exit__(self, *exc):
        kds_distributed._all_gather_single, kds_distributed._all_reduce_sum = self.saved


# ------------------------------------------------------------------------------------- what the ranks compute


def _steer_cases(rank: int, world_size: int) -> List[Dict[str, Any]]:
    out = []
    for index, (items, n, patch, bandwidth, shape, dtype) in enumerate(STEER_CASES):
        x = _ensemble(items, n, shape, dtype, seed=index)
        kds = KDS(n, patch, bandwidth, strength=0.6, threshold=0.5, record=True, process_group=_world())
        offset, count = kds.particle_share
        local = _rows(x, n, offset, count)
        quiet = KDS(n, patch, bandwidth, strength=0.6, threshold=0.5, process_group=_world())  # no record
        with CountCollectives() as shut:
            same = quiet.steer_x0(local, t_frac=0.2)  # gate shut
        with CountCollectives() as open_:
            quiet.steer_x0(local, t_frac=0.9)
        kds.steer_x0(local, t_frac=0.2)
        steered = kds.steer_x0(local, t_frac=0.9)
        per_item_t = torch.linspace(0.2, 0.9, items).repeat_interleave(count)  # one t/T per item
        per_item = kds.steer_x0(local, t_frac=per_item_t)
        selections = {method: kds.select(steered, method) for method in SELECT_METHODS}
        out.append({
            "share": (offset, count), "identity": same is local, "shut_collectives": shut.calls,
            "open_collectives": open_.calls, "steered": steered, "per_item": per_item, "selections": selections,
            "history": kds.history,
        })
    return out


def _pixel_mixture(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
    """The exact denoiser of the paper's 2-D three-Gaussian mixture, applied to every pixel's channel pair."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    sigma = torch.as_tensor(sigma).reshape(-1)
    if sigma.numel() > 1:
        sigma = sigma.repeat_interleave(rows.shape[0] // x.shape[0])
    return three_gaussians().denoise(rows, sigma).reshape(x.movedim(1, -1).shape).movedim(-1, 1)


SAMPLER_ITEMS, SAMPLER_N, SAMPLER_SHAPE, SAMPLER_SEED = 2, 5, (2, 3, 3), 11


def _samplers(kds: KDS) -> Dict[str, Any]:
    """dpmpp_2m (deterministic) and euler_ancestral (noise at every step from per-particle generators) through
    kds_hook.k_diffusion.sample, with the initial noise from per-particle seeds: the same whatever W."""
    from kdiffusion_loader import load_k_diffusion

    from kds_hook.k_diffusion import KDSDenoiser, sample

    kd = load_k_diffusion()
    sigmas = kd.sampling.get_sigmas_karras(6, 0.05, 8.0, device="cpu").double()
    model = KDSDenoiser(_pixel_mixture, kds, sigma_threshold=0.5)
    out = {}
    for name in ("sample_dpmpp_2m", "sample_euler_ancestral"):
        generators = particle_generators(SAMPLER_SEED, SAMPLER_ITEMS, kds)
        x = particle_noise(generators, SAMPLER_SHAPE, dtype=torch.float64) * sigmas[0]
        kwargs = {}
        if name == "sample_euler_ancestral":
            kwargs["noise_sampler"] = lambda sigma, sigma_next: particle_noise(
                generators, SAMPLER_SHAPE, dtype=torch.float64
            )
        result = sample(getattr(kd.sampling, name), model, x, sigmas, kds, return_all=True, disable=True, **kwargs)
        out[name] = {"sample": result.sample, "index": result.index, "particles": result.particles}
    return out


PIPELINE_PROMPTS, PIPELINE_N, PIPELINE_SEED = ["a red cube", "a blue sphere"], 5, 3


def _pipeline_runs(kds: KDS) -> Dict[str, Any]:
    """A tiny Stable Diffusion pipeline through kds_hook.diffusers.run, per-particle generators, decoded ("pt")
    and as latents; plus what run() refuses over a process group."""
    from kds_hook.diffusers import run
    from kds_hook.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("text2img")
    pipe.set_progress_bar_config(disable=True)
    items = len(PIPELINE_PROMPTS)
    out = {}
    for output_type in ("pt", "latent"):
        result = run(pipe, kds, prompt=PIPELINE_PROMPTS, height=32, width=32, num_inference_steps=4,
                     generator=particle_generators(PIPELINE_SEED, items, kds), output_type=output_type)
        out[output_type] = {"images": result.images, "latents": result.latents, "index": result.index}
    if kds.world_size > 1:
        out["refused"] = [
            _message_of(lambda: run(pipe, kds, prompt=PIPELINE_PROMPTS, num_inference_steps=2,
                                    generator=torch.Generator().manual_seed(0))),
            _message_of(lambda: run(pipe, kds, prompt=PIPELINE_PROMPTS, num_inference_steps=2, return_particles=True,
                                    generator=particle_generators(0, items, kds))),
        ]
    return out


def _upscale_under_torchrun(folder: Path, rank: int, world_size: int) -> Dict[str, Any]:
    """``kds-hook upscale`` as torchrun runs it (rank and world size in the environment; the group this process
    already joined serves as torchrun's), on a tiny saved LDM-SR model; its exit code and output."""
    import contextlib
    import io

    import numpy as np
    from PIL import Image

    from kds_hook.cli import main
    from kds_hook.testing import tiny_ldm_sr_pipeline

    model = folder / f"sr{rank}"  # each rank its own copy: the same deterministic weights
    tiny_ldm_sr_pipeline().save_pretrained(model)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(folder / "in.png")
    (folder / "out").mkdir(exist_ok=True)
    argv = ["upscale", folder / "in.png", "-o", folder / "out" / "out.png", "--model", model, "--particles", "5",
            "--steps", "4", "--seed", "3", "--device", "cpu"]
    saved = dict(os.environ)
    os.environ.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank)})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _pipeline_kds(process_group=None) -> KDS:
    return KDS(PIPELINE_N, bandwidth="auto", strength=0.5, threshold=0.0, process_group=process_group)


def _sampler_kds(process_group=None) -> KDS:
    return KDS(SAMPLER_N, bandwidth="auto", strength=0.5, process_group=process_group)


def _mismatches(rank: int, world_size: int) -> Dict[str, Any]:
    """One KDS per kind of disagreement; each call must raise on every rank, and the group stays usable."""
    shape = (2, 4, 4)
    different = {
        "num_particles": dict(num_particles=4 + rank),
        "patch_size": dict(patch_size=1 + rank),
        "bandwidth": dict(bandwidth="auto" if rank == 0 else 0.5),
        "strength": dict(strength=0.3 + 0.1 * rank),
        "threshold": dict(threshold=0.3 + 0.1 * rank),
        "schedule given": dict(schedule=(lambda t: 0.3) if rank == 0 else None, threshold=0.0),
    }
    errors = {}
    for name, settings in different.items():
        kds = KDS(**{"num_particles": 4, **settings, "process_group": _world()})
        x = _ensemble(2, kds.local_particles, shape, torch.float32, seed=rank)
        errors[name] = _message_of(lambda: kds.steer_x0(x, t_frac=0.9))
    kds = KDS(4, process_group=_world())
    n = kds.local_particles
    inputs = {
        "items": _ensemble(2 + rank, n, shape, torch.float32),
        "dtype": _ensemble(2, n, shape, torch.float32 if rank == 0 else torch.float64),
        "particle shape": _ensemble(2, n, (2, 4, 4 + rank), torch.float32),
        "t/T": _ensemble(2, n, shape, torch.float32),
    }
    for name, x in inputs.items():
        t_frac = 0.9 + 0.05 * rank if name == "t/T" else 0.9
        errors[name] = _message_of(lambda: kds.steer_x0(x, t_frac=t_frac))
    nan = _ensemble(2, n, shape, torch.float32)
    if rank == world_size - 1:
        nan[0, 0, 0, 0] = float("nan")
    errors["nan"] = _message_of(lambda: kds.steer_x0(nan, t_frac=0.9))
    wrong_rows = _ensemble(2, n, shape, torch.float32)[: 2 * n - (rank == 0)]
    errors["rows"] = _message_of(lambda: kds.steer_x0(wrong_rows, t_frac=0.9))
    final = _ensemble(2, n, shape, torch.float32)
    errors["selection method"] = _message_of(lambda: kds.select(final, "mean" if rank == 0 else "medoid"))
    # After all that the group still works: a matching call goes through on every rank.
    errors["after"] = tuple(kds.steer_x0(final, t_frac=0.9).shape)
    return errors


def _message_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def _scenario_main(rank: int, world_size: int, folder: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"steer": _steer_cases(rank, world_size), "folder": folder}
    out["samplers"] = _samplers(_sampler_kds(_world()))
    if world_size == 2:
        out["pipeline"] = _pipeline_runs(_pipeline_kds(_world()))
        dist.barrier()  # rank 0 writes in.png: the others read it after this
        out["upscale"] = _upscale_under_torchrun(Path(folder), rank, world_size)
        out["upscale_files"] = sorted(os.listdir(Path(folder) / "out"))
    out["mismatch"] = _mismatches(rank, world_size)
    try:
        KDS(world_size - 1, process_group=_world())
    except ValueError as error:
        out["too_few"] = str(error)
    return out


def _scenario_rank_fails(rank: int, world_size: int, folder: str) -> Any:
    """The last rank's model raises at the third evaluation and that rank's process ends; the others block in
    the next steered call's collective, which must fail, not hang."""
    kds = _sampler_kds(_world())
    calls = {"n": 0}

    def model(x, sigma, **_):
        calls["n"] += 1
        if rank == world_size - 1 and calls["n"] == 3:
            raise RuntimeError("the model failed on this rank")
        return _pixel_mixture(x, sigma)

    from kdiffusion_loader import load_k_diffusion

    from kds_hook.k_diffusion import KDSDenoiser, sample

    kd = load_k_diffusion()
    sigmas = kd.sampling.get_sigmas_karras(6, 0.05, 8.0, device="cpu").double()
    x = particle_noise(particle_generators(0, 1, kds), SAMPLER_SHAPE, dtype=torch.float64) * sigmas[0]
    return sample(kd.sampling.sample_euler, KDSDenoiser(model, kds, sigma_threshold=0.0), x, sigmas, kds, disable=True)


def _scenario_rank_stalls(rank: int, world_size: int, folder: str) -> Any:
    """Rank 1 raises before steering but its process stays alive (stuck elsewhere) until rank 0 has reported:
    rank 0 must give up after the process group's timeout."""
    kds = KDS(4, process_group=_world())
    x = _ensemble(1, kds.local_particles, (2, 4, 4), torch.float32)
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(folder, "rank0.pt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        raise RuntimeError("rank 1 stalled")
    return kds.steer_x0(x, t_frac=0.9)


SCENARIOS: Dict[str, Callable[[int, int, str], Any]] = {
    "main": _scenario_main,
    "rank_fails": _scenario_rank_fails,
    "rank_stalls": _scenario_rank_stalls,
}


# ------------------------------------------------------------------------------------------ spawned: the checks


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def main_run(request, tmp_path_factory):
    world_size = request.param
    return world_size, results(run_ranks("main", world_size, tmp_path_factory.mktemp(f"main{world_size}")))


def test_steer_x0_over_ranks_equals_one_process(main_run):
    world_size, per_rank = main_run
    for index, (items, n, patch, bandwidth, shape, dtype) in enumerate(STEER_CASES):
        x = _ensemble(items, n, shape, dtype, seed=index)
        single = KDS(n, patch, bandwidth, strength=0.6, threshold=0.5, record=True)
        assert single.steer_x0(x, t_frac=0.2) is x  # the ranks' calls, in the same order
        expected = single.steer_x0(x, t_frac=0.9)
        expected_per_item = single.steer_x0(x, t_frac=torch.linspace(0.2, 0.9, items).repeat_interleave(n))
        shares = [rank_out["steer"][index]["share"] for rank_out in per_rank]
        assert shares == [tuple(particle_share(n, world_size, r)) for r in range(world_size)]
        steered = torch.cat([r["steer"][index]["steered"].reshape(items, -1, *shape) for r in per_rank], dim=1)
        per_item = torch.cat([r["steer"][index]["per_item"].reshape(items, -1, *shape) for r in per_rank], dim=1)
        tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=2e-6)
        torch.testing.assert_close(steered.reshape(x.shape), expected, **tol)
        torch.testing.assert_close(per_item.reshape(x.shape), expected_per_item, **tol)
        # The tolerance would catch a real difference: steering moves particles far more than it allows.
        assert (expected - x).abs().max() > 1e3 * tol["atol"]
        for rank_out in per_rank:
            case = rank_out["steer"][index]
            assert case["identity"] and case["shut_collectives"] == 0  # a shut gate moves nothing
            assert case["open_collectives"] == 2  # the fingerprint, then the particles
            # The history is the whole ensemble's, whatever the rank: self-weights over all N, the same h.
            assert len(case["history"]) == len(single.history) == 3
            for got, want in zip(case["history"], single.history):
                assert (got.t_frac, got.strength) == (want.t_frac, want.strength)
                if want.self_weight is None:
                    assert got.self_weight is None
                else:
                    assert math.isclose(got.self_weight, want.self_weight, rel_tol=1e-6)
                    assert math.isclose(got.bandwidth, want.bandwidth, rel_tol=1e-6)


def test_selection_is_the_single_process_one_on_every_rank(main_run):
    world_size, per_rank = main_run
    for index, (items, n, patch, bandwidth, shape, dtype) in enumerate(STEER_CASES):
        steered = torch.cat(
            [r["steer"][index]["steered"].reshape(items, -1, *shape) for r in per_rank], dim=1
        ).reshape(items * n, *shape)
        single = KDS(n, patch, bandwidth)
        for method in SELECT_METHODS:
            expected = single.select(steered, method)
            for rank_out in per_rank:
                chosen = rank_out["steer"][index]["selections"][method]
                assert torch.equal(chosen.index, expected.index), (index, method)
                assert torch.equal(chosen.sample, expected.sample)  # delivered bit for bit to every rank


def test_k_diffusion_sample_is_the_same_whatever_the_world_size(main_run):
    world_size, per_rank = main_run
    single = _samplers(_sampler_kds())  # W = 1, the same per-particle seeds
    for name, expected in single.items():
        particles = torch.cat(
            [r["samplers"][name]["particles"].reshape(SAMPLER_ITEMS, -1, *SAMPLER_SHAPE) for r in per_rank], dim=1
        ).reshape(expected["particles"].shape)
        torch.testing.assert_close(particles, expected["particles"], rtol=0, atol=1e-10)
        for rank_out in per_rank:
            assert torch.equal(rank_out["samplers"][name]["index"], expected["index"])
            torch.testing.assert_close(rank_out["samplers"][name]["sample"], expected["sample"], rtol=0, atol=1e-10)
    # KDS did act: the steered particles are not those of the plain sampler from the same noise.
    plain = _samplers(KDS(SAMPLER_N, strength=0.0))
    assert (plain["sample_dpmpp_2m"]["particles"] - single["sample_dpmpp_2m"]["particles"]).abs().max() > 1e-3


def test_diffusers_run_gives_the_single_process_output_on_every_rank(main_run):
    world_size, per_rank = main_run
    if world_size != 2:
        pytest.skip("run() is checked at W = 2 (each rank builds a pipeline: seconds on a busy machine)")
    expected = _pipeline_runs(_pipeline_kds())
    plain = _pipeline_runs(KDS(PIPELINE_N, strength=0.0))  # KDS must act: the check's "leak"
    assert not dist.is_initialized()  # the parent computes alone
    for rank_out in per_rank:  # every rank returns the whole selected output
        got = rank_out["pipeline"]
        for output_type in ("pt", "latent"):
            assert torch.equal(got[output_type]["index"], expected[output_type]["index"])
            for name in ("latents", "images"):  # the UNet ran on 5 rows instead of 10: equal to rounding
                assert_equal_to_rounding(got[output_type][name], expected[output_type][name],
                                         leaked=plain[output_type][name])
        one_generator, particles = got["refused"]
        assert "particle_generators" in one_generator and "return_particles" in particles


def test_kds_hook_upscale_under_torchrun_writes_once_and_does_not_depend_on_the_world_size(
    main_run, tmp_path, monkeypatch
):
    import socket

    import numpy as np
    from PIL import Image

    world_size, per_rank = main_run
    if world_size != 2:
        pytest.skip("checked at W = 2")
    runs = [r["upscale"] for r in per_rank]
    assert [run["code"] for run in runs] == [0, 0], [run["stderr"] for run in runs]
    assert per_rank[0]["upscale_files"] == ["out.png"]  # written once (a second write would have failed)
    assert "upscaled" in runs[0]["stdout"] and "selected particle" in runs[0]["stdout"]
    assert runs[1]["stdout"] == runs[1]["stderr"] == ""  # the other rank prints nothing
    # torchrun with one process, here: the same particles, so the same pick and (to 8-bit rounding) image.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        alone = _upscale_under_torchrun(tmp_path, 0, 1)  # joins a group of one in this process
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert alone["code"] == 0, alone["stderr"]
    picks = [re.search(r"selected particle (\d+)", run["stdout"]).group(1) for run in (alone, runs[0])]
    assert picks[0] == picks[1]
    folder = Path(per_rank[0]["folder"])
    one, two = (np.asarray(Image.open(f / "out" / "out.png")).astype(int) for f in (tmp_path, folder))
    assert np.abs(one - two).max() <= 1


def test_mismatched_settings_raise_the_same_error_on_every_rank(main_run):
    world_size, per_rank = main_run
    errors = [r["mismatch"] for r in per_rank]
    for name in errors[0]:
        if name == "after":
            continue
        messages = {e[name] for e in errors}
        assert len(messages) == 1, (name, messages)  # the very same error everywhere
        message = messages.pop()
        if name == "nan":
            assert f"failed on rank(s) {world_size - 1}" in message and "NaN or Inf" in message
        elif name == "rows":
            assert "failed on rank(s) 0" in message and "share of particles" in message
        else:
            assert "differ across the ranks" in message and f"\n  {name}: rank 0 = " in message, (name, message)
    assert all(e["after"] == (2 * particle_share(4, world_size, r).count, 2, 4, 4) for r, e in enumerate(errors))
    assert all("no particle" in r["too_few"] or "at least one" in r["too_few"] for r in per_rank)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    started = time.monotonic()
    outcomes = run_ranks("rank_fails", 2, tmp_path, pg_timeout_s=20)
    assert outcomes[1]["error"] == "RuntimeError" and "the model failed" in outcomes[1]["message"]
    # Rank 0 waited in the next steered call's settings check and learnt that rank 1 had gone.
    assert outcomes[0]["error"] == "RuntimeError"
    assert "KDS: the settings check" in outcomes[0]["message"] and "another rank stopped" in outcomes[0]["message"]
    assert time.monotonic() - started < RUN_DEADLINE_S


def test_a_stalled_rank_times_out_the_others(tmp_path):
    outcomes = run_ranks("rank_stalls", 2, tmp_path, pg_timeout_s=3)
    assert outcomes[0]["error"] == "RuntimeError" and "timeout" in outcomes[0]["message"].lower()
    assert 2.5 < outcomes[0]["seconds"] < 30  # after the process group's timeout, not never
    assert outcomes[1]["message"] == "rank 1 stalled"


# ---------------------------------------------------------------------------------------- in one process


def test_shares_cover_the_particles_in_order():
    for n in range(1, 12):
        for world_size in range(1, n + 1):
            shares = [particle_share(n, world_size, r) for r in range(world_size)]
            assert [s.count for s in shares] == [n // world_size + (r < n % world_size) for r in range(world_size)]
            assert [s.offset for s in shares] == [sum(s.count for s in shares[:r]) for r in range(world_size)]
            assert shares[-1].offset + shares[-1].count == n
    with pytest.raises(ValueError, match="at least one particle"):
        particle_share(2, 3, 0)
    with pytest.raises(ValueError, match="not in a group"):
        particle_share(4, 2, 2)
    with pytest.raises(TypeError):
        particle_share(4.0, 2, 0)


@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "elementwise"])
@pytest.mark.parametrize("bandwidth", [0.8, "auto"])
@pytest.mark.parametrize("patch", [1, 2, (3, 2)])
def test_particle_range_gives_the_rows_of_the_full_result(monkeypatch, matmul, bandwidth, patch):
    import kds_hook.meanshift as meanshift_module

    monkeypatch.setattr(meanshift_module, "_use_matmul", lambda n, dim: matmul)
    n, items, shape = 7, 2, (3, 7, 5)
    x = _ensemble(items, n, shape, torch.float64, seed=3)
    op = PatchMeanShift(patch, bandwidth)
    strength = torch.tensor([0.3, 0.8], dtype=torch.float64)
    full, full_shift, full_density = op(x, n, strength), op.shift(x, n), op.log_density(x, n)
    full_h = op.last_bandwidth
    for start, stop in [(0, 1), (0, 3), (2, 5), (6, 7), (0, 7)]:
        count = stop - start
        torch.testing.assert_close(op(x, n, strength, particle_range=(start, stop)), _rows(full, n, start, count),
                                   rtol=0, atol=1e-13)
        assert torch.equal(op.last_bandwidth, full_h)  # "auto": the whole ensemble's h, exactly
        torch.testing.assert_close(op.shift(x, n, particle_range=(start, stop)), _rows(full_shift, n, start, count),
                                   rtol=0, atol=1e-13)
        density = op.log_density(x, n, particle_range=(start, stop))
        torch.testing.assert_close(density, full_density.reshape(items, n)[:, start:stop].reshape(-1), rtol=1e-12,
                                   atol=1e-12)
    assert (full - x).abs().max() > 1e-3  # something to compare
    assert op(x, n, 0.0, particle_range=(2, 4)).shape == (items * 2,) + shape


def test_particle_range_needs_no_full_maps_with_a_fixed_bandwidth():
    """Rows only: the largest intermediate is bounded by x or the (B, L, n, N) maps, not (B, L, N, N)."""
    from test_meanshift import _LargestTensor as Largest  # the guard of the single-process test

    n, items, rows = 16, 2, (4, 8)
    x = _ensemble(items, n, (2, 6, 6), torch.float32)
    locations = 36
    with Largest() as seen:
        PatchMeanShift(1, 0.8)(x, n, 0.5, particle_range=rows)
    assert seen.largest <= max(x.numel(), items * locations * 4 * n) < items * locations * n * n
    with Largest() as seen:  # the check can fail: "auto" needs every pair's distance
        PatchMeanShift(1, "auto")(x, n, 0.5, particle_range=rows)
    assert seen.largest >= items * locations * n * n


def test_particle_range_is_checked():
    x = _ensemble(1, 4, (2, 3, 3), torch.float32)
    op = PatchMeanShift()
    for bad in [(0, 0), (3, 2), (0, 5), (-1, 2)]:
        with pytest.raises(ValueError, match="particle_range"):
            op(x, 4, 0.3, particle_range=bad)
    with pytest.raises(TypeError, match="particle_range"):
        op(x, 4, 0.3, particle_range=(0.0, 2))
    with pytest.raises(TypeError, match="pair"):
        op.shift(x, 4, particle_range=3)


def test_particle_seeds_are_per_item_and_particle():
    assert particle_seed(1, 2, 3) == particle_seed(1, 2, 3)
    seeds = {particle_seed(seed, item, k) for seed in range(3) for item in range(3) for k in range(10)}
    assert len(seeds) == 90  # no two (seed, item, particle) share a stream
    kds = KDS(4)
    assert particle_seeds(5, 2, kds) == [particle_seed(5, b, k) for b in range(2) for k in range(4)]
    assert particle_seeds(5, 1, kds, first_item=1) == particle_seeds(5, 2, kds)[4:]
    noise = particle_noise(particle_generators(5, 2, kds), (3, 2))
    again = particle_noise(particle_generators(5, 2, kds), (3, 2))
    assert noise.shape == (8, 3, 2) and torch.equal(noise, again)
    row = torch.randn((3, 2), generator=torch.Generator().manual_seed(particle_seed(5, 1, 2)))
    assert torch.equal(noise[4 + 2], row)
    with pytest.raises(TypeError, match="KDS"):
        particle_seeds(5, 2, 4)
    with pytest.raises(ValueError, match="num_items"):
        particle_seeds(5, 0, kds)


def test_kds_refuses_what_is_not_a_process_group():
    with pytest.raises(TypeError, match="ProcessGroup"):
        KDS(4, process_group="world")
    kds = KDS(4)
    assert (kds.particle_share, kds.local_particles, kds.world_size, kds.rank) == ((0, 4), 4, 1, 0)


DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def test_api_reference_lists_the_distributed_names():
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = text.split("## `kds_hook.distributed`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)", section, flags=re.M))
    assert set(kds_distributed.__all__) <= listed, set(kds_distributed.__all__) - listed


def test_the_torchrun_example_runs_alone_as_written(tmp_path):
    import re
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    script = next(block for block in blocks if "init_process_group" in block)
    (tmp_path / "kds_torchrun.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "kds_torchrun.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("world size 1: selected particles [")
