"""``train export``: trained weights → a ComfyUI ``models/`` layout.

    models/xsr/rfa.safetensors             RFA (xsr_core.weights.save_model)
    models/xsr/i2t.safetensors             I2T with its GPT-2 tokenizer embedded (save_i2t)
    models/xsr/adain_adapter.safetensors   AdaIN adapter (save_model; the adain variant only), with the
                                           fingerprints (xsr_core.fingerprint) of the ControlNet written
                                           below and of the base U-Net in its metadata: XSR_AdaINPatch
                                           refuses another ControlNet unless told otherwise
    models/controlnet/<name>_controlnet.safetensors
                                           the trained ControlNet in the original LDM layout
                                           (``control_model.*`` keys), which ComfyUI's ControlNetLoader
                                           and diffusers' ``ControlNetModel.from_single_file`` both load.
                                           ``name`` defaults to ``xsr`` (the adain variant, the file
                                           workflows/xsr_x16.json loads) and ``xsr_text_only`` (the
                                           text-only variant, workflows/xsr_x16_text_only.json)

Each file is re-loaded after writing (weights.load_model / load_i2t) so a broken export fails here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..adapter import AdaINAdapter
from ..models.i2t import load_i2t, save_i2t
from ..models.rfa import RFA
from ..weights import load_model, read_metadata, save_model

logger = logging.getLogger(__name__)


def _final(run: str | os.PathLike, name: str) -> Path:
    p = Path(run)
    if p.is_file():
        return p
    for cand in (p / "final" / name, p / name):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{run}: no {name} (looked in {p}/final and {p}); did the training run finish?")


def export_controlnet(
    controlnet_dir: str | os.PathLike, out_file: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """A diffusers ControlNet folder → LDM single file with the ``control_model.`` prefix (fp16 kept as stored)."""
    from diffusers import ControlNetModel

    from ..ldm_keys import unet_diffusers_to_ldm

    cn = ControlNetModel.from_pretrained(str(controlnet_dir), local_files_only=True)
    sd = unet_diffusers_to_ldm(cn.state_dict(), dict(cn.config), controlnet=True)
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(
        {"control_model." + k: v.detach().contiguous() for k, v in sd.items()},
        str(tmp),
        metadata={"format": "pt", "xsr.controlnet": "trained", **(metadata or {})},
    )
    os.replace(tmp, out_file)
    return out_file


def stage2_info(adapter_run: str | os.PathLike) -> dict:
    """``final/xsr_stage2.json`` of a stage-2 run ({} for runs from before it existed: the adain variant)."""
    p = Path(adapter_run)
    for cand in (p / "final" / "xsr_stage2.json", p / "xsr_stage2.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}


def export(
    out: str | os.PathLike,
    *,
    rfa: str | None = None,
    i2t: str | None = None,
    adapter: str | None = None,
    name: str | None = None,
) -> dict[str, Path]:
    """Write the given runs' weights under ``out`` (a ComfyUI models/ folder); returns name → path.

    ``adapter`` is a stage-2 run of either variant: the adain variant writes the adapter and its ControlNet,
    the text-only variant (Ours_Base) its ControlNet only.
    """
    from .. import fingerprint as wfp

    if not (rfa or i2t or adapter):
        raise ValueError("export needs at least one of --rfa, --i2t, --adapter")
    out = Path(out)
    paths: dict[str, Path] = {}
    if rfa:
        model = load_model(_final(rfa, "rfa.safetensors"), expected=RFA)
        paths["rfa"] = save_model(model, out / "xsr" / "rfa.safetensors")
    if i2t:
        model, tok = load_i2t(_final(i2t, "i2t.safetensors"))
        paths["i2t"] = save_i2t(model, out / "xsr" / "i2t.safetensors", tok)
    if adapter:
        info = stage2_info(adapter)
        variant = info.get("variant", "adain")
        stem = name or ("xsr" if variant == "adain" else f"xsr_{variant}")
        cn_name = f"{stem}_controlnet.safetensors"
        cn_meta = {
            "xsr.variant": variant,
            **(
                {"xsr.base_unet_fingerprint": info["base_unet_fingerprint"]}
                if info.get("base_unet_fingerprint")
                else {}
            ),
        }
        paths["controlnet"] = export_controlnet(_final(adapter, "controlnet"), out / "controlnet" / cn_name, cn_meta)
        if variant == "adain":
            src = _final(adapter, "adain_adapter.safetensors")
            model = load_model(src, expected=AdaINAdapter)
            extra = {k: v for k, v in read_metadata(src).items() if k in ("xsr.base_unet_fingerprint", "xsr.variant")}
            extra["xsr.controlnet_fingerprint"] = wfp.dumps(wfp.fingerprint_file(paths["controlnet"]))
            extra["xsr.controlnet_file"] = cn_name
            paths["adain_adapter"] = save_model(model, out / "xsr" / "adain_adapter.safetensors", extra_metadata=extra)
    # verify what was written
    if "rfa" in paths:
        load_model(paths["rfa"], expected=RFA)
    if "i2t" in paths:
        load_i2t(paths["i2t"])
    if "adain_adapter" in paths:
        load_model(paths["adain_adapter"], expected=AdaINAdapter)
    logger.info("exported %s", {k: str(v) for k, v in paths.items()})
    return paths
