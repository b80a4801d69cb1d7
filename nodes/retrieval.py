"""XSR_Retrieve: LR -> RFA-aligned CLIP query -> top-K HR references from the reference DB."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import comfy.model_management
from comfy_api.latest import io, ui

from ..xsr_core.imaging import LRImageError, resize_center_crop, validate_lr
from ..xsr_core.refdb import RefDBError
from .common import XSRModels, XSRRefDB, XSRRefs, clip_vision_fingerprint, clip_vision_width, encode_clip, throw_if_interrupted

logger = logging.getLogger(__name__)
THUMB = 256  # side of the reference images this node outputs / previews


@dataclass(eq=False)
class Retrieval:
    """Reference data for I2T (one row per LR image)."""

    lr_tokens: torch.Tensor  # (B, T, D) CLIP tokens of the LR
    ref_tokens: torch.Tensor  # (B, K, T, D) CLIP tokens of the references (zeros where missing)
    ref_mask: torch.Tensor  # (B, K) bool, False for missing references (DB smaller than K)
    ids: np.ndarray  # (B, K) faiss ids (-1 missing)
    scores: np.ndarray  # (B, K) cosine similarity of the RFA query to each reference
    names: list[list[str]]  # source names of the references


def _pil_to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _square(t: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (shortest side) + centre crop an [H,W,3] image to side x side for the reference batch."""
    return resize_center_crop(t[None], side)[0]


class XSRRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XSR_Retrieve",
            display_name="XSR Retrieve References",
            category="xsr",
            description="Aligns the LR's CLIP embedding to the missing HR one (RFA) and retrieves the top-K most "
                        "similar HR references from the reference DB. Each LR image of a batch gets its own references.",
            inputs=[
                io.Image.Input("image", tooltip="LR image(s), at most 64 px per side (32x32 in the paper)"),
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision encoder the DB was built with (ViT-L/14)"),
                XSRModels.Input("xsr_models", tooltip="from XSR Load Models"),
                XSRRefDB.Input("refdb", tooltip="from XSR Load Reference DB"),
                io.Int.Input("top_k", default=4, min=1, max=16, tooltip="references per LR image (the paper uses 4)"),
            ],
            outputs=[
                io.Image.Output("references", display_name="references", tooltip=f"the B*K references, {THUMB}x{THUMB}"),
                XSRRefs.Output("refs", display_name="refs", tooltip="reference data for XSR Enhance"),
                io.String.Output("scores", display_name="scores", tooltip="similarity scores and source names"),
            ],
        )

    @classmethod
    def execute(cls, image, clip_vision, xsr_models, refdb, top_k: int) -> io.NodeOutput:
        try:
            lr = validate_lr(image, what="XSR_Retrieve input 'image'")
        except LRImageError as e:
            raise ValueError(str(e)) from None
        width = clip_vision_width(clip_vision)
        if width != xsr_models.clip_dim:
            raise ValueError(
                f"XSR_Retrieve: the CLIP vision model outputs {width}-d tokens but the RFA ({xsr_models.names.get('rfa')}) "
                f"was trained on {xsr_models.clip_dim}-d tokens; load the CLIP vision encoder the XSR models were "
                "trained with (CLIP ViT-L/14 for the paper's weights)."
            )
        try:
            refdb.check_encoder(clip_vision_fingerprint(clip_vision))
        except RefDBError as e:
            raise ValueError(f"XSR_Retrieve: {e}") from None
        feats = encode_clip(clip_vision, lr, lr=True)
        comfy.model_management.load_model_gpu(xsr_models.rfa)
        rfa = xsr_models.rfa.model
        p = next(rfa.parameters())
        with torch.no_grad():
            query = rfa.query_embedding(feats.tokens.to(device=p.device, dtype=p.dtype)).float().cpu()
        try:
            scores, ids = refdb.search(query, k=top_k)
        except RefDBError as e:
            raise ValueError(f"XSR_Retrieve: {e}") from None
        b, k = ids.shape
        if refdb.n == 0 or k == 0:
            raise ValueError(f"XSR_Retrieve: the reference DB {refdb.path} is empty; build it from HR images first.")
        throw_if_interrupted()
        t, d = feats.tokens.shape[1:]
        ref_tokens = torch.zeros(b, top_k, t, d)
        ref_mask = torch.zeros(b, top_k, dtype=torch.bool)
        thumbs, names, lines = [], [], []
        for i in range(b):
            row_names = []
            valid = [j for j in range(k) if ids[i, j] >= 0]
            try:
                imgs = refdb.load_images([int(ids[i, j]) for j in valid])
                recs = refdb.records([int(ids[i, j]) for j in valid])
            except RefDBError as e:
                raise ValueError(f"XSR_Retrieve: {e}") from None
            hr = [_pil_to_tensor(im) for im in imgs]
            if hr:
                batch = torch.stack([_square(x, 224) for x in hr])
                ref_tokens[i, : len(hr)] = encode_clip(clip_vision, batch, lr=False).tokens
                ref_mask[i, : len(hr)] = True
            for j, (x, rec) in enumerate(zip(hr, recs)):
                thumbs.append(_square(x, THUMB))
                name = os.path.basename(rec.path) or f"#{rec.id}"
                row_names.append(name)
                lines.append(f"image {i} ref {j}: {float(scores[i, valid[j]]):.4f} {name}")
            names.append(row_names)
            throw_if_interrupted()
        refs_image = torch.stack(thumbs) if thumbs else torch.zeros(1, THUMB, THUMB, 3)
        result = Retrieval(feats.tokens, ref_tokens, ref_mask, ids, scores, names)
        gallery = [
            {"image": i, "rank": j, "score": float(scores[i, j]), "name": names[i][j]}
            for i in range(b) for j in range(len(names[i]))
        ]
        ui_out = ui.PreviewImage(refs_image, cls=cls).as_dict()
        ui_out["xsr_refs"] = gallery
        return io.NodeOutput(refs_image, result, "\n".join(lines), ui=ui_out)


