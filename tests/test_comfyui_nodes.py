"""kds_hook.comfyui without ComfyUI: importing it, the nodes' interface, KDSSelect on LATENT dicts, install()."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kds_hook.comfyui as comfyui
from kds_hook import KDS, select_particles
from kds_hook.comfyui import (
    LOADER_NAME,
    LOADER_SOURCE,
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    KDSSelect,
    KDSSteer,
    install,
    select_latent,
)

ROOT = Path(__file__).resolve().parents[1]
N, ITEMS = 3, 2


def test_importing_the_package_imports_no_comfyui():
    code = (
        "import sys, kds_hook.comfyui as c\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'nodes', 'folder_paths', "
        "'torchvision')]\n"
        "assert not bad, bad\n"
        "print(sorted(c.NODE_CLASS_MAPPINGS))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['KDSSelect', 'KDSSteer']"


# ---------------------------------------------------------------- the nodes' interface (the issue's contract)


def test_registration_maps_the_two_nodes():
    assert NODE_CLASS_MAPPINGS == {"KDSSteer": KDSSteer, "KDSSelect": KDSSelect}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for node in (KDSSteer, KDSSelect):
        assert node.CATEGORY == "sampling/kds"
        assert callable(getattr(node(), node.FUNCTION))
        assert len(node.RETURN_TYPES) == len(node.OUTPUT_TOOLTIPS) and node.DESCRIPTION


def required_inputs(node):
    spec = node.INPUT_TYPES()
    assert set(spec) == {"required"}
    return spec["required"]


def test_kdssteer_inputs_types_and_defaults():
    assert KDSSteer.FUNCTION == "patch" and KDSSteer.RETURN_TYPES == ("MODEL",)
    inputs = required_inputs(KDSSteer)
    assert list(inputs) == ["model", "num_particles", "bandwidth", "auto_bandwidth", "patch_size", "strength",
                            "threshold"]  # fmt: skip
    types = {name: spec[0] for name, spec in inputs.items()}
    assert types == {"model": "MODEL", "num_particles": "INT", "bandwidth": "FLOAT", "auto_bandwidth": "BOOLEAN",
                     "patch_size": "INT", "strength": "FLOAT", "threshold": "FLOAT"}  # fmt: skip
    defaults = {name: spec[1]["default"] for name, spec in inputs.items() if "default" in spec[1]}
    assert defaults == {"num_particles": 10, "bandwidth": 0.3, "auto_bandwidth": False, "patch_size": 1,
                        "strength": 0.3, "threshold": 0.3}  # fmt: skip
    # The node's defaults are the method's and the core's: one set of settings everywhere.
    signature = inspect.signature(KDSSteer.patch).parameters
    assert {name: signature[name].default for name in defaults} == defaults
    kds = KDS()
    assert (kds.num_particles, kds.bandwidth, kds.patch_size, kds.gate.strength, kds.gate.threshold) == (
        defaults["num_particles"], defaults["bandwidth"], defaults["patch_size"], defaults["strength"],
        defaults["threshold"])  # fmt: skip
    for name in ("strength", "threshold"):
        assert (inputs[name][1]["min"], inputs[name][1]["max"]) == (0.0, 1.0)
    assert inputs["bandwidth"][1]["min"] > 0 and inputs["num_particles"][1]["min"] == 1


def test_kdsselect_inputs_types_and_defaults():
    assert KDSSelect.FUNCTION == "select" and KDSSelect.RETURN_TYPES == ("LATENT",)
    inputs = required_inputs(KDSSelect)
    assert list(inputs) == ["samples", "num_particles", "method"]
    assert inputs["samples"][0] == "LATENT" and inputs["num_particles"][0] == "INT"
    assert inputs["num_particles"][1]["default"] == 10
    assert inputs["method"][0] == ["mean", "density", "medoid"] and inputs["method"][1]["default"] == "mean"


# ---------------------------------------------------------------- KDSSelect on LATENT dicts


def latents(rows=ITEMS * N, seed=0):
    return torch.randn(rows, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["mean", "density", "medoid"])
def test_kdsselect_picks_what_select_particles_picks(method):
    samples = latents()
    (out,) = KDSSelect().select({"samples": samples}, N, method)
    expected = select_particles(samples, N, method)
    assert torch.equal(out["samples"], expected.sample)
    assert set(out) == {"samples"}


def test_the_chosen_rows_carry_their_masks_batch_index_and_other_per_row_values():
    samples = latents()
    rows = samples.shape[0]
    chosen = select_particles(samples, N).index
    picked = (torch.arange(ITEMS) * N + chosen).tolist()
    per_row_masks = torch.rand(rows, 1, 6, 6)
    latent = {
        "samples": samples,
        "noise_mask": per_row_masks,
        "batch_index": [10 + i for i in range(rows)],
        "row_tag": torch.arange(rows),  # any other per-row tensor ...
        "names": tuple(f"row{i}" for i in range(rows)),  # ... or sequence follows the rows
        "downscale_ratio_spacial": 8,  # anything else is kept
        "type": "image",
    }
    original = {key: (value.clone() if isinstance(value, torch.Tensor) else value) for key, value in latent.items()}
    out = select_latent(latent, N)
    assert torch.equal(out["noise_mask"], per_row_masks[picked])
    assert out["batch_index"] == [10 + i for i in picked]
    assert out["row_tag"].tolist() == picked and out["names"] == tuple(f"row{i}" for i in picked)
    assert out["downscale_ratio_spacial"] == 8 and out["type"] == "image"
    for key, value in original.items():  # the input LATENT is untouched
        assert torch.equal(latent[key], value) if isinstance(value, torch.Tensor) else latent[key] == value


def test_masks_shared_or_fewer_than_the_rows_follow_comfyui_broadcasting():
    samples = latents()
    picked = (torch.arange(ITEMS) * N + select_particles(samples, N).index).tolist()
    shared = torch.rand(1, 1, 6, 6)
    out = select_latent({"samples": samples, "noise_mask": shared}, N)
    assert torch.equal(out["noise_mask"], shared) and out["noise_mask"] is not shared
    two = torch.rand(2, 1, 6, 6)  # ComfyUI cycles fewer masks over the batch: row r gets mask r % 2
    out = select_latent({"samples": samples, "noise_mask": two}, N)
    assert torch.equal(out["noise_mask"], two[[r % 2 for r in picked]])


def test_kdsselect_refuses_bad_input():
    with pytest.raises(ValueError, match="holds 5 latents, not a multiple of num_particles=3"):
        select_latent({"samples": latents(5)}, N)
    with pytest.raises(TypeError, match="LATENT"):
        select_latent(latents(), N)
    with pytest.raises(TypeError, match="torch.Tensor"):
        select_latent({"samples": [1, 2, 3]}, N)
    with pytest.raises(ValueError, match="unknown selection method"):
        select_latent({"samples": latents()}, N, "best")
    with pytest.raises(TypeError, match="num_particles must be an int"):
        select_latent({"samples": latents()}, True)
    with pytest.raises(ValueError, match="batch_index has 2 entries for 6 latents"):
        select_latent({"samples": latents(), "batch_index": [0, 1]}, N)


# ---------------------------------------------------------------- install()


def comfyui_folder(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("# ComfyUI\n")
    return root


def test_install_writes_the_two_line_loader(tmp_path):
    root = comfyui_folder(tmp_path)
    result = install(root)
    assert result.written and result.path == root / "custom_nodes" / LOADER_NAME
    assert result.path.read_text() == LOADER_SOURCE and len(LOADER_SOURCE.splitlines()) == 2
    namespace = {}
    exec(compile(LOADER_SOURCE, str(result.path), "exec"), namespace)  # what ComfyUI does with the file
    assert namespace["NODE_CLASS_MAPPINGS"] is NODE_CLASS_MAPPINGS
    assert namespace["NODE_DISPLAY_NAME_MAPPINGS"] is NODE_DISPLAY_NAME_MAPPINGS
    assert sorted(p.name for p in (root / "custom_nodes").iterdir()) == [LOADER_NAME]  # no temporary left


def test_install_is_idempotent_and_replaces_only_its_own_loader(tmp_path):
    root = comfyui_folder(tmp_path)
    path = install(root).path
    os.utime(path, (1, 1))
    again = install(str(root))
    assert not again.written and path.stat().st_mtime == 1  # already there: not even rewritten
    path.write_text(LOADER_SOURCE.splitlines()[0] + "\nfrom kds_hook.comfyui import NODE_CLASS_MAPPINGS\n")
    assert install(root).written and path.read_text() == LOADER_SOURCE  # an older loader of ours is updated


def test_install_refuses_to_overwrite_a_foreign_file(tmp_path):
    root = comfyui_folder(tmp_path)
    foreign = root / "custom_nodes" / LOADER_NAME
    foreign.write_text("NODE_CLASS_MAPPINGS = {}  # someone else's\n")
    with pytest.raises(FileExistsError, match="not written by kds-hook"):
        install(root)
    assert foreign.read_text() == "NODE_CLASS_MAPPINGS = {}  # someone else's\n"
    foreign.unlink()
    foreign.symlink_to(tmp_path / "elsewhere.py")
    with pytest.raises(FileExistsError, match="not a plain file"):
        install(root)
    foreign.unlink()
    foreign.mkdir()
    with pytest.raises(FileExistsError, match="not a plain file"):
        install(root)


def test_install_needs_a_comfyui_folder(tmp_path):
    root = comfyui_folder(tmp_path)
    with pytest.raises(ValueError, match="is not a ComfyUI folder.*give its parent"):
        install(root / "custom_nodes")
    portable = tmp_path
    with pytest.raises(ValueError, match="did you mean .*ComfyUI"):
        install(portable)
    with pytest.raises(ValueError, match="is not a ComfyUI folder"):
        install(tmp_path / "missing")
    with pytest.raises(TypeError, match="path to the ComfyUI folder"):
        install(3)
    assert not (root / "custom_nodes" / LOADER_NAME).exists()


def test_the_command_line_installs_once_and_reports_refusals_in_one_line(tmp_path, capsys):
    from kds_hook.cli import main

    root = comfyui_folder(tmp_path)
    assert main(["comfyui-install", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {root / 'custom_nodes' / LOADER_NAME}; restart ComfyUI")
    assert main(["comfyui-install", str(root)]) == 0
    assert "already installed; nothing changed" in capsys.readouterr().out
    foreign = root / "custom_nodes" / LOADER_NAME
    foreign.write_text("# mine\n")
    assert main(["comfyui-install", str(root)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kds-hook: error: ") and "not written by kds-hook" in error and len(error.splitlines()) == 1
    assert foreign.read_text() == "# mine\n"
    assert main(["comfyui-install", str(tmp_path / "nowhere")]) == 2
    assert "is not a ComfyUI folder" in capsys.readouterr().err


def test_the_comfyui_loader_leaves_sys_path_and_sys_modules_as_it_found_them():
    from comfyui_loader import comfyui_imported

    path, modules = list(sys.path), set(sys.modules)
    with comfyui_imported() as comfy:
        assert sys.modules["comfy.samplers"] is comfy.samplers and "torchvision" not in sys.modules
    assert sys.path == path
    left = [m for m in set(sys.modules) - modules if m.split(".")[0] in ("comfy", "comfy_api", "torchvision")]
    assert not left, left


# ---------------------------------------------------------------- documentation


def test_api_reference_lists_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    heading = "## `kds_hook.comfyui`"
    assert heading in text
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)", section, flags=re.M))
    assert set(comfyui.__all__) <= listed, sorted(set(comfyui.__all__) - listed)


def test_the_guide_example_runs_and_prints_what_it_says(capsys):
    guide = (ROOT / "docs" / "comfyui.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/comfyui.md", "exec"), {})
    promised = [line[2:] for line in blocks[0].splitlines() if line.startswith("# ")]
    assert capsys.readouterr().out.splitlines() == promised
