"""``python -m xsr_core.eval run``: batch x16 inference over a folder through a headless ComfyUI.

    python -m xsr_core.eval run --input TEST_DIR --out SR_DIR [--workflow workflows/xsr_x16.json]
        [--models /path/to/ComfyUI/models] [--set KSampler.steps=50 ...] [--seed 0] [--input-kind auto|hr|lr]

- Input: a folder of HR test images (the 32x32 LR is made exactly as in training, by
  :func:`xsr_core.imaging.hr_lr_pair`: shortest side to 512 + centre crop with PyTorch bicubic, then
  ``make_lr``, antialiased PyTorch bicubic /16) or of LR images. The exact HR crop that was degraded
  is saved as ``SR_DIR/hr_crop/<name>.png`` and the LR as ``SR_DIR/lr/<name>.png``, so
  ``eval metrics --sr SR_DIR`` scores against the very pixels the LR came from.
- The workflow (UI format as saved by the frontend, or API format) is run once per image through a
  ComfyUI server this command starts (``$COMFYUI_PATH``, the ComfyUI whose ``custom_nodes`` holds
  this pack, or the one from scripts/setup.sh), with its
  single LoadImage node fed the LR and its single SaveImage node's output written to
  ``SR_DIR/<same name>.png``.
- Resumable: an image whose output exists is skipped (outputs are written atomically), so killing the
  run and starting it again finishes only the missing images. Seeds are ``--seed + index`` in sorted
  file order and are recorded, with the workflow hash, in ``SR_DIR/run.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import MAX_LR_SIDE, SCALE
from ..cli_common import error_status, options
from ..comfy_server import ComfyServer, find_comfyui, prepare_base_dir
from ..image_io import IMAGE_EXTENSIONS, load_rgb8
from ..imaging import HR_SIDE, hr_lr_pair

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
IMAGE_EXTS = set(IMAGE_EXTENSIONS)  # the one list (xsr_core.image_io)
HR_CROP_DIR, LR_DIR = "hr_crop", "lr"  # sub-folders of SR_DIR (eval metrics skips them)


class RunError(ValueError):
    """Bad inputs for the batch run (folder, workflow, overrides)."""


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise RunError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise RunError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}")
    return files


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]  # (1, H, W, 3)


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].numpy() * 255).round().clip(0, 255).astype(np.uint8))


def hr_crop_and_lr(img: Image.Image, side: int = HR_SIDE, scale: int = SCALE) -> tuple[Image.Image, Image.Image]:
    """The evaluation degradation = the training one (:func:`xsr_core.imaging.hr_lr_pair`): (HR crop, LR)."""
    crop, lr = hr_lr_pair(_to_tensor(img), side, scale)
    return _to_pil(crop), _to_pil(lr)


def hr_to_lr(img: Image.Image, side: int = HR_SIDE, scale: int = SCALE) -> Image.Image:
    """The LR of :func:`hr_crop_and_lr`."""
    return hr_crop_and_lr(img, side, scale)[1]


def load_workflow(path: Path, server: ComfyServer | None) -> dict[str, Any]:
    """API-format prompt from a workflow file (UI format is converted with the server's object_info)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"workflow {path}: cannot read JSON ({e})") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        if server is None:
            raise RunError("a UI-format workflow needs the server's object_info to convert")
        from ..workflow import ui_to_api

        return ui_to_api(data, server.object_info())
    if isinstance(data, dict) and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return data
    raise RunError(f"workflow {path} is neither ComfyUI UI format (nodes/links) nor API format")


def unique_node(api: dict, class_type: str, what: str) -> str:
    """Id of the one node of ``class_type`` in an API prompt (RunError if there are none or several)."""
    ids = [k for k, v in api.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise RunError(f"the workflow must have exactly one {class_type} node ({what}); it has {len(ids)}")
    return ids[0]


# --model ROLE=FILE: the model-file inputs of the shipped workflows, by role (instead of one --set each)
MODEL_ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "ckpt": (("CheckpointLoaderSimple", "ckpt_name"),),
    "controlnet": (("ControlNetLoader", "control_net_name"),),
    "clip_vision": (("CLIPVisionLoader", "clip_name"),),
    "rfa": (("XSR_LoadModels", "rfa_name"),),
    "i2t": (("XSR_LoadModels", "i2t_name"),),
    "adapter": (("XSR_AdaINPatch", "adapter_name"),),
    "refdb": (("XSR_LoadReferenceDB", "db_name"),),
}


def parse_model_names(items: list[str]) -> dict[str, str]:
    """``ROLE=FILE`` items (or a JSON file ``{role: file}`` given as ``@path``) → {role: file}."""
    out: dict[str, str] = {}
    for item in items:
        if item.startswith("@"):
            try:
                data = json.loads(Path(item[1:]).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RunError(f"--model {item}: cannot read a JSON object of role -> file ({e})") from None
            if not isinstance(data, dict):
                raise RunError(f"--model {item}: expected a JSON object of role -> file")
            pairs = [(str(k), str(v)) for k, v in data.items()]
        else:
            role, sep, name = item.partition("=")
            if not sep or not name:
                raise RunError(f"--model {item!r}: expected ROLE=FILE with ROLE one of {', '.join(MODEL_ROLES)}")
            pairs = [(role, name)]
        for role, name in pairs:
            if role not in MODEL_ROLES:
                raise RunError(f"--model {role}=...: unknown role; choose from {', '.join(MODEL_ROLES)}")
            out[role] = name
    return out


def apply_model_names(api: dict, names: dict[str, str]) -> None:
    """Set the model-file inputs of ``api`` named by role (a role whose node is absent is an error)."""
    for role, name in names.items():
        hit = False
        for class_type, inp in MODEL_ROLES[role]:
            for node in api.values():
                if node["class_type"] == class_type:
                    node["inputs"][inp] = name
                    hit = True
        if not hit:
            raise RunError(
                f"--model {role}={name}: the workflow has no {' / '.join(c for c, _ in MODEL_ROLES[role])} node"
            )


def apply_overrides(api: dict, overrides: list[str]) -> None:
    """``NODE.INPUT=VALUE`` where NODE is a node id or a class_type (all nodes of it); VALUE is JSON or text."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        node, dot, inp = key.rpartition(".")
        if not sep or not dot:
            raise RunError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        targets = [k for k, v in api.items() if k == node or v["class_type"] == node]
        if not targets:
            raise RunError(f"--set {item!r}: no node with id or class_type {node!r}")
        for t in targets:
            api[t]["inputs"][inp] = value


def _write_captions(out_dir: Path, manifest: dict[str, Any]) -> None:
    """``captions.jsonl``: the caption (XSR_Enhance text) each SR image was generated with."""
    rows = [
        json.dumps({"image": m["output"], "caption": m["caption"]})
        for m in manifest["images"].values()
        if m.get("caption") is not None
    ]
    if rows:
        part = out_dir / "captions.jsonl.part"
        part.write_text("\n".join(rows) + "\n", encoding="utf-8")
        os.replace(part, out_dir / "captions.jsonl")


def db_test_exclusion(db_dir: Path) -> set[str] | None:
    """SHA-256s of the files a reference DB was deduplicated against (``train prepare``'s test split, or
    ``refdb build --exclude``); None when it records none."""
    from ..train.data import TEST_EXCLUSION

    p = db_dir / TEST_EXCLUSION
    if p.is_file():
        return set(json.loads(p.read_text()).get("test_sha256", []))
    try:
        from ..refdb.store import Manifest

        with Manifest(db_dir) as man:
            hashes = set(man.exclude_hashes())
    except Exception:  # no build manifest (a copied DB without build/)
        return None
    return hashes or None


def check_refdb_exclusion(api: dict, files: list[Path], models_root: Path | None, allow: bool) -> dict[str, Any]:
    """Refuse a reference DB that was not deduplicated against these test images (unless ``allow``).

    Every HR test file's SHA-256 must be in the DB's exclusion record; the CLS-cosine dedup of
    ``train prepare`` then guarantees no near-duplicate of it is a reference.
    """
    names = [v["inputs"].get("db_name") for v in api.values() if v["class_type"] == "XSR_LoadReferenceDB"]
    report: dict[str, Any] = {"allowed": allow, "dbs": {}}
    for name in names:
        if not isinstance(name, str):
            continue
        db_dir = models_root / "xsr_refdb" / name if models_root else None
        if db_dir is None or not db_dir.is_dir():
            msg = (
                f"cannot find the reference DB {name!r} ({db_dir or 'no models folder'}) to check that it excludes "
                "the test images"
            )
        else:
            excluded = db_test_exclusion(db_dir)
            hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
            missing = [p.name for p, h in hashes.items() if excluded is None or h not in excluded]
            report["dbs"][name] = {"checked": len(files), "not_excluded": len(missing)}
            if not missing:
                continue
            msg = (
                f"the reference DB {name!r} was not deduplicated against {len(missing)} of the {len(files)} test "
                f"images (e.g. {missing[:3]}): it may hold them or near-duplicates, which inflates every metric. "
                "Use the DB `train prepare` built for this test split, or `refdb build --exclude TEST_DIR`"
            )
        if not allow:
            raise RunError(msg + "; or pass --allow-unexcluded-db to run anyway")
        logger.warning("%s (allowed by --allow-unexcluded-db)", msg)
    return report


def run_folder(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workflow: str | os.PathLike,
    models: str | os.PathLike | None = None,
    overrides: list[str] = (),
    seed: int = 0,
    model_names: dict[str, str] | None = None,
    allow_unexcluded_db: bool = False,
    input_kind: str = "auto",
    hr_side: int = HR_SIDE,
    workdir: str | os.PathLike | None = None,
    extra_nodes: list[Path] = (),
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run ``workflow`` on every image of ``input_dir``; returns the run manifest (also in out/run.json)."""
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    files = list_images(input_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"images": {}}
    wf_bytes = Path(workflow).read_bytes()
    manifest.update(
        {
            "workflow": str(workflow),
            "workflow_sha256": hashlib.sha256(wf_bytes).hexdigest(),
            "input": str(input_dir),
            "seed_base": seed,
            "overrides": list(overrides),
            "hr_side": hr_side,
            "models": dict(model_names or {}),
            "scale": SCALE,
            "hr_crop_dir": HR_CROP_DIR,
            "geometry": "xsr_core.imaging.hr_lr_pair",
        }
    )
    todo = [
        (i, p) for i, p in enumerate(files) if not (out_dir / p.relative_to(input_dir).with_suffix(".png")).is_file()
    ]
    logger.info("%d images, %d done, %d to run", len(files), len(files) - len(todo), len(todo))
    if not todo:
        return manifest
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(workdir) if workdir else Path(tmp) / "comfy"
        prepare_base_dir(base, REPO, extra_nodes=list(extra_nodes))
        server_args = []
        if models:
            cfg = base / "extra_model_paths.yaml"
            cfg.write_text(
                json.dumps(
                    {
                        "xsr_eval": {
                            "base_path": str(Path(models).resolve()),
                            "checkpoints": "checkpoints",
                            "controlnet": "controlnet",
                            "clip_vision": "clip_vision",
                            "xsr": "xsr",
                            "xsr_refdb": "xsr_refdb",
                            "vae": "vae",
                            "diffusion_models": "diffusion_models",
                            "text_encoders": "text_encoders",
                        }
                    }
                )
            )
            server_args = ["--extra-model-paths-config", str(cfg)]
        with ComfyServer(comfy_dir=find_comfyui(REPO), base_dir=base, extra_args=server_args) as server:
            api = load_workflow(Path(workflow), server)
            apply_model_names(api, dict(model_names or {}))
            apply_overrides(api, list(overrides))
            models_root = Path(models) if models else find_comfyui(REPO) / "models"
            hr_files = [
                p
                for _, p in todo
                if input_kind == "hr" or (input_kind == "auto" and max(Image.open(p).size) > MAX_LR_SIDE)
            ]
            manifest["refdb_exclusion"] = check_refdb_exclusion(api, hr_files, models_root, allow_unexcluded_db)
            load_id = unique_node(api, "LoadImage", "the LR input")
            save_id = unique_node(api, "SaveImage", "the SR output")
            samplers = [k for k, v in api.items() if "seed" in v["inputs"] or "noise_seed" in v["inputs"]]
            enhancers = [k for k, v in api.items() if v["class_type"] == "XSR_Enhance"]
            start = time.monotonic()
            for n, (i, path) in enumerate(tqdm(todo, desc="xsr eval run", unit="img"), 1):
                rel = path.relative_to(input_dir)
                img = load_rgb8(path, what=f"input image {path}")
                kind = input_kind if input_kind != "auto" else ("lr" if max(img.size) <= MAX_LR_SIDE else "hr")
                if kind == "lr":
                    lr, crop = img.convert("RGB"), None
                else:
                    crop, lr = hr_crop_and_lr(img, hr_side)
                lr_path = Path(tmp) / f"lr_{i:06d}.png"
                lr.save(lr_path)
                name = server.upload_image(lr_path, name=f"xsr_eval_{i:06d}.png")
                prompt = json.loads(json.dumps(api))
                prompt[load_id]["inputs"]["image"] = name
                for s in samplers:
                    key = "seed" if "seed" in prompt[s]["inputs"] else "noise_seed"
                    prompt[s]["inputs"][key] = seed + i
                entry = server.run(prompt, timeout=timeout)
                data = server.output_images(entry, save_id)
                if not data:
                    raise RunError(f"the workflow produced no image at its SaveImage node for {path}")
                dst = out_dir / rel.with_suffix(".png")
                dst.parent.mkdir(parents=True, exist_ok=True)
                part = dst.with_suffix(".png.part")
                entry_m = {"seed": seed + i, "output": str(dst.relative_to(out_dir)), "lr_from": kind}
                texts = [t for k in enhancers for t in (entry.get("outputs", {}).get(k, {}).get("text") or [])]
                if len(enhancers) == 1 and texts:  # the text condition of this SR image (CLIP-Score, eval metrics)
                    entry_m["caption"] = str(texts[0])
                if crop is not None:  # the exact HR pixels the LR was made from, and the LR itself
                    for sub, im in ((HR_CROP_DIR, crop), (LR_DIR, lr)):
                        p = out_dir / sub / rel.with_suffix(".png")
                        p.parent.mkdir(parents=True, exist_ok=True)
                        im.save(p.with_suffix(".part.png"))
                        os.replace(p.with_suffix(".part.png"), p)
                    entry_m.update(
                        hr_crop=f"{HR_CROP_DIR}/{rel.with_suffix('.png').as_posix()}",
                        lr=f"{LR_DIR}/{rel.with_suffix('.png').as_posix()}",
                    )
                part.write_bytes(data[0])
                os.replace(part, dst)  # written last: its presence marks a finished image
                manifest["images"][str(rel)] = entry_m
                tmp_m = manifest_path.with_suffix(".json.part")
                tmp_m.write_text(json.dumps(manifest, indent=1))
                os.replace(tmp_m, manifest_path)
                _write_captions(out_dir, manifest)
                logger.debug("%s done (%d/%d, %.1f s/img)", rel, n, len(todo), (time.monotonic() - start) / n)
    return manifest


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    argv = getattr(args, "run_args", args)
    parser = argparse.ArgumentParser(prog="xsr eval run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of HR (or LR) test images")
    parser.add_argument("--out", required=True, help="folder for the SR outputs (same names, .png)")
    parser.add_argument(
        "--workflow",
        default=str(REPO / "workflows" / "xsr_x16.json"),
        help="workflow JSON (UI or API format); default: workflows/xsr_x16.json",
    )
    parser.add_argument("--models", default=None, help="a ComfyUI models/ folder to use (extra_model_paths)")
    parser.add_argument(
        "--model",
        dest="model_names",
        action="append",
        default=[],
        metavar="ROLE=FILE",
        help=f"model file by role ({', '.join(MODEL_ROLES)}), e.g. --model ckpt=my_sd15.safetensors; "
        "repeatable, or @names.json holding {role: file}",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a node input: NODE.INPUT=VALUE (NODE = id or class_type), repeatable",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i gets seed + i")
    parser.add_argument(
        "--input-kind",
        choices=("auto", "hr", "lr"),
        default="auto",
        help=f"auto: images larger than {MAX_LR_SIDE} px are HR and get degraded to LR",
    )
    parser.add_argument(
        "--hr-side",
        type=int,
        default=HR_SIDE,
        help=f"HR inputs are centre-cropped to this square before the /{SCALE} degradation (paper: 512)",
    )
    parser.add_argument("--extra-node", action="append", default=[], help="another custom node folder to load")
    parser.add_argument(
        "--allow-unexcluded-db",
        action="store_true",
        help="run even when the reference DB was not deduplicated against these test images",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[xsr-eval] %(message)s")
    from ..comfy_server import ComfyError

    try:
        m = run_folder(
            ns.input,
            ns.out,
            **options(ns, "workflow models overrides seed input_kind hr_side allow_unexcluded_db"),
            model_names=parse_model_names(ns.model_names),
            extra_nodes=[Path(p) for p in ns.extra_node],
        )
    except (RunError, ComfyError, OSError) as e:
        if ns.verbose:
            raise
        return error_status(e, "xsr eval run", first_line=True)
    print(f"{len(m['images'])} SR images in {ns.out}")
    return 0