def _allowed_roots() -> list[str]:
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory()]
    roots += [r for r in os.environ.get("XSR_REFDB_ALLOWED_ROOTS", "").split(os.pathsep) if r]
    return [os.path.realpath(r) for r in roots]


def resolve_image_folder(folder: str) -> str:
    """A folder of HR images: relative = inside ComfyUI's input dir; absolute = under an allowed root."""
    import folder_paths

    folder = folder.strip()
    if not folder:
        raise ValueError("XSR_BuildReferenceDB: 'images_folder' is empty: name a subfolder of ComfyUI's input folder.")
    path = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
    real = os.path.realpath(path)
    roots = _allowed_roots()
    if not any(real == r or real.startswith(r + os.sep) for r in roots):
        raise ValueError(
            f"XSR_BuildReferenceDB: images_folder '{folder}' is outside the folders this node may read "
            f"({', '.join(roots)}); put the images under ComfyUI's input folder, or list more roots in the "
            "XSR_REFDB_ALLOWED_ROOTS environment variable of the server."
        )
    if not os.path.isdir(real):
        raise ValueError(f"XSR_BuildReferenceDB: images_folder '{folder}' ({real}) is not a folder.")
    return real


class XSRBuildReferenceDB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XSR_BuildReferenceDB",
            display_name="XSR Build Reference DB",
            category="xsr",
            description="Builds (or resumes building) a reference database in models/xsr_refdb from a folder of HR "
                        "images, with the CLIP vision encoder you will query it with. Interrupting keeps the work "
                        "done; queueing again continues. For millions of images use `python -m xsr_core.refdb build`.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision encoder XSR Retrieve will use (ViT-L/14)"),
                io.String.Input("images_folder", default="xsr_references",
                                tooltip="subfolder of ComfyUI's input folder holding the HR reference images "
                                        "(searched recursively)"),
                io.String.Input("db_name", default="my_refdb", tooltip="name of the new DB folder in models/xsr_refdb"),
                io.Combo.Input("mode", options=["packed", "paths"], default="packed",
                               tooltip="packed: resized copies stored in the DB (portable); paths: the DB points at "
                                       "the original files (small, but they must stay in place)"),
            ],
            outputs=[XSRRefDB.Output("refdb", display_name="refdb"),
                     io.String.Output("report", display_name="report", tooltip="what was indexed or skipped")],
        )

    @classmethod
    def execute(cls, clip_vision, images_folder: str, db_name: str, mode: str) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..xsr_core.refdb import BuildConfig, build_db
        from .common import REFDB_FOLDER, ComfyClipEncoder
        from .loaders import open_refdb

        src = resolve_image_folder(images_folder)
        if not db_name or db_name != os.path.basename(db_name) or db_name in (".", "..") or "\\" in db_name:
            raise ValueError(f"XSR_BuildReferenceDB: db_name '{db_name}' must be a plain folder name (no '/', '..').")
        out = os.path.join(folder_paths.get_folder_paths(REFDB_FOLDER)[0], db_name)
        bar: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if "bar" not in bar:
                bar["bar"] = comfy.utils.ProgressBar(total)
            bar["bar"].update_absolute(done, total)

        cfg = BuildConfig(mode=mode, workers=0, device="cpu" if clip_vision.load_device.type == "cpu" else "auto",
                          progress=False, batch_size=32)
        try:
            info = build_db(out, ComfyClipEncoder(clip_vision), images=src, config=cfg, progress_callback=progress)
        except RefDBError as e:
            raise ValueError(f"XSR_BuildReferenceDB: {e}") from None
        counts = info.get("counts", {})
        report = (f"{db_name}: {info.get('n')} references, index {info.get('index', {}).get('key')}, mode {mode}; "
                  f"{counts.get('skipped', 0)} files skipped (details in {out}/report.json)")
        return io.NodeOutput(open_refdb(out), report)
