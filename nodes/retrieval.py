"""XSR_Retrieve: LR -> RFA-aligned CLIP query -> top-K HR references from the reference DB."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from comfy_api.latest import io, ui

from ..xsr_core.imaging import LRImageError, resize_center_crop, validate_lr
from ..xsr_core.paths import env_roots
from ..xsr_core.refdb import RefDBError
from .loaders import offload_after_use
from .graphs import ModuleGraphs
from .common import (
    XSRModels,
    XSRRefDB,
    XSRRefs,
    clip_vision_fingerprint,
    clip_vision_width,
    choice_input,
    encode_clip,
    int_input,
    load_models,
    throw_if_interrupted,
    xsr_schema,
)
from .validation import check_batch, check_folder_name, collect, schema_problems, verdict

logger = logging.getLogger(__name__)
THUMB = 256  # side of the reference images this node outputs / previews
PREVIEW_QUALITY = 95  # JPEG quality of the reference previews XSR writes (thumbnails, non-JPEG sources)


@dataclass(eq=False)
class Retrieval:
    """Reference data for I2T (one row per LR image)."""

    lr_tokens: torch.Tensor  # (B, T, D) CLIP tokens of the LR (on the CLIP vision encoder's device)
    ref_tokens: torch.Tensor  # (B, K, T, D) CLIP tokens of the references (zeros where missing; same device)
    ref_mask: torch.Tensor  # (B, K) bool, False for missing references (DB smaller than K)
    ids: np.ndarray  # (B, K) faiss ids (-1 missing)
    scores: np.ndarray  # (B, K) cosine similarity of the RFA query to each reference
    names: list[list[str]]  # source names of the references


@dataclass(eq=False)
class _CachedRef:
    tokens: torch.Tensor  # (T, D) CLIP tokens on the CPU, in the encoder's output dtype (lossless)
    thumb: torch.Tensor  # (THUMB, THUMB, 3) float32 CPU
    name: str
    full: dict  # ComfyUI temp-preview entry of the full-resolution reference (the gallery's enlarged view)
    preview: dict  # ComfyUI temp-preview entry of the thumbnail (the gallery's grid)


class RefCache:
    """LRU of per-reference work that does not change between prompts: the reference's CLIP tokens and its
    thumbnail with their temp-folder previews, keyed by DB folder + DB signature + encoder fingerprint + row id.

    A repeated reference then costs no image decode, resize, ViT pass or PNG encode. The tokens stay in RAM
    (one small upload per prompt), so the cache takes no VRAM while the sampler runs. ``XSR_REF_CACHE_SIZE``
    (entries, default 128, 0 = off) bounds it: at ViT-L/14 fp16 an entry is ~1.3 MB of RAM.
    """

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._d: OrderedDict[tuple, _CachedRef] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> _CachedRef | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple, value: _CachedRef) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


REF_CACHE = RefCache(int(os.environ.get("XSR_REF_CACHE_SIZE", "128") or 0))


class VisionGraphs(ModuleGraphs):
    """CUDA graphs of the CLIP vision tower (XSR_Retrieve's LR pass and reference pass), one per pixel batch
    shape and dtype and per placement of the weights (:mod:`.graphs`); ``XSR_CLIP_CUDAGRAPH=0`` turns them off."""

    def __call__(self, vm, pix: torch.Tensor):
        return self.run(vm, lambda x: vm(pixel_values=x), (pix,))


VISION_GRAPHS = VisionGraphs()


def _ref_cache_prefix(refdb, clip_vision) -> tuple:
    fp = clip_vision_fingerprint(clip_vision)
    p = next(clip_vision.model.parameters())
    return (str(refdb.path), refdb.signature(), tuple(sorted(fp.items())), str(p.device), str(p.dtype))


def _square(t: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (shortest side) + centre crop an [H,W,3] image to side x side for the reference batch."""
    return resize_center_crop(t[None], side)[0]


_FILE_KINDS = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))  # + RIFF....WEBP below


def _browser_ext(data: bytes) -> str | None:
    """The extension of an image file a browser shows as it is (JPEG, PNG, WebP), else None."""
    for magic, ext in _FILE_KINDS:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _temp_preview(ext: str) -> tuple[str, dict]:
    """A new file in ComfyUI's temp folder (served by /view like its own previews) and its UI entry.

    Named uniquely without scanning the folder (ComfyUI's own preview writer lists the whole temp folder
    for every file, which grows over the server's life)."""
    import folder_paths

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"xsr_ref_{uuid.uuid4().hex}.{ext}"
    return os.path.join(folder, name), {"filename": name, "subfolder": "", "type": "temp"}


