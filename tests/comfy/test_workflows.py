"""The shipped UI workflows (workflows/*.json) converted with the live /object_info and run on the tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comfy_helpers import png_size
from xsr_core.demo import xsr_graph
from xsr_core.testing.zoo import CHECKPOINT_NAME, CLIP_VISION_NAME, CONTROLNET_NAME, DEMO_REFDB
from xsr_core.workflow import substitute_models, ui_to_api
from xsr_helpers import upload_lr8

pytestmark = pytest.mark.comfy

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
# real model file names in the shipped workflows -> tiny zoo names
SD15 = "v1-5-pruned-emaonly.safetensors"
TILE = "xsr_controlnet.safetensors"  # the ControlNet trained with the adapter (train export)
TEXT_ONLY_CN = "xsr_text_only_controlnet.safetensors"
CLIPV = "clip_vision_l.safetensors"
REFDB = "xsr_refdb"
LR_NAME = "xsr_lr.png"
LR_FOLDER = "xsr_lr"
ZOO_NAMES = {
    SD15: CHECKPOINT_NAME,
    TILE: CONTROLNET_NAME,
    TEXT_ONLY_CN: CONTROLNET_NAME,
    CLIPV: CLIP_VISION_NAME,
    REFDB: DEMO_REFDB,
}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def tiny_api(comfy, name: str, **extra_names) -> dict:
    """API prompt of a shipped workflow on the tiny zoo, 2 sampler steps."""
    api = substitute_models(ui_to_api(load(name), comfy.object_info()), {**ZOO_NAMES, **extra_names})
    samplers = [n for n in api.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 1
    samplers[0]["inputs"]["steps"] = 2
    return api


def node_id(api: dict, class_type: str) -> str:
    ids = [k for k, v in api.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


@pytest.fixture(scope="module")
def lr8(comfy, tmp_path_factory):
    return upload_lr8(comfy, tmp_path_factory.mktemp("wf_lr"), "wf_lr8.png", 3)


def test_xsr_x16_workflow_is_the_xsr_graph():
    """The shipped file and xsr_graph() (used by the demo and tests) have the same nodes and links.

    (Widget values need the live /object_info: test_xsr_x16_widgets_match_xsr_graph.)
    """
    ui = load("xsr_x16")
    ids = {n["id"]: n["type"] for n in ui["nodes"] if n["type"] != "Note"}
    graph = xsr_graph(LR_NAME, ckpt=SD15, controlnet=TILE, clip_vision=CLIPV, refdb=REFDB)
    assert sorted(ids.values()) == sorted(v["class_type"] for v in graph.values())
    kind = {k: v["class_type"] for k, v in graph.items()}
    graph_links = {
        (kind[v[0]], v[1], kind[k], name)
        for k, n in graph.items()
        for name, v in n["inputs"].items()
        if isinstance(v, list)
    }
    ui_links = set()
    for _, src, slot, dst, dslot, _ in ui["links"]:
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        ui_links.add((ids[src], slot, ids[dst], dst_node["inputs"][dslot]["name"]))
    assert ui_links == graph_links


def test_xsr_x16_widgets_match_xsr_graph(comfy):
    api = ui_to_api(load("xsr_x16"), comfy.object_info())
    graph = xsr_graph(LR_NAME, ckpt=SD15, controlnet=TILE, clip_vision=CLIPV, refdb=REFDB)
    by_kind = {v["class_type"]: v for v in api.values()}
    kind = {k: v["class_type"] for k, v in graph.items()}
    for key, node in graph.items():
        got = by_kind[node["class_type"]]["inputs"]
        want = {name: ([kind[v[0]], v[1]] if isinstance(v, list) else v) for name, v in node["inputs"].items()}
        got = {name: ([api[v[0]]["class_type"], v[1]] if isinstance(v, list) else v) for name, v in got.items()}
        if node["class_type"] == "SaveImage":
            want.pop("filename_prefix"), got.pop("filename_prefix")
        assert got == want, key


def test_xsr_x16_workflow_runs(comfy, lr8):
    api = tiny_api(comfy, "xsr_x16", **{LR_NAME: lr8})
    entry = comfy.run(api)
    out = comfy.output_images(entry, node_id(api, "SaveImage"))
    assert len(out) == 1 and png_size(out[0]) == (128, 128)
    ui = entry["outputs"][node_id(api, "XSR_Retrieve")]
    assert len(ui["xsr_refs"]) == 4 and len(ui["xsr_thumbs"]) == 4 and "images" not in ui
    assert entry["outputs"][node_id(api, "XSR_Enhance")]["text"][0].endswith("high quality, detailed")


def test_text_only_workflow_has_no_adapter_and_runs(comfy, lr8):
    api = tiny_api(comfy, "xsr_x16_text_only", **{LR_NAME: lr8})
    kinds = [v["class_type"] for v in api.values()]
    assert "XSR_AdaINPatch" not in kinds and "XSR_Enhance" in kinds
    assert api[node_id(api, "KSampler")]["inputs"]["model"] == [node_id(api, "CheckpointLoaderSimple"), 0]
    entry = comfy.run(api)
    out = comfy.output_images(entry, node_id(api, "SaveImage"))
    assert len(out) == 1 and png_size(out[0]) == (128, 128)


def test_batch_folder_workflow_gives_one_output_per_image(comfy, write_png):
    folder = Path(comfy.base_dir) / "input" / "xsr_wf_batch"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["b.png", "a.png"]):
        Image.open(write_png((8, 8, "RGB"), f"batch{i}.png")).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    api = tiny_api(comfy, "xsr_x16_batch_folder", **{LR_FOLDER: "xsr_wf_batch"})
    entry = comfy.run(api)
    out = comfy.output_images(entry, node_id(api, "SaveImage"))
    assert len(out) == 2 and all(png_size(o) == (128, 128) for o in out)
    assert len(entry["outputs"][node_id(api, "XSR_Retrieve")]["xsr_refs"]) == 8


def test_batch_folder_refuses_paths_outside_the_input_dir(comfy):
    from xsr_core.comfy_server import ComfyError

    api = tiny_api(comfy, "xsr_x16_batch_folder", **{LR_FOLDER: "../models"})
    with pytest.raises(ComfyError, match="outside ComfyUI's input directory"):
        comfy.run(api)
