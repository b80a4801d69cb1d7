"""The AdaIN adapter nodes: load the weights once, apply them to the MODEL + CONTROL_NET (image-independent).

- ``XSR_LoadAdaINAdapter`` → an ``XSR_ADAIN_ADAPTER`` (the adapter in its own ModelPatcher);
- ``XSR_ApplyAdaIN`` (model, control_net, adapter, strength, window, apply_to) → patched models; changing
  only the strength re-runs this node alone and reuses the loaded adapter;
- ``XSR_AdaINPatch`` (the original node, inputs unchanged) = load + apply, through a loaded-file cache
  keyed by path, mtime and size, so it too reuses the adapter when only the strength changes.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from comfy_api.latest import io

from ..xsr_core.adapter import AdaINAdapter
from ..xsr_core.weights import XSRWeightsError, load_model, read_metadata
from .comfy_binding import APPLY_TO, AdaINRuntime, make_adapter_patcher, patch_controlnet, patch_unet
from .common import choice_input, xsr_file_input, xsr_file_path, xsr_schema
from .identity import check_controlnet, check_unet
from .validation import check_finite, collect, schema_problems, verdict

logger = logging.getLogger(__name__)

XSRAdaINAdapterSocket = io.Custom("XSR_ADAIN_ADAPTER")
_CACHE_SIZE = 2  # loaded adapter files kept (a ModelPatcher each; ComfyUI offloads them like any model)


@dataclass(eq=False)
class LoadedAdapter:
    """What an XSR_ADAIN_ADAPTER socket carries: the adapter's patcher and the file it came from."""

    patcher: object  # XSRAdapterPatcher; .model is the AdaINAdapter
    path: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self


_loaded: OrderedDict[tuple[str, int, int], LoadedAdapter] = OrderedDict()