def _write_full_preview(data: bytes, rgb: np.ndarray) -> dict:
    """The gallery's enlarged view of a reference: its stored file as it is (a packed DB's JPEG, a paths DB's
    JPEG / PNG / WebP source: no decode or encode), other formats as a JPEG of the decoded RGB."""
    ext = _browser_ext(data)
    path, entry = _temp_preview(ext or "jpg")
    if ext is None:
        Image.fromarray(rgb).save(path, format="JPEG", quality=PREVIEW_QUALITY)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return entry


def _write_thumb_previews(thumbs: torch.Tensor) -> list[dict]:
    """The gallery-grid previews of (N, THUMB, THUMB, 3) thumbnails in 0..1 (ComfyUI's 8-bit conversion),
    as JPEG files: no PNG deflate on the execution thread, no prompt metadata in each file."""
    out = []
    for a in np.clip(255.0 * thumbs.numpy(), 0, 255).astype(np.uint8):
        path, entry = _temp_preview("jpg")
        Image.fromarray(a).save(path, format="JPEG", quality=PREVIEW_QUALITY)
        out.append(entry)
    return out


def _gather_refs(clip_vision, refdb, ids: np.ndarray) -> dict[int, _CachedRef]:
    """Tokens + thumbnail of every distinct retrieved row: cached ones from :data:`REF_CACHE`, the others
    decoded and encoded in ONE batched ViT pass over all LR images' references. The previews of a reference
    (thumbnail and full resolution, temp folder, kept for the server's life) are written once, when it is
    cached; the full-resolution ones while the GPU runs the ViT."""
    prefix = _ref_cache_prefix(refdb, clip_vision) if REF_CACHE.capacity else None
    wanted = sorted({int(x) for x in ids.reshape(-1) if x >= 0})
    out: dict[int, _CachedRef] = {}
    missing = []
    for rid in wanted:
        hit = REF_CACHE.get(prefix + (rid,)) if prefix is not None else None
        if hit is None:
            missing.append(rid)
        else:
            out[rid] = hit
    if missing:
        try:
            loaded = refdb.load_images_and_bytes(missing, as_numpy=True)
            recs = refdb.records(missing)
        except RefDBError as e:
            raise ValueError(f"XSR_Retrieve: {e}") from None
        # decoded bytes go to the encoder's device once; both resizes run there
        dev = clip_vision.load_device
        hr = [torch.from_numpy(np.array(im)).to(dev).float() / 255.0 for im, _ in loaded]  # writable copies
        pix = torch.stack([_square(x, 224) for x in hr])
        bucket = min(int(ids.size), 32)  # pad the misses to a fixed batch: one CUDA graph serves any miss count
        pad = -len(hr) % bucket
        if pad and pix.device.type == "cuda" and VISION_GRAPHS.enabled():
            pix = torch.cat([pix, pix.new_zeros((pad, *pix.shape[1:]))])
        tokens = encode_clip(clip_vision, pix, lr=False, to_intermediate=False, vision=VISION_GRAPHS, load=False).tokens
        tokens = tokens[: len(hr)]
        out_dtype = next(clip_vision.model.parameters()).dtype
        thumbs = torch.stack([_square(x, THUMB) for x in hr])
        fulls = [_write_full_preview(data, im) for im, data in loaded]  # CPU work while the GPU is busy
        tokens = tokens.to(out_dtype).cpu()  # lossless: the encoder's own output dtype
        thumbs = thumbs.cpu()
        previews = _write_thumb_previews(thumbs)
        for rid, thumb, preview, full, rec, tok in zip(missing, thumbs, previews, fulls, recs, tokens):
            name = os.path.basename(rec.path) or f"#{rec.id}"
            entry = _CachedRef(tok.clone(), thumb.clone(), name, full, preview)
            out[rid] = entry
            if prefix is not None:
                REF_CACHE.put(prefix + (rid,), entry)
    throw_if_interrupted()
    return out


class XSRRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_Retrieve",
            "XSR Retrieve References",
            "Aligns the LR's CLIP embedding to the missing HR one (RFA) and retrieves the top-K most "
            "similar HR references from the reference DB. Each LR image of a batch gets its own references.",
            inputs=[
                io.Image.Input("image", tooltip="LR image(s), at most 64 px per side (32x32 in the paper)"),
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision encoder the DB was built with (ViT-L/14)"),
                XSRModels.Input("xsr_models", tooltip="from XSR Load Models"),
                XSRRefDB.Input("refdb", tooltip="from XSR Load Reference DB"),
                int_input("top_k", 4, 1, 16, "references per LR image (the paper uses 4)"),
            ],
            outputs=[
                io.Image.Output(
                    "references", display_name="references", tooltip=f"the B*K references, {THUMB}x{THUMB}"
                ),
                XSRRefs.Output("refs", display_name="refs", tooltip="reference data for XSR Enhance"),
                io.String.Output("scores", display_name="scores", tooltip="similarity scores and source names"),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return verdict(schema_problems(cls, kw))

    @classmethod
    def execute(cls, image, clip_vision, xsr_models, refdb, top_k: int) -> io.NodeOutput:
        max_refs = int(getattr(xsr_models.i2t.model.config, "max_refs", top_k))
        if top_k > max_refs:  # before any work: the I2T could not take the references afterwards
            raise ValueError(
                f"XSR_Retrieve: top_k {top_k} is more references than the I2T "
                f"({xsr_models.names.get('i2t')}) accepts ({max_refs}); set top_k to {max_refs} or less."
            )
        check_batch("XSR_Retrieve", "input 'image'", int(image.shape[0]) if image.ndim == 4 else 1, tiles_ok=True)
        try:
            lr = validate_lr(image, what="XSR_Retrieve input 'image'")
        except LRImageError as e:
            raise ValueError(str(e)) from None
        width = clip_vision_width(clip_vision)
        if width != xsr_models.clip_dim:
            raise ValueError(
                f"XSR_Retrieve: the CLIP vision model outputs {width}-d tokens "
                f"but the RFA ({xsr_models.names.get('rfa')}) "
                f"was trained on {xsr_models.clip_dim}-d tokens; load the CLIP vision encoder the XSR models were "
                "trained with (CLIP ViT-L/14 for the paper's weights)."
            )
        try:
            refdb.check_encoder(clip_vision_fingerprint(clip_vision))
        except RefDBError as e:
            raise ValueError(f"XSR_Retrieve: {e}") from None
        # the encoder stays loaded between prompts (no ComfyUI call for it); XSR_OFFLOAD may have dropped the RFA
        load_models([clip_vision.patcher, xsr_models.rfa])
        feats = encode_clip(clip_vision, lr, lr=True, to_intermediate=False, vision=VISION_GRAPHS, load=False)
        rfa = xsr_models.rfa.model
        p = next(rfa.parameters())
        with torch.no_grad():
            query = rfa.query_embedding(feats.tokens.to(device=p.device, dtype=p.dtype)).float().cpu()
        offload_after_use(xsr_models.rfa, "rfa")  # not needed again for this image (XSR_OFFLOAD)
        try:
            scores, ids = refdb.search(query, k=top_k)
        except RefDBError as e:
            raise ValueError(f"XSR_Retrieve: {e}") from None
        b, k = ids.shape
        if refdb.n == 0 or k == 0:
            raise ValueError(f"XSR_Retrieve: the reference DB {refdb.path} is empty; build it from HR images first.")
        throw_if_interrupted()
        refs = _gather_refs(clip_vision, refdb, ids)
        t, d = feats.tokens.shape[1:]
        dev = feats.tokens.device
        ref_mask = torch.zeros(b, top_k, dtype=torch.bool)
        order, slots, names, lines = [], [], [], []  # the references in (image, rank) order, their flat slots
        for i in range(b):
            row_names = []
            valid = [j for j in range(k) if ids[i, j] >= 0]
            for n, j in enumerate(valid):
                ref = refs[int(ids[i, j])]
                ref_mask[i, n] = True
                order.append(ref)
                slots.append(i * top_k + n)
                row_names.append(ref.name)
                lines.append(f"image {i} ref {n}: {float(scores[i, j]):.4f} {ref.name}")
            names.append(row_names)
        ref_tokens = torch.zeros(b * top_k, t, d, device=dev)
        if order:  # one upload of all references' tokens, one scatter (no per-slot copies, no host sync)
            stacked = torch.stack([r.tokens for r in order]).to(device=dev, dtype=ref_tokens.dtype)
            ref_tokens.index_copy_(0, torch.tensor(slots, device=dev), stacked)
        ref_tokens = ref_tokens.view(b, top_k, t, d)
        refs_image = torch.stack([r.thumb for r in order]) if order else torch.zeros(1, THUMB, THUMB, 3)
        fulls = [r.full for r in order]
        result = Retrieval(feats.tokens, ref_tokens, ref_mask, ids, scores, names)
        gallery = [
            {"image": i, "rank": j, "score": float(scores[i, j]), "name": names[i][j]}
            for i in range(b)
            for j in range(len(names[i]))
        ]
        for entry, full in zip(gallery, fulls):
            entry["full"] = dict(full)
        # not under "images": the frontend would show its stock preview beside web/xsr.js's gallery; the
        # thumbnails' previews were written when their references were first gathered
        thumbs_ui = [dict(r.preview) for r in order] or ui.PreviewImage(refs_image, cls=cls).values
        ui_out = {"xsr_thumbs": thumbs_ui, "xsr_refs": gallery}
        return io.NodeOutput(refs_image, result, "\n".join(lines), ui=ui_out)


def _allowed_roots() -> list[str]:
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory()]
    roots += env_roots()  # XSR_ALLOWED_ROOTS (and the older XSR_REFDB_ALLOWED_ROOTS)
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
            "XSR_ALLOWED_ROOTS environment variable of the server."
        )
    if not os.path.isdir(real):
        raise ValueError(f"XSR_BuildReferenceDB: images_folder '{folder}' ({real}) is not a folder.")
    return real


