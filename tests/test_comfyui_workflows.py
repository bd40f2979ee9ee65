"""The example workflows in docs/comfyui/ against ComfyUI's own node classes, and ComfyUI loading the installed
loader. Skips without a ComfyUI checkout in ``COMFYUI_PATH`` (see tests/comfyui_loader.py)."""

from __future__ import annotations

import asyncio
import json
import numbers
import sys
from pathlib import Path

import pytest

from comfyui_loader import comfyui_imported
from kds_hook.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, install

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "docs" / "comfyui").glob("*.json"))
# Choices that list the user's own files (empty in a bare checkout): only the value's type is checked.
FILE_CHOICES = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image")}


@pytest.fixture(scope="module")
def comfy():
    with comfyui_imported(with_nodes=True) as modules:
        yield modules


@pytest.fixture(scope="module")
def node_classes(comfy):
    """ComfyUI's core nodes (nodes.NODE_CLASS_MAPPINGS; the examples need none from comfy_extras) and ours."""
    classes = dict(comfy.nodes.NODE_CLASS_MAPPINGS)
    assert not set(classes) & set(NODE_CLASS_MAPPINGS), "a ComfyUI node has one of our names"
    classes.update(NODE_CLASS_MAPPINGS)
    return classes


def test_there_are_the_two_examples():
    assert [path.name for path in WORKFLOWS] == ["kds-img2img-upscale.json", "kds-text-to-image.json"]


def declared_inputs(node_class):
    spec = node_class.INPUT_TYPES()
    return spec.get("required", {}), {**spec.get("required", {}), **spec.get("optional", {})}


def check_value(where, kind, options, value, class_type, name):
    if isinstance(kind, list) or kind == "COMBO":  # a choice
        choices = kind if isinstance(kind, list) else options["options"]
        if (class_type, name) in FILE_CHOICES:
            assert isinstance(value, str) and value, where
        else:
            assert value in choices, f"{where}: {value!r} not in {choices}"
    elif kind in ("INT", "FLOAT"):
        wanted = numbers.Integral if kind == "INT" else numbers.Real
        assert isinstance(value, wanted) and not isinstance(value, bool), f"{where}: {value!r} is no {kind}"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    else:
        pytest.fail(f"{where}: a literal {value!r} for an input of type {kind}, which needs a link")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_every_node_exists_with_the_inputs_the_workflow_sets(path, node_classes):
    workflow = json.loads(path.read_text())
    for node_id, node in workflow.items():
        class_type = node["class_type"]
        assert class_type in node_classes, f"node {node_id}: no node class {class_type}"
        required, declared = declared_inputs(node_classes[class_type])
        assert not set(required) - set(node["inputs"]), f"node {node_id} lacks {set(required) - set(node['inputs'])}"
        for name, value in node["inputs"].items():
            where = f"{path.name} node {node_id} ({class_type}).{name}"
            assert name in declared, f"{where}: {class_type} has no input {name}"
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            if isinstance(value, list):  # a link: [source node id, output index]
                source_id, output = value
                source_class = node_classes[workflow[source_id]["class_type"]]
                assert source_class.RETURN_TYPES[output] == kind, f"{where}: linked to a {source_class.RETURN_TYPES}"
            else:
                check_value(where, kind, options, value, class_type, name)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_batch_holds_num_particles_and_flows_through_the_kds_nodes(path):
    """The batch = N rule as docs/comfyui.md states it: one image, N particles, the steered model samples them and
    KDSSelect keeps one."""
    workflow = json.loads(path.read_text())

    def only(class_type):
        found = [(node_id, node) for node_id, node in workflow.items() if node["class_type"] == class_type]
        assert len(found) == 1, class_type
        return found[0]

    steer_id, steer = only("KDSSteer")
    sampler_id, sampler = only("KSampler")
    _, select = only("KDSSelect")
    particles = steer["inputs"]["num_particles"]
    assert particles == select["inputs"]["num_particles"] == 10
    assert sampler["inputs"]["model"] == [steer_id, 0] and select["inputs"]["samples"] == [sampler_id, 0]
    batch = workflow[sampler["inputs"]["latent_image"][0]]
    if batch["class_type"] == "EmptyLatentImage":
        assert batch["inputs"]["batch_size"] == particles
    else:  # one encoded image, repeated: RepeatLatentBatch's rows are then exactly one image's particles
        assert batch["class_type"] == "RepeatLatentBatch" and batch["inputs"]["amount"] == particles
        assert workflow[batch["inputs"]["samples"][0]]["class_type"] == "VAEEncode"
        assert 0 < sampler["inputs"]["denoise"] < 1


def test_comfyui_loads_the_installed_loader(comfy, tmp_path):
    """ComfyUI's own custom-node loader imports the file install() wrote and registers both nodes."""
    nodes = comfy.nodes
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("")
    loader = install(root).path
    saved = {name: dict(getattr(nodes, name)) for name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
                                                           "LOADED_MODULE_DIRS")}  # fmt: skip
    try:
        assert asyncio.run(nodes.load_custom_node(str(loader))) is True
        for name, node_class in NODE_CLASS_MAPPINGS.items():
            assert nodes.NODE_CLASS_MAPPINGS[name] is node_class
            assert nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == NODE_DISPLAY_NAME_MAPPINGS[name]
    finally:
        for name, value in saved.items():
            getattr(nodes, name).clear()
            getattr(nodes, name).update(value)
        sys.modules.pop(str(loader.with_suffix("")), None)
        for node_class in NODE_CLASS_MAPPINGS.values():  # ComfyUI tags the classes it registers
            if "RELATIVE_PYTHON_MODULE" in vars(node_class):
                delattr(node_class, "RELATIVE_PYTHON_MODULE")