def load_adapter(node: str, path: str) -> LoadedAdapter:
    """The adapter file at ``path`` in its own ModelPatcher; cached by (path, mtime, size), a few files deep."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{node}: cannot read the adapter file {path}: {e}") from None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    hit = _loaded.get(key)
    if hit is not None:
        _loaded.move_to_end(key)
        return hit
    try:
        adapter = load_model(path, expected=AdaINAdapter)
        meta = read_metadata(path)
    except XSRWeightsError as e:
        raise ValueError(f"{node}: {e}") from None
    for old in [k for k in _loaded if k[0] == key[0]]:
        del _loaded[old]  # the file changed on disk: drop its stale copy
    hit = _loaded[key] = LoadedAdapter(make_adapter_patcher(adapter), path, meta)
    while len(_loaded) > _CACHE_SIZE:
        _loaded.popitem(last=False)
    logger.info("%s: loaded AdaIN adapter %s (%d blocks)", node, path, len(adapter.block_ids))
    return hit


def _identity_check(node: str, loaded: LoadedAdapter, model, control_net, allow_other_controlnet: bool) -> None:
    """The adapter runs on the ControlNet (and base U-Net) it was trained with (fingerprints in its metadata)."""
    check_controlnet(loaded.path, loaded.metadata, control_net, bool(allow_other_controlnet), node=node)
    check_unet(loaded.path, loaded.metadata, model, node=node)


def apply_adapter(
    node: str,
    model,
    control_net,
    loaded: LoadedAdapter | None,
    strength: float,
    start_percent: float,
    end_percent: float,
    apply_to: str,
    allow_other_controlnet: bool = False,
):
    """(patched model, patched control_net); strength 0 gives plain clones (the parity rule, bit for bit)."""
    if start_percent > end_percent:
        raise ValueError(f"{node}: start_percent {start_percent} is after end_percent {end_percent}.")
    if apply_to not in APPLY_TO:
        raise ValueError(f"{node}: apply_to must be one of {APPLY_TO}, got {apply_to!r}.")
    if strength == 0.0:
        # no wrappers, no object patches, no conditioning change: the unpatched graph, bit for bit
        return model.clone(), control_net.copy()
    if not isinstance(loaded, LoadedAdapter):
        raise ValueError(f"{node}: adapter must come from XSR Load AdaIN Adapter, got {type(loaded).__name__}.")
    _identity_check(node, loaded, model, control_net, allow_other_controlnet)
    runtime = AdaINRuntime(
        loaded.patcher,
        strength=float(strength),
        start_percent=float(start_percent),
        end_percent=float(end_percent),
        apply_to=apply_to,
    )
    return patch_unet(model, runtime), patch_controlnet(control_net, runtime)


def _patch_schema(node_id: str, display_name: str, description: str, control_net_tooltip: str, adapter) -> io.Schema:
    """The schema of the two patch nodes (XSR_ApplyAdaIN, XSR_AdaINPatch): the same inputs and outputs but for
    where the adapter comes from (``adapter``: a loaded-adapter socket or the file combo)."""
    return xsr_schema(
        node_id,
        display_name,
        description,
        inputs=[
            io.Model.Input("model", tooltip="SD1.x MODEL (CheckpointLoaderSimple)"),
            io.ControlNet.Input("control_net", tooltip=control_net_tooltip),
            adapter,
            io.Float.Input(
                "strength",
                default=1.0,
                min=0.0,
                max=2.0,
                step=0.05,
                tooltip="multiplies every adapter gate; 0 = the unpatched models, bit for bit",
            ),
            _percent_input("start_percent", 0.0, "sampling progress at which the adapter starts acting"),
            _percent_input("end_percent", 1.0, "sampling progress at which the adapter stops acting"),
            choice_input(
                "apply_to",
                APPLY_TO,
                "cond",
                "cond: only the positive branch gets the image embedding (default); "
                "both: the negative branch gets it too",
            ),
            io.Boolean.Input(
                "allow_other_controlnet",
                default=False,
                optional=True,
                tooltip="run the adapter on a ControlNet other than the one it was trained with "
                "(e.g. the stock tile ControlNet, stage 2's initialisation); off = such a "
                "ControlNet is an error",
            ),
        ],
        outputs=[
            io.Model.Output("patched_model", display_name="model"),
            io.ControlNet.Output("patched_control_net", display_name="control_net"),
        ],
    )


def _percent_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def _validate(cls, kw: dict, node: str, *, adapter_file: bool) -> bool | str:
    """``validate_inputs`` of the adapter nodes: the widget values (schema), the adapter file when a widget names
    it, and the sampling window (linked values arrive as None and are checked at execution)."""
    from .loaders import check_weights_file

    problems = schema_problems(cls, kw, skip=("adapter_name",) if adapter_file else ())
    if adapter_file and kw.get("adapter_name") is not None:
        collect(problems, check_weights_file, node, "adapter_name", kw["adapter_name"], "AdaINAdapter")
    s, e = kw.get("start_percent"), kw.get("end_percent")
    if isinstance(s, (int, float)) and isinstance(e, (int, float)) and s > e:
        problems.append(f"{node}: start_percent {s} is after end_percent {e}; make start <= end.")
    return verdict(problems)


def _check_finite_settings(node: str, settings: dict) -> None:
    """Execution-time guard of the float widgets (``settings``: the inputs after the adapter, see apply_adapter)."""
    check_finite(node, **{k: settings[k] for k in ("strength", "start_percent", "end_percent")})


def _adapter_combo() -> io.Combo.Input:
    return xsr_file_input(
        "adapter_name", "adain_adapter.safetensors", "AdaIN adapter weights (.safetensors in models/xsr)"
    )


class XSRLoadAdaINAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_LoadAdaINAdapter",
            "XSR Load AdaIN Adapter",
            "Loads the AdaIN adapter weights once (ComfyUI budgets and offloads them with the U-Net). "
            "Connect to XSR Apply AdaIN Adapter.",
            inputs=[_adapter_combo()],
            outputs=[XSRAdaINAdapterSocket.Output("adapter", display_name="adapter")],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return _validate(cls, kw, "XSR_LoadAdaINAdapter", adapter_file=True)

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        path = xsr_file_path("XSR_LoadAdaINAdapter", "adapter_name", adapter_name)
        return io.NodeOutput(load_adapter("XSR_LoadAdaINAdapter", path))


class XSRApplyAdaIN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _patch_schema(
            "XSR_ApplyAdaIN",
            "XSR Apply AdaIN Adapter (U-Net + ControlNet)",
            "Patches the U-Net and the ControlNet with a loaded AdaIN adapter (cross-attention Q/K and "
            "LayerNorm statistics moved toward the image embedding that arrives through the positive "
            "conditioning from XSR Enhance). Apply the patched ControlNet with the stock "
            "ControlNetApplyAdvanced.",
            control_net_tooltip="the ControlNet trained with this adapter (ControlNetLoader)",
            adapter=XSRAdaINAdapterSocket.Input("adapter", tooltip="from XSR Load AdaIN Adapter"),
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return _validate(cls, kw, "XSR_ApplyAdaIN", adapter_file=False)

    @classmethod
    def execute(cls, model, control_net, adapter, **settings) -> io.NodeOutput:
        node = "XSR_ApplyAdaIN"
        _check_finite_settings(node, settings)
        return io.NodeOutput(*apply_adapter(node, model, control_net, adapter, **settings))


class XSRAdaINPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _patch_schema(
            "XSR_AdaINPatch",
            "XSR AdaIN Patch (U-Net + ControlNet)",
            "Patches the U-Net and the ControlNet with the gated AdaIN adapter (cross-attention Q/K and "
            "LayerNorm statistics moved toward the image embedding). The image embedding itself arrives "
            "through the positive conditioning from XSR Enhance, so these patched models are reused "
            "across images. Apply the patched ControlNet with the stock ControlNetApplyAdvanced.",
            control_net_tooltip="the XSR ControlNet trained with this adapter "
            "(ControlNetLoader on xsr_controlnet.safetensors, written by `train export`)",
            adapter=_adapter_combo(),
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return _validate(cls, kw, "XSR_AdaINPatch", adapter_file=True)

    @classmethod
    def execute(cls, model, control_net, adapter_name: str, **settings) -> io.NodeOutput:
        node = "XSR_AdaINPatch"
        _check_finite_settings(node, settings)
        path = xsr_file_path(node, "adapter_name", adapter_name)
        loaded = load_adapter(node, path) if settings["strength"] != 0.0 else None
        return io.NodeOutput(*apply_adapter(node, model, control_net, loaded, **settings))
