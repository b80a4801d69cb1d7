"""Convert ComfyUI UI-format workflows (what the frontend saves) to the API prompt format.

The shipped workflows in ``workflows/`` are UI format (node positions, ``widgets_values``,
``properties.models`` download hints); ``POST /prompt`` takes the API format ``{id: {class_type,
inputs}}``. The frontend converts with its live node definitions; this module does the same from a
server's ``/object_info`` so that scripts and tests can run the shipped files headless:

    api = ui_to_api(json.load(open("workflows/xsr_x16.json")), server.object_info())
    api = substitute_models(api, {"v1-5-pruned-emaonly.safetensors": "my_sd15.safetensors"})

Rules (those of comfyui-frontend-package 1.32.x):
- a node's inputs are its definition's ``required`` then ``optional`` inputs (``input_order`` when
  the server sends it); every widget input (INT, FLOAT, STRING, BOOLEAN, COMBO, not ``forceInput``)
  takes the next value of ``widgets_values``; an INT with ``control_after_generate`` (or named
  ``seed``/``noise_seed``) is followed by one extra value (the "fixed"/"randomize" control);
- a linked input becomes ``[source_node_id, output_slot]`` (a linked widget input still has its
  value in ``widgets_values``: it is consumed and dropped);
- Note / MarkdownNote are dropped, Reroute is followed to its source, a PrimitiveNode's value is
  written into the widget it feeds; muted nodes (mode 2) are dropped together with the inputs that
  link to them; bypassed nodes (mode 4) are refused (their pass-through is not implemented here).
No ComfyUI import: pure JSON in, JSON out. ``api_node``, ``ksampler`` and ``controlnet_apply`` build the
nodes of a prompt written by hand (xsr_core.demo's graphs, the tests' prompts).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

logger = logging.getLogger(__name__)

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted (names the node and what to do)."""


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


