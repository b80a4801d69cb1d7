"""xsr_core.workflow: UI-format -> API-format conversion on a hand-written snippet and fake /object_info."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from xsr_core.workflow import WorkflowError, model_names, substitute_models, ui_to_api

REPO = Path(__file__).resolve().parents[2]

OBJECT_INFO = {
    "Loader": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP"],
        "output_name": ["MODEL", "CLIP"],
    },
    "Encode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
        "output": ["CONDITIONING"],
        "output_name": ["CONDITIONING"],
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"control_after_generate": True}],
                "steps": ["INT", {}],
                "positive": ["CONDITIONING"],
                "sampler_name": [["euler", "heun"]],
                "denoise": ["FLOAT", {}],
            },
            "optional": {"extra": ["STRING", {"forceInput": True}], "flag": ["BOOLEAN", {"default": False}]},
        },
        "input_order": {
            "required": ["model", "seed", "steps", "positive", "sampler_name", "denoise"],
            "optional": ["extra", "flag"],
        },
        "output": ["LATENT"],
        "output_name": ["LATENT"],
    },
    "Noise": {
        "input": {"required": {"noise_seed": ["INT", {}], "scale": ["FLOAT", {}]}},
        "output": ["NOISE"],
        "output_name": ["NOISE"],
    },
}


def node(nid, kind, widgets=(), inputs=(), mode=0, **extra):
    return {
        "id": nid,
        "type": kind,
        "pos": [0, 0],
        "size": [100, 100],
        "mode": mode,
        "inputs": [{"name": n, "type": "*", "link": link} for n, link in inputs],
        "outputs": [],
        "widgets_values": list(widgets),
        **extra,
    }


def snippet():
    return {
        "version": 0.4,
        "nodes": [
            node(1, "Loader", ["b.safetensors"]),
            node(2, "Encode", ["a cat"], inputs=[("clip", 4)]),
            node(
                3,
                "Sampler",
                [42, "fixed", 7, "heun", 0.5, True],
                inputs=[("model", 1), ("seed", None), ("positive", 3), ("extra", None)],
            ),
            node(4, "Note", ["just a note"]),
            node(5, "Reroute", [], inputs=[("", 2)]),
        ],
        # [id, origin_id, origin_slot, target_id, target_slot, type]
        "links": [
            [1, 1, 0, 3, 0, "MODEL"],
            [2, 1, 1, 5, 0, "CLIP"],
            [4, 5, 0, 2, 1, "CLIP"],
            [3, 2, 0, 3, 3, "CONDITIONING"],
        ],
    }


def test_widgets_links_seed_control_and_optional_inputs():
    api = ui_to_api(snippet(), OBJECT_INFO)
    assert set(api) == {"1", "2", "3"}  # Note and Reroute are gone
    assert api["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert api["2"]["inputs"] == {"text": "a cat", "clip": ["1", 1]}  # through the reroute
    assert api["3"]["class_type"] == "Sampler"
    # seed consumes 42 and the "fixed" control value; forceInput 'extra' consumes none; optional widget last
    assert api["3"]["inputs"] == {
        "model": ["1", 0],
        "seed": 42,
        "steps": 7,
        "positive": ["2", 0],
        "sampler_name": "heun",
        "denoise": 0.5,
        "flag": True,
    }


def test_noise_seed_by_name_gets_control_value_and_linked_widget_uses_the_link():
    info = copy.deepcopy(OBJECT_INFO)
    wf = {
        "nodes": [
            node(1, "Noise", [5, "randomize", 0.25]),
            node(2, "Noise", [6, "fixed", 0.5], inputs=[("scale", 1)]),
            node(3, "PrimitiveNode", [0.75]),
        ],
        "links": [[1, 3, 0, 2, 1, "FLOAT"]],
    }
    api = ui_to_api(wf, info)
    assert api["1"]["inputs"] == {"noise_seed": 5, "scale": 0.25}
    assert api["2"]["inputs"] == {"noise_seed": 6, "scale": 0.75}  # the primitive's value replaces the widget's


def test_muted_nodes_are_dropped_with_their_links_and_bypass_is_refused():
    wf = snippet()
    wf["nodes"][1]["mode"] = 2  # mute the text encoder
    api = ui_to_api(wf, OBJECT_INFO)
    assert "2" not in api and "positive" not in api["3"]["inputs"]
    wf["nodes"][1]["mode"] = 4
    with pytest.raises(WorkflowError, match=r"node 2 \(Encode\).*bypassed"):
        ui_to_api(wf, OBJECT_INFO)


@pytest.mark.parametrize("case", ["unknown_type", "too_few_widgets", "api_format", "dangling_link"])
def test_errors_name_the_node_and_the_fix(case):
    wf = snippet()
    if case == "unknown_type":
        wf["nodes"][0]["type"] = "SomePackLoader"
        match = "node 1 .*no node type 'SomePackLoader'.*install"
    elif case == "too_few_widgets":
        wf["nodes"][2]["widgets_values"] = [42, "fixed", 7]
        match = "node 3 .*ran out at 'sampler_name'"
    elif case == "api_format":
        wf = {"1": {"class_type": "Loader", "inputs": {}}}
        match = "not a UI-format workflow"
    else:
        wf["links"][0][1] = 99
        match = "node 99, which is not in the workflow"
    with pytest.raises(WorkflowError, match=match):
        ui_to_api(wf, OBJECT_INFO)


def test_substitute_models_replaces_exact_strings_only_and_copies():
    api = ui_to_api(snippet(), OBJECT_INFO)
    out = substitute_models(api, {"b.safetensors": "tiny.safetensors", "a": "nope"})
    assert out["1"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    assert out["2"]["inputs"]["text"] == "a cat"
    assert api["1"]["inputs"]["ckpt_name"] == "b.safetensors"


@pytest.mark.parametrize("name", ["xsr_x16", "xsr_x16_text_only", "xsr_x16_batch_folder"])
def test_shipped_workflows_are_well_formed_ui_json(name):
    """Structure the frontend relies on (the live tests convert them with the real /object_info)."""
    wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert wf["version"] == 0.4
    ids = {n["id"] for n in wf["nodes"]}
    assert len(ids) == len(wf["nodes"]) and wf["last_node_id"] >= max(ids)
    link_ids = {lk[0] for lk in wf["links"]}
    assert wf["last_link_id"] >= max(link_ids)
    by_id = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dslot, kind in wf["links"]:
        assert lid in by_id[src]["outputs"][slot]["links"]
        assert by_id[dst]["inputs"][dslot]["link"] == lid
        assert kind == by_id[src]["outputs"][slot]["type"]
    models = {m["name"]: m for m in model_names(wf)}
    assert models["v1-5-pruned-emaonly.safetensors"]["directory"] == "checkpoints"
    assert models["v1-5-pruned-emaonly.safetensors"]["url"].startswith("https://huggingface.co/")
    # the frontend's schema requires a URL per entry: the XSR weights (no public URL yet) are not listed
    assert not {"rfa.safetensors", "i2t.safetensors", "adain_adapter.safetensors"} & set(models)
    for m in models.values():
        assert set(m) == {"name", "url", "directory"} and m["url"].startswith("https://")
        assert any(m["name"] in n.get("widgets_values", []) for n in wf["nodes"]), m
    seeds = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(seeds) == 1 and seeds[0]["widgets_values"][1] == "fixed"