class XSRBuildReferenceDB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_BuildReferenceDB",
            "XSR Build Reference DB",
            "Builds (or resumes building) a reference database in models/xsr_refdb from a folder of HR "
            "images, with the CLIP vision encoder you will query it with. Interrupting keeps the work "
            "done; queueing again continues. For millions of images use `python -m xsr_core.refdb build`.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision encoder XSR Retrieve will use (ViT-L/14)"),
                io.String.Input(
                    "images_folder",
                    default="xsr_references",
                    tooltip="subfolder of ComfyUI's input folder holding the HR reference images "
                    "(searched recursively)",
                ),
                io.String.Input("db_name", default="my_refdb", tooltip="name of the new DB folder in models/xsr_refdb"),
                choice_input(
                    "mode",
                    ["packed", "paths"],
                    "packed",
                    "packed: resized copies stored in the DB (portable); paths: the DB points at "
                    "the original files (small, but they must stay in place)",
                ),
            ],
            outputs=[
                XSRRefDB.Output("refdb", display_name="refdb"),
                io.String.Output("report", display_name="report", tooltip="what was indexed or skipped"),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        problems = schema_problems(cls, kw, skip=("images_folder", "db_name"))
        if kw.get("images_folder") is not None:
            collect(problems, resolve_image_folder, kw["images_folder"])
        if kw.get("db_name") is not None:
            collect(problems, check_folder_name, "XSR_BuildReferenceDB", "db_name", kw["db_name"], "models/xsr_refdb")
        return verdict(problems)

    @classmethod
    def execute(cls, clip_vision, images_folder: str, db_name: str, mode: str) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..xsr_core.refdb import BuildConfig, build_db
        from .common import REFDB_FOLDER, ComfyClipEncoder
        from .loaders import open_refdb

        src = resolve_image_folder(images_folder)
        check_folder_name("XSR_BuildReferenceDB", "db_name", db_name, "models/xsr_refdb")
        out = os.path.join(folder_paths.get_folder_paths(REFDB_FOLDER)[0], db_name)
        bar: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            throw_if_interrupted()
            if "bar" not in bar:
                bar["bar"] = comfy.utils.ProgressBar(total)
            bar["bar"].update_absolute(done, total)

        # chunk = batch: every encoded batch is committed, so an interrupt keeps finished work at any size
        cfg = BuildConfig(
            mode=mode,
            workers=0,
            device="cpu" if clip_vision.load_device.type == "cpu" else "auto",
            progress=False,
            batch_size=32,
            chunk_size=32,
        )
        try:
            info = build_db(out, ComfyClipEncoder(clip_vision), images=src, config=cfg, progress_callback=progress)
        except RefDBError as e:
            raise ValueError(f"XSR_BuildReferenceDB: {e}") from None
        counts = info.get("counts", {})
        report = (
            f"{db_name}: {info.get('n')} references, index {info.get('index', {}).get('key')}, mode {mode}; "
            f"{counts.get('skipped', 0)} files skipped (details in {out}/report.json)"
        )
        return io.NodeOutput(open_refdb(out), report)
