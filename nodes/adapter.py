"""XSR_AdaINPatch: the AdaIN-patched MODEL + CONTROL_NET (image-independent, cached across prompts)."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
from comfy_api.latest import io

from ..xsr_core.adapter import AdaINAdapter
from ..xsr_core.weights import XSRWeightsError, load_model, read_metadata
from .comfy_binding import APPLY_TO, AdaINRuntime, patch_controlnet, patch_unet
from .common import xsr_file_path, xsr_files
from .identity import check_controlnet, check_unet


class XSRAdaINPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = xsr_files()
        default = "adain_adapter.safetensors" if "adain_adapter.safetensors" in files else None
        return io.Schema(
            node_id="XSR_AdaINPatch",
            display_name="XSR AdaIN Patch (U-Net + ControlNet)",
            category="xsr",
            description="Patches the U-Net and the ControlNet with the gated AdaIN adapter (cross-attention Q/K and "
                        "LayerNorm statistics moved toward the image embedding). The image embedding itself arrives "
                        "through the positive conditioning from XSR Enhance, so these patched models are reused "
                        "across images. Apply the patched ControlNet with the stock ControlNetApplyAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x MODEL (CheckpointLoaderSimple)"),
                io.ControlNet.Input("control_net", tooltip="the XSR ControlNet trained with this adapter "
                                    "(ControlNetLoader on xsr_controlnet.safetensors, written by `train export`)"),
                io.Combo.Input("adapter_name", options=files, default=default,
                               tooltip="AdaIN adapter weights (.safetensors in models/xsr)"),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="multiplies every adapter gate; 0 = the unpatched models, bit for bit"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="sampling progress at which the adapter starts acting"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="sampling progress at which the adapter stops acting"),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="cond",
                               tooltip="cond: only the positive branch gets the image embedding (default); "
                                       "both: the negative branch gets it too"),
                io.Boolean.Input("allow_other_controlnet", default=False, optional=True,
                                 tooltip="run the adapter on a ControlNet other than the one it was trained with "
                                         "(e.g. the stock tile ControlNet); off = such a ControlNet is an error"),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model"),
                     io.ControlNet.Output("patched_control_net", display_name="control_net")],
        )

    @classmethod
    def execute(cls, model, control_net, adapter_name: str, strength: float, start_percent: float,
                end_percent: float, apply_to: str, allow_other_controlnet: bool = False) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"XSR_AdaINPatch: start_percent {start_percent} is after end_percent {end_percent}.")
        path = xsr_file_path("XSR_AdaINPatch", "adapter_name", adapter_name)
        if strength == 0.0:
            # the parity rule: strength 0 is the unpatched graph, bit for bit (no wrappers, no batching change)
            return io.NodeOutput(model.clone(), control_net.copy())
        try:
            adapter = load_model(path, expected=AdaINAdapter)
            meta = read_metadata(path)
        except XSRWeightsError as e:
            raise ValueError(f"XSR_AdaINPatch: {e}") from None
        check_controlnet(path, meta, control_net, bool(allow_other_controlnet))
        check_unet(path, meta, model)
        patcher = comfy.model_patcher.ModelPatcher(
            adapter, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        runtime = AdaINRuntime(patcher, strength=float(strength), start_percent=float(start_percent),
                               end_percent=float(end_percent), apply_to=apply_to)
        return io.NodeOutput(patch_unet(model, runtime), patch_controlnet(control_net, runtime))