def _is_widget(spec: Any) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, spec: Any) -> bool:
    """The frontend adds a 'control after generate' widget after such an INT (its value is saved too)."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind != "INT":
        return False
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else name in SEED_NAMES


def node_inputs(node_def: dict) -> list[tuple[str, Any]]:
    """(name, spec) of a node definition's inputs, required then optional, in the server's order."""
    out = []
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        out += [(n, specs[n]) for n in names if n in specs]
    return out


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


def _widget_values(node: dict) -> list:
    vals = node.get("widgets_values")
    if vals is None:
        return []
    if isinstance(vals, dict):  # some nodes save {name: value}; keep their order
        return list(vals.values())
    return list(vals)


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict:
    """API prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` of a UI-format workflow.

    ``object_info`` is the server's ``GET /object_info`` answer (all nodes). Raises WorkflowError for
    unknown node types, bypassed nodes, subgraphs and links to nodes that do not exist.
    """
    if not is_ui_workflow(ui_workflow):
        raise WorkflowError(
            "ui_to_api: not a UI-format workflow (expected 'nodes' and 'links' lists); an API-format "
            "prompt ({id: {class_type, inputs}}) can be queued as is."
        )
    if (ui_workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError(
            "ui_to_api: the workflow contains subgraphs, which this converter does not expand; "
            "convert them to nodes in the ComfyUI frontend (Unpack Subgraph) and save again."
        )
    nodes = {str(n["id"]): n for n in ui_workflow["nodes"]}
    links: dict[int, tuple[str, int]] = {}
    for link in ui_workflow["links"]:
        if isinstance(link, dict):  # the 1.0 schema writes links as objects
            lid, src, slot = link["id"], link["origin_id"], link["origin_slot"]
        else:
            lid, src, slot = link[0], link[1], link[2]
        links[int(lid)] = (str(src), int(slot))

    def source(link_id: int, seen: tuple = ()) -> tuple[str, int] | None | Any:
        """Where a link really comes from: (node id, slot), None (muted/dangling), or ('value', v) of a primitive."""
        if link_id not in links:
            return None
        src, slot = links[link_id]
        node = nodes.get(src)
        if node is None:
            raise WorkflowError(f"ui_to_api: link {link_id} comes from node {src}, which is not in the workflow.")
        if node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            return None
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            raise WorkflowError(
                f"ui_to_api: {_node_label(node)} is bypassed (mode 4); bypass pass-through is not "
                "supported here: un-bypass or delete it (or mute it, mode 2) and save again."
            )
        if node["type"] == REROUTE:
            if src in seen:
                raise WorkflowError(f"ui_to_api: Reroute cycle through node {src}.")
            ins = node.get("inputs") or []
            up = ins[0].get("link") if ins else None
            return None if up is None else source(int(up), seen + (src,))
        if node["type"] == PRIMITIVE:
            vals = _widget_values(node)
            if not vals:
                raise WorkflowError(f"ui_to_api: {_node_label(node)} has no value.")
            return ("value", vals[0])
        return (src, slot)

    api: dict[str, dict] = {}
    for nid, node in nodes.items():
        kind = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if kind in NOTE_TYPES or kind in (REROUTE, PRIMITIVE) or mode == MODE_NEVER:
            continue
        if mode == MODE_BYPASS:
            raise WorkflowError(
                f"ui_to_api: {_node_label(node)} is bypassed (mode 4); bypass pass-through is not "
                "supported here: un-bypass or delete it (or mute it, mode 2) and save again."
            )
        node_def = object_info.get(kind)
        if node_def is None:
            raise WorkflowError(
                f"ui_to_api: {_node_label(node)}: the server has no node type '{kind}'; install the "
                "custom node pack that provides it (or check the ComfyUI version) and restart ComfyUI."
            )
        ui_inputs = {i.get("name"): i for i in node.get("inputs") or []}
        values = _widget_values(node)
        pos = 0
        inputs: dict[str, Any] = {}
        for name, spec in node_inputs(node_def):
            value, has_value = None, False
            if _is_widget(spec):
                if pos >= len(values):
                    raise WorkflowError(
                        f"ui_to_api: {_node_label(node)} has {len(values)} widgets_values, too few for its widget "
                        f"inputs (ran out at '{name}'); the node definition changed: reload and save the workflow "
                        "in the ComfyUI frontend."
                    )
                value, has_value = values[pos], True
                pos += 2 if _has_control_widget(name, spec) else 1
            link = (ui_inputs.get(name) or {}).get("link")
            if link is not None:
                src = source(int(link))
                if src is None:
                    continue  # fed by a muted node: left out, as the frontend does
                inputs[name] = src[1] if src[0] == "value" else [src[0], src[1]]
            elif has_value:
                inputs[name] = value
        api[nid] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or kind},
        }
    return api


def substitute_models(api: dict, mapping: dict[str, str]) -> dict:
    """A copy of an API prompt with every string input equal to a key of ``mapping`` replaced by its value.

    Used to run the shipped workflows (real model file names) on other files, e.g. the tiny test zoo.
    """
    out = copy.deepcopy(api)
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and value in mapping:
                node["inputs"][name] = mapping[value]
    return out


def model_names(ui_workflow: dict) -> list[dict]:
    """The ``properties.models`` entries ({name, url?, directory}) of all nodes of a UI workflow."""
    return [m for n in ui_workflow.get("nodes", []) for m in (n.get("properties") or {}).get("models", [])]


# --- building API prompts by hand (xsr_core.demo's graphs, the tests' prompts) ---------------------------------
TILED_DECODE = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}  # VAEDecodeTiled's


def api_node(class_type: str, **inputs: Any) -> dict:
    """One node of an API prompt: ``{"class_type", "inputs"}``, a linked input as ``[node_id, output_slot]``."""
    return {"class_type": class_type, "inputs": inputs}


KSAMPLER_DEFAULTS = {"sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
CONTROLNET_DEFAULTS = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}  # ControlNetApplyAdvanced's


def ksampler(model, positive, negative, latent_image, *, seed: int, steps: int, cfg: float, **settings: Any) -> dict:
    """A stock KSampler node (the first four: links); ``settings``: what differs from KSAMPLER_DEFAULTS."""
    links = {"model": model, "positive": positive, "negative": negative, "latent_image": latent_image}
    return api_node("KSampler", **links, seed=seed, steps=steps, cfg=cfg, **{**KSAMPLER_DEFAULTS, **settings})


def controlnet_apply(positive, negative, control_net, image, **settings: Any) -> dict:
    """A stock ControlNetApplyAdvanced node (the four: links); ``settings``: what differs from CONTROLNET_DEFAULTS."""
    links = {"positive": positive, "negative": negative, "control_net": control_net, "image": image}
    return api_node("ControlNetApplyAdvanced", **links, **{**CONTROLNET_DEFAULTS, **settings})
