"""``python -m xsr_core demo``: run the xsr_x16 workflow headless through a real ComfyUI.

Starts ComfyUI (``$COMFYUI_PATH`` or the one ``scripts/setup.sh`` installed) with this pack, runs
``workflows/xsr_x16.json`` (retrieval, I2T caption + image embedding, AdaIN-patched SD1.5 + ControlNet,
colour fix) on an LR image (default: the bundled ``assets/demo_lr.png``, 32x32) and writes the x16
result. An LR larger than 64 px per side (up to 256, any aspect ratio) runs
``workflows/xsr_x16_tiled.json`` instead (per-tile retrieval, tiled diffusion, tiled decode).
Models: the real ones when ``--models`` points at a ComfyUI ``models/`` folder holding them,
else the tiny random-weight zoo and a small reference DB of procedural images (generated on first
use), which exercise the whole pipeline but produce noise-like images: see the README for which
weights are real and which must be trained. ``xsr_graph`` is the same pipeline as an API prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .comfy_server import ComfyServer, find_comfyui, prepare_base_dir
from .workflow import TILED_DECODE, api_node, controlnet_apply, ksampler

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "assets" / "demo_lr.png"
SUPPORT = REPO / "tests" / "comfy" / "support" / "xsr_test_support"


def xsr_graph(
    lr_name: str,
    *,
    ckpt: str,
    controlnet: str,
    clip_vision: str,
    refdb: str,
    rfa: str = "rfa.safetensors",
    i2t: str = "i2t.safetensors",
    adapter: str = "adain_adapter.safetensors",
    steps: int = 20,
    seed: int = 0,
    strength: float = 1.0,
    top_k: int = 4,
    cfg: float = 7.0,
) -> dict:
    """API-format prompt of the full XSR x16 pipeline (the xsr_x16 workflow)."""
    return {
        "lr": api_node("LoadImage", image=lr_name),
        "prep": api_node("XSR_PrepareLR", image=["lr", 0]),
        "ckpt": api_node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "cn": api_node("ControlNetLoader", control_net_name=controlnet),
        "cv": api_node("CLIPVisionLoader", clip_name=clip_vision),
        "models": api_node("XSR_LoadModels", rfa_name=rfa, i2t_name=i2t),
        "db": api_node("XSR_LoadReferenceDB", db_name=refdb),
        "retrieve": api_node(
            "XSR_Retrieve",
            image=["prep", 2],
            clip_vision=["cv", 0],
            xsr_models=["models", 0],
            refdb=["db", 0],
            top_k=top_k,
        ),
        "enhance": api_node(
            "XSR_Enhance",
            xsr_models=["models", 0],
            refs=["retrieve", 1],
            clip=["ckpt", 1],
            max_tokens=32,
            num_beams=1,
            caption_override="",
            extra_prompt="high quality, detailed",
        ),
        "patch": api_node(
            "XSR_AdaINPatch",
            model=["ckpt", 0],
            control_net=["cn", 0],
            adapter_name=adapter,
            strength=strength,
            start_percent=0.0,
            end_percent=1.0,
            apply_to="cond",
            allow_other_controlnet=False,
        ),
        "neg": api_node("CLIPTextEncode", clip=["ckpt", 1], text="blurry, low quality"),
        "apply": controlnet_apply(["enhance", 0], ["neg", 0], ["patch", 1], ["prep", 0]),
        "sample": ksampler(["patch", 0], ["apply", 0], ["apply", 1], ["prep", 1], seed=seed, steps=steps, cfg=cfg),
        "decode": api_node("VAEDecode", samples=["sample", 0], vae=["ckpt", 2]),
        "fix": api_node("XSR_ColorFix", image=["decode", 0], lr=["prep", 2], method="wavelet"),
        "save": api_node("SaveImage", images=["fix", 0], filename_prefix="xsr_x16"),
    }


def xsr_tiled_graph(
    lr_name: str,
    *,
    ckpt: str,
    controlnet: str,
    clip_vision: str,
    refdb: str,
    overlap: int = 8,
    weighting: str = "cosine",
    tile_batch: int = 0,
    tiled_decode: bool = True,
    **kw,
) -> dict:
    """API-format prompt of the tiled XSR x16 pipeline (the xsr_x16_tiled workflow), LR up to 256 px.

    The xsr_graph pipeline with XSR_PrepareLRTiled instead of XSR_PrepareLR (retrieval and I2T on the
    tiles batch), XSR_TiledModel between the patched U-Net and KSampler, VAEDecodeTiled (or VAEDecode
    with ``tiled_decode=False``) and the per-tile reference preview.
    """
    g = xsr_graph(lr_name, ckpt=ckpt, controlnet=controlnet, clip_vision=clip_vision, refdb=refdb, **kw)
    g["prep"] = api_node("XSR_PrepareLRTiled", image=["lr", 0], overlap=overlap)
    g["retrieve"]["inputs"]["image"] = ["prep", 3]
    g["tiled"] = api_node(
        "XSR_TiledModel", model=["patch", 0], tiling=["prep", 4], weighting=weighting, tile_batch=tile_batch
    )
    g["sample"]["inputs"]["model"] = ["tiled", 0]
    if tiled_decode:
        g["decode"] = api_node("VAEDecodeTiled", samples=["sample", 0], vae=["ckpt", 2], **TILED_DECODE)
    g["preview"] = api_node(
        "XSR_TilePreview", tiling=["prep", 4], refs=["retrieve", 1], references=["retrieve", 0], caption=["enhance", 1]
    )
    g["save"]["inputs"]["filename_prefix"] = "xsr_x16_tiled"
    return g


# model file names the shipped workflows use (README "Model files") -> tiny zoo names
SHIPPED_NAMES = {
    "ckpt": "v1-5-pruned-emaonly.safetensors",
    "controlnet": "xsr_controlnet.safetensors",
    "clip_vision": "clip_vision_l.safetensors",
    "refdb": "xsr_refdb",
}
WORKFLOW = REPO / "workflows" / "xsr_x16.json"
TILED_WORKFLOW = REPO / "workflows" / "xsr_x16_tiled.json"
# the tiled workflow's ControlNet file (the XSR-trained one) -> same tiny-zoo / --controlnet substitution
TILED_CONTROLNET = "xsr_controlnet.safetensors"


def pick_workflow(image: str | Path) -> Path:
    """xsr_x16 for LR images up to 64 px per side, xsr_x16_tiled above (up to 256); raises on larger ones."""
    from PIL import Image

    from . import MAX_LR_SIDE
    from .tiling import MAX_TILED_LR_SIDE

    with Image.open(image) as im:
        w, h = im.size
    if max(w, h) > MAX_TILED_LR_SIDE:
        raise SystemExit(
            f"xsr demo: {image} is {w}x{h} px; XSR takes LR images up to {MAX_TILED_LR_SIDE} px per "
            "side (tiled). Downscale or crop it first."
        )
    return TILED_WORKFLOW if max(w, h) > MAX_LR_SIDE else WORKFLOW


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xsr demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=str(DEMO_IMAGE), help="LR image (default: bundled 32x32 demo)")
    parser.add_argument("--out", default=str(REPO / "out"), help="folder for the x16 result")
    parser.add_argument(
        "--workflow",
        default=None,
        help="UI- or API-format workflow (default: xsr_x16, or xsr_x16_tiled for LR images over 64 px)",
    )
    parser.add_argument("--models", default=None, help="ComfyUI models/ folder with real weights")
    parser.add_argument("--ckpt", default=None, help="checkpoint file in models/checkpoints")
    parser.add_argument("--controlnet", default=None, help="ControlNet file in models/controlnet")
    parser.add_argument("--clip-vision", default=None, help="CLIP vision file in models/clip_vision")
    parser.add_argument("--refdb", default=None, help="reference DB folder in models/xsr_refdb")
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: the workflow's; 4 on the tiny zoo)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(REPO / ".demo"), help="ComfyUI base directory to use")
    args = parser.parse_args(argv)
    if args.workflow is None:
        args.workflow = str(pick_workflow(args.image))
    logging.basicConfig(level=logging.INFO, format="[xsr-demo] %(message)s")

    from .workflow import substitute_models
    from .eval.run import unique_node, load_workflow

    base = Path(args.workdir)
    tiny = args.models is None
    prepare_base_dir(base, REPO, extra_nodes=[SUPPORT] if tiny else [])
    models = base / "models"
    names = dict(SHIPPED_NAMES)
    server_args: list[str] = []
    if tiny:
        from .testing.zoo import DEMO_REFDB, ZOO_NAMES, write_zoo

        if not (models / "xsr_refdb" / DEMO_REFDB / "info.json").is_file():
            logger.info("no --models given: writing the tiny random-weight zoo and demo reference DB to %s", models)
            comfy_dir = find_comfyui(REPO)
            write_zoo(models, clip_tokenizer_dir=comfy_dir / "comfy" / "sd1_tokenizer", diffusers_folder=False)
        names.update(ZOO_NAMES)
        steps = args.steps or 4
    else:
        cfg = base / "extra_model_paths.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "xsr_demo": {
                        "base_path": str(Path(args.models).resolve()),
                        "checkpoints": "checkpoints",
                        "controlnet": "controlnet",
                        "clip_vision": "clip_vision",
                        "xsr": "xsr",
                        "xsr_refdb": "xsr_refdb",
                    }
                }
            )
        )
        server_args = ["--extra-model-paths-config", str(cfg)]
        steps = args.steps
    for key in names:
        if getattr(args, key, None):
            names[key] = getattr(args, key)
    mapping = {SHIPPED_NAMES[k]: v for k, v in names.items() if SHIPPED_NAMES[k] != v}
    if names["controlnet"] != TILED_CONTROLNET:
        mapping[TILED_CONTROLNET] = names["controlnet"]

    with ComfyServer(comfy_dir=find_comfyui(REPO), base_dir=base, extra_args=server_args) as server:
        api = substitute_models(load_workflow(Path(args.workflow), server), mapping)
        lr_name = server.upload_image(args.image, name="xsr_demo_lr" + Path(args.image).suffix)
        api[unique_node(api, "LoadImage", "the LR input")]["inputs"]["image"] = lr_name
        for node in api.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["seed"] = args.seed
                if steps:
                    node["inputs"]["steps"] = steps
        logger.info("running %s on %s", Path(args.workflow).name, args.image)
        entry = server.run(api)
        images = server.output_images(entry, unique_node(api, "SaveImage", "the output"))
        caption = entry.get("outputs", {})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / (Path(args.image).stem + "_x16.png")
    dst.write_bytes(images[0])
    for node_out in caption.values():
        if "text" in node_out:
            logger.info("caption: %s", node_out["text"][0])
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
