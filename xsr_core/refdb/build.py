"""Build, extend, merge and export reference DBs (DESIGN §2.2) — resumable and deterministic.

Pipeline: discover files (sorted → sequence numbers) → manifest → for each pending *chunk* (files
with ``seq // chunk_size == g``): multi-worker decode + hash + CLIP crop (DataLoader, PIL) → encode
CLS on the device (fp16 on GPU) → write the chunk's embeddings (and packed JPEGs) atomically →
commit the chunk in one SQLite transaction. ``finalize`` then drops exact duplicates (content
sha256, first occurrence wins), evaluation images (``--exclude``: same bytes, or CLS cosine ≥
threshold), builds the faiss index over the remaining rows in sequence order and writes
meta.sqlite / report.json / info.json.

Because ids follow sequence numbers and chunks are fixed by ``seq // chunk_size``, a killed and
resumed build, a sharded build (``shard i/n`` processes the chunks with ``g % n == i``) merged
with :func:`merge_shards`, and a single uninterrupted build all produce the same DB.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..clip_preprocess import PREPROCESS_VERSION, resize_crop_u8
from . import index as index_mod
from .images import (DEFAULT_MIN_SIDE, PACK_QUALITY, PACK_SIDE, DecodedSample, ImageSkip, decode_image,
                     discover_images, pack_image, read_list_file, sha256_bytes)
from .store import (EMB_DIR, EXCLUDE_EMB, INDEX, INFO, META, PACKED_DIR, REPORT, DB_FORMAT_VERSION,
                    Manifest, RefDBError, write_json_atomic, write_meta, write_npy_atomic, write_bytes_atomic)

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """Options of a DB build (``build`` / ``add`` CLI flags)."""

    mode: str = "paths"  # "paths": meta stores source paths; "packed": resized JPEGs stored in the DB
    batch_size: int = 64  # images per encoder forward pass
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))  # decoding processes (0: inline)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (fp16 on GPU, fp32 on CPU), "fp16", "bf16", "fp32"
    index: str = "auto"  # "auto" or a faiss index_factory key ("Flat", "IVF1024_HNSW32,SQ8", "HNSW32", ...)
    chunk_size: int = 4096  # files per committed chunk (the unit of resume); fixed for the life of a DB
    min_side: int = DEFAULT_MIN_SIDE  # images with a smaller side are skipped
    exclude_threshold: float = 0.95  # drop references whose CLS cosine to an --exclude image is >= this
    shard: tuple[int, int] = (0, 1)  # (i, n): build only chunks g with g % n == i (merge afterwards)
    pack_side: int = PACK_SIDE  # packed mode: shortest side of stored references (never enlarged)
    pack_quality: int = PACK_QUALITY  # packed mode: JPEG quality
    max_memory_gb: float | None = None  # index memory budget for the automatic choice (default: RAM / 2)
    threads: int | None = None  # faiss / torch CPU threads (None: library default)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        if self.mode not in ("paths", "packed"):
            raise ValueError(f"mode must be 'paths' or 'packed', got {self.mode!r}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if self.precision not in ("auto", "fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be auto/fp16/bf16/fp32, got {self.precision!r}")
        if not 0.0 < self.exclude_threshold <= 1.0:
            raise ValueError(f"exclude_threshold must be in (0, 1], got {self.exclude_threshold}")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        if self.min_side < 1 or self.pack_side < 16 or not 1 <= self.pack_quality <= 100:
            raise ValueError("min_side >= 1, pack_side >= 16 and 1 <= pack_quality <= 100 are required")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    return i, n


# ------------------------------------------------------------------------------- decoding workers

class _FileDataset(torch.utils.data.Dataset):
    """(seq, path) items → :class:`DecodedSample` (runs in DataLoader workers).

    With ``raw_max_pixels`` set, images up to that many pixels are returned decoded but uncropped
    (``raw``) so the CLIP crop runs on the GPU (:func:`batch_pixels`): decoding is then the only
    per-image CPU work. Larger images are cropped here, so batches never carry huge buffers.
    """

    def __init__(self, items: Sequence[tuple[int, str]], *, min_side: int, pack: tuple[int, int] | None,
                 size: int = 224, raw_max_pixels: int | None = None, draft: bool = True):
        self.items = list(items)
        self.draft = draft
        self.min_side = min_side
        self.pack = pack
        self.size = size
        self.raw_max_pixels = raw_max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodedSample:
        seq, path = self.items[i]
        sha = None
        try:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageSkip(f"cannot read ({e.strerror or e})") from None
            sha = sha256_bytes(data)
            # no draft when packing: the stored packed copy stays the full-decode one
            rgb = decode_image(data, min_side=self.min_side, what=path,
                               draft_side=self.size if self.draft and not self.pack else None)
            w, h = rgb.info.get("xsr_source_size", rgb.size)
            packed = pack_image(rgb, side=self.pack[0], quality=self.pack[1]) if self.pack else None
            arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable (torch shares it without a warning)
            if self.raw_max_pixels and w * h <= self.raw_max_pixels:
                return DecodedSample(seq, True, None, sha, w, h, None, packed, raw=arr)
            pixels = resize_crop_u8(torch.from_numpy(arr).unsqueeze(0), self.size)[0].numpy()
            return DecodedSample(seq, True, None, sha, w, h, pixels, packed)
        except ImageSkip as e:
            return DecodedSample(seq, False, str(e), sha, 0, 0, None, None)
        except Exception as e:  # noqa: BLE001 - any decoder bug must skip the file, not kill a long build
            return DecodedSample(seq, False, f"unexpected decoding error ({type(e).__name__}: {e})", sha, 0, 0,
                                 None, None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class DecodedBatch:
    """A batch from the build loader: per-file results + the image data of its ok files.

    Crossing the worker → main process boundary costs one shared-memory tensor per kind of data
    (not one pickled array per image): ``crops`` stacks the worker-made CLIP crops, ``raw`` is the
    concatenation of the uncropped images, ``raw_shapes`` their (H, W) and ``order`` says, per ok
    file in file order, which of the two holds it (0 = crops, 1 = raw) and at which position.
    """

    samples: list[DecodedSample]  # in file order; image data moved to the tensors below
    crops: torch.Tensor | None  # uint8 (n_crops, 3, 224, 224)
    raw: torch.Tensor | None  # uint8 (sum of H*W*3,)
    raw_shapes: list[tuple[int, int]]
    order: list[tuple[int, int]]

    def pin_memory(self) -> "DecodedBatch":  # called by the DataLoader's pin-memory thread
        pin = (lambda t: t.pin_memory() if t is not None else None)
        return DecodedBatch(self.samples, pin(self.crops), pin(self.raw), self.raw_shapes, self.order)

    @property
    def n_ok(self) -> int:
        return len(self.order)


def _collate(samples: list[DecodedSample]) -> DecodedBatch:
    crops, raws, shapes, order = [], [], [], []
    for s in samples:
        if not s.ok:
            continue
        if s.raw is not None:
            order.append((1, len(raws)))
            raws.append(torch.from_numpy(s.raw).reshape(-1))
            shapes.append((s.raw.shape[0], s.raw.shape[1]))
        else:
            order.append((0, len(crops)))
            crops.append(torch.from_numpy(s.pixels))
        s.pixels = s.raw = None
    return DecodedBatch(samples, torch.stack(crops) if crops else None, torch.cat(raws) if raws else None,
                        shapes, order)


def batch_pixels(batch: DecodedBatch, device: torch.device, size: int = 224) -> torch.Tensor | None:
    """uint8 CLIP crops (n_ok, 3, size, size) of a batch's ok files on ``device`` (file order).

    Raw images are cropped on ``device`` with the same :func:`resize_crop_u8` the workers use.
    """
    if not batch.order:
        return None
    crops = batch.crops.to(device, non_blocking=True) if batch.crops is not None else None
    done = []
    if batch.raw is not None:
        flat = batch.raw.to(device, non_blocking=True)
        off = 0
        for h, w in batch.raw_shapes:
            img = flat[off : off + h * w * 3].view(1, h, w, 3)
            off += h * w * 3
            done.append(resize_crop_u8(img, size)[0])
    return torch.stack([crops[i] if kind == 0 else done[i] for kind, i in batch.order])


def make_loader(items: Sequence[tuple[int, str]], batches: list[list[int]], *, workers: int, min_side: int,
                pack: tuple[int, int] | None, pin_memory: bool = False, raw_max_pixels: int | None = None,
                draft: bool = True) -> torch.utils.data.DataLoader:
    """The build data loader: decoding in ``workers`` processes, batches in the given order.

    ``raw_max_pixels``: leave the CLIP crop of images up to this size to :func:`batch_pixels` on
    the GPU (use :data:`RAW_MAX_PIXELS` when encoding on CUDA; None on CPU). ``draft``: decode JPEGs
    at the smallest libjpeg scale that keeps the shortest side >= the CLIP input (not when packing).
    """
    ds = _FileDataset(items, min_side=min_side, pack=pack, raw_max_pixels=raw_max_pixels, draft=draft)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                                       pin_memory=pin_memory, **kwargs)


RAW_MAX_PIXELS = 2_100_000  # up to ~1920x1080 the crop runs on the GPU; larger images are cropped in workers


# ------------------------------------------------------------------------------------- encoding

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefDBError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_encoder(path, device: str = "auto", precision: str = "auto"):
    """Load the CLIP vision encoder file for building (fp16 weights on GPU unless told otherwise).

    An already-built encoder object is returned as is: anything with ``fingerprint`` (dict),
    ``dim``, ``device``, ``source`` and ``encode_cls_u8(uint8 (B,3,224,224)) -> (B, D)`` works, e.g.
    a :class:`~xsr_core.clip_vision.ClipVisionEncoder` or a wrapper around a ComfyUI CLIP_VISION.
    """
    from ..clip_vision import ClipVisionEncoder

    if hasattr(path, "encode_cls_u8"):
        return path
    dev = resolve_device(device)
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return ClipVisionEncoder.from_file(path, device=dev, dtype=dtype)


def _encode(encoder, x: torch.Tensor) -> np.ndarray:
    """CLS of uint8 crops (B, 3, 224, 224) → L2-normalised float32 (B, D)."""
    if encoder.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    cls = encoder.encode_cls_u8(x)
    return index_mod.normalize(cls.float().cpu().numpy())


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05)


def process_pending(db_dir: str | os.PathLike, manifest: Manifest, encoder, cfg: BuildConfig,
                    progress_callback: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Decode, encode and commit every pending chunk of this shard; return counts of this run.

    Each chunk is committed atomically, so this can be killed at any time and called again.
    ``progress_callback(done, total)`` is called after every batch; it may raise to interrupt
    (e.g. ComfyUI's ``throw_exception_if_processing_interrupted``): committed chunks are kept.
    """
    db_dir = Path(db_dir)
    chunk_size = int(manifest.get("chunk_size"))
    mode = manifest.get("mode")
    i, n = cfg.shard
    groups: dict[int, list[tuple[int, str]]] = {}
    for seq, path in manifest.pending():
        g = seq // chunk_size
        if g % n == i:
            groups.setdefault(g, []).append((seq, path))
    items = [it for g in sorted(groups) for it in groups[g]]
    if not items:
        return {"processed": 0}
    batches, start = [], 0
    group_sizes = []
    for g in sorted(groups):
        m = len(groups[g])
        group_sizes.append(m)
        batches.extend(list(range(s, min(s + cfg.batch_size, start + m))) for s in range(start, start + m, cfg.batch_size))
        start += m
    pack = (int(manifest.get("pack_side")), int(manifest.get("pack_quality"))) if mode == "packed" else None
    on_gpu = encoder.device.type == "cuda"
    loader = make_loader(items, batches, workers=cfg.workers, min_side=int(manifest.get("min_side")), pack=pack,
                         pin_memory=on_gpu, raw_max_pixels=RAW_MAX_PIXELS if on_gpu else None)
    (db_dir / EMB_DIR).mkdir(parents=True, exist_ok=True)
    if pack:
        (db_dir / PACKED_DIR).mkdir(parents=True, exist_ok=True)
    n_ok = n_skip = done_files = 0
    gi, buf_samples, buf_emb = 0, [], []
    t0 = time.time()
    with _progress(len(items), f"encoding {db_dir.name}", cfg.progress) as bar:
        for batch in loader:
            if batch.n_ok:
                buf_emb.append(_encode(encoder, batch_pixels(batch, encoder.device)))
            buf_samples.extend(batch.samples)
            bar.update(len(batch.samples))
            done_files += len(batch.samples)
            while gi < len(group_sizes) and len(buf_samples) >= group_sizes[gi]:
                take = group_sizes[gi]
                samples, buf_samples = buf_samples[:take], buf_samples[take:]
                k_ok = sum(s.ok for s in samples)
                emb_all = np.concatenate(buf_emb) if buf_emb else np.zeros((0, encoder.dim), np.float32)
                emb, rest = emb_all[:k_ok], emb_all[k_ok:]
                buf_emb = [rest] if len(rest) else []
                _commit_chunk(db_dir, manifest, samples, emb, pack is not None)
                n_ok += k_ok
                n_skip += take - k_ok
                gi += 1
            if progress_callback is not None:
                progress_callback(done_files, len(items))
    dt = time.time() - t0
    logger.info("encoded %d images (%d skipped) in %.1f s (%.1f img/s)", n_ok, n_skip, dt, len(items) / max(dt, 1e-9))
    return {"processed": len(items), "ok": n_ok, "skipped": n_skip}


def _commit_chunk(db_dir: Path, manifest: Manifest, samples: list[DecodedSample], emb: np.ndarray,
                  packed: bool) -> None:
    name = f"{samples[0].seq:012d}"
    emb_file = pack_file = None
    results, row, offset, blobs = [], 0, 0, []
    for s in samples:
        r = dict(seq=s.seq, status="ok" if s.ok else "skipped", reason=s.reason, sha256=s.sha256,
                 width=s.width or None, height=s.height or None, row=None, pack_offset=None, pack_length=None)
        if s.ok:
            r["row"] = row
            row += 1
            if packed:
                r["pack_offset"], r["pack_length"] = offset, len(s.packed)
                blobs.append(s.packed)
                offset += len(s.packed)
        else:
            logger.warning("skipping %s: %s", manifest.conn.execute("SELECT path FROM files WHERE seq=?",
                                                                    (s.seq,)).fetchone()[0], s.reason)
        results.append(r)
    if row:
        emb_file = f"{EMB_DIR}/emb_{name}.npy"
        write_npy_atomic(db_dir / emb_file, emb.astype(np.float32))
        if packed:
            pack_file = f"{PACKED_DIR}/part_{name}.bin"
            write_bytes_atomic(db_dir / pack_file, b"".join(blobs))
    delay = float(os.environ.get("XSR_REFDB_TEST_COMMIT_DELAY", "0") or 0)
    if delay:  # crash-safety tests: widen the window between writing a chunk and committing it
        time.sleep(delay)
    manifest.commit_chunk(name, samples[0].seq, results, emb_file, pack_file)


# ------------------------------------------------------------------------------------ finalize

def _gather_vectors(db_dir: Path, rows: list, dim: int) -> np.ndarray:
    out = np.empty((len(rows), dim), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for j, r in enumerate(rows):
        f = r["emb_file"]
        if f not in cache:
            cache.clear()  # rows come in seq order: one chunk at a time
            p = db_dir / f
            if not p.is_file():
                raise RefDBError(f"{db_dir}: embedding chunk {f} is missing; the build folder is damaged. "
                                 "Delete the DB folder and rebuild it.")
            cache[f] = np.load(p, mmap_mode="r", allow_pickle=False)
        out[j] = cache[f][r["row"]]
    return out


def finalize(db_dir: str | os.PathLike, *, index_key: str | None = None, max_memory_gb: float | None = None,
             threads: int | None = None) -> dict[str, Any]:
    """Build index.faiss / meta.sqlite / report.json / info.json from the committed chunks.

    Deterministic in the manifest's sequence order. Raises :class:`RefDBError` if no usable image
    is left (report.json still lists why).
    """
    db_dir = Path(db_dir)
    with Manifest(db_dir) as man:
        counts = man.counts()
        if counts.get("pending"):
            raise RefDBError(f"{db_dir}: {counts['pending']} files are not encoded yet; rerun build to finish")
        rows = man.ok_rows()
        skipped = man.skipped_rows()
        excl_hash = man.exclude_hashes()
        cfg = {k: man.get(k) for k in ("encoder", "mode", "exclude_threshold", "index", "dim", "chunk_size",
                                        "min_side", "pack_side", "pack_quality", "sources", "encoder_source",
                                        "exclude_emb_paths")}
        referenced = man.chunk_files()
    dim = int(cfg["dim"])
    index_key = index_key or cfg["index"] or "auto"
    (db_dir / INFO).unlink(missing_ok=True)  # the DB is "not finished" until info.json is back
    seen: dict[str, str] = {}
    kept, dups, excluded = [], [], []
    for r in rows:
        if r["sha256"] in excl_hash:
            excluded.append({"path": r["path"], "reason": f"same file as excluded {excl_hash[r['sha256']]}"})
        elif r["sha256"] in seen:
            dups.append({"path": r["path"], "duplicate_of": seen[r["sha256"]]})
        else:
            seen[r["sha256"]] = r["path"]
            kept.append(r)
    vectors = _gather_vectors(db_dir, kept, dim)
    excl_file = db_dir / EXCLUDE_EMB
    if excl_file.is_file() and len(kept):
        ex = np.load(excl_file, allow_pickle=False)
        if len(ex):
            ex_paths = cfg["exclude_emb_paths"] or []
            keep_mask = np.ones(len(kept), dtype=bool)
            thr = float(cfg["exclude_threshold"])
            for s in range(0, len(kept), 65536):
                sims = vectors[s : s + 65536] @ ex.T
                best = sims.argmax(axis=1)
                for j in np.nonzero(sims[np.arange(len(best)), best] >= thr - 1e-6)[0]:
                    keep_mask[s + j] = False
                    cos = float(sims[j, best[j]])
                    src = ex_paths[best[j]] if best[j] < len(ex_paths) else f"exclude #{best[j]}"
                    excluded.append({"path": kept[s + j]["path"], "reason": f"CLS cosine {cos:.4f} >= {thr} to {src}"})
            kept = [r for r, k in zip(kept, keep_mask) if k]
            vectors = vectors[keep_mask]
    report = {
        "skipped": [{"path": p, "reason": why} for _, p, why in skipped],
        "duplicates": dups,
        "excluded": excluded,
        "counts": {"files": len(rows) + len(skipped), "ok": len(rows), "skipped": len(skipped),
                   "duplicates": len(dups), "excluded": len(excluded), "references": len(kept)},
    }
    write_json_atomic(db_dir / REPORT, report)
    if not kept:
        raise RefDBError(f"{db_dir}: no usable reference image is left ({len(skipped)} skipped, {len(dups)} "
                         f"duplicates, {len(excluded)} excluded; see {db_dir / REPORT}). Add valid images.")
    n = len(kept)
    budget = int(max_memory_gb * 2**30) if max_memory_gb else None
    try:
        plan = (index_mod.choose_index(n, dim, max_memory_bytes=budget) if index_key == "auto"
                else index_mod.plan_for_key(index_key, n, dim))
    except ValueError as e:
        raise RefDBError(f"{db_dir}: {e}") from e
    logger.info("index %s for %d references: estimated %.1f MiB (plus %.1f MiB of vectors while building)",
                plan.key, n, plan.est_bytes / 2**20, vectors.nbytes / 2**20)
    index = index_mod.build_index(vectors, plan, threads=threads)
    index_mod.write_index(index, db_dir / INDEX)
    del index
    meta_rows = [(i, r["seq"], r["path"], r["sha256"], r["width"], r["height"], r["caption"], r["pack_file"],
                  r["pack_offset"], r["pack_length"]) for i, r in enumerate(kept)]
    write_meta(db_dir / META, meta_rows)
    # orphan chunk files (a chunk written but never committed before a kill) are dead weight
    for sub in (EMB_DIR, PACKED_DIR):
        d = db_dir / sub
        if d.is_dir():
            for f in d.iterdir():
                if f"{sub}/{f.name}" not in referenced:
                    f.unlink()
    info = {
        "format_version": DB_FORMAT_VERSION,
        "n": n,
        "dim": dim,
        "metric": "inner_product",
        "normalized": True,
        "index": plan.to_json(),
        "encoder": cfg["encoder"],
        "encoder_source": cfg["encoder_source"],
        "preprocess": PREPROCESS_VERSION,
        "mode": cfg["mode"],
        "build_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "counts": report["counts"],
        "build": {k: cfg[k] for k in ("chunk_size", "min_side", "pack_side", "pack_quality", "exclude_threshold",
                                      "sources")},
        "files": {INDEX: (db_dir / INDEX).stat().st_size, META: (db_dir / META).stat().st_size},
    }
    write_json_atomic(db_dir / INFO, info)
    logger.info("reference DB %s: %d references, index %s", db_dir, n, plan.key)
    return info


# --------------------------------------------------------------------------------- entry points

def _resolve_sources(images: str | os.PathLike | None, list_file: str | os.PathLike | None
                     ) -> tuple[list[tuple[str, str | None]], list[str]]:
    if bool(images) == bool(list_file):
        raise ValueError("give exactly one of --images DIR or --list FILE")
    try:
        if images:
            return [(p, None) for p in discover_images(images)], [f"images:{Path(images).resolve().as_posix()}"]
        return read_list_file(list_file), [f"list:{Path(list_file).resolve().as_posix()}"]
    except FileNotFoundError as e:
        raise RefDBError(str(e)) from None


def _exclude_items(exclude: Sequence[str | os.PathLike]) -> list[str]:
    out = []
    for e in exclude:
        p = Path(e)
        if p.is_dir():
            out.extend(discover_images(p))
        elif p.is_file():
            out.append(p.resolve().as_posix())
        else:
            raise RefDBError(f"--exclude {p}: no such file or folder")
    return sorted(set(out))


def _prepare_exclusions(db_dir: Path, man: Manifest, encoder, exclude: Sequence[str], cfg: BuildConfig) -> None:
    spec = _exclude_items(exclude)
    done = man.get("exclude_sources")
    if done is not None:
        if done != spec:
            raise RefDBError(f"{db_dir}: this build was started with a different --exclude set ({len(done)} files, "
                             f"now {len(spec)}); rerun with the same --exclude or build into a new folder")
        return
    hashes: dict[str, str] = {}
    vecs, vec_paths = [], []
    if spec:
        batches = [list(range(s, min(s + cfg.batch_size, len(spec)))) for s in range(0, len(spec), cfg.batch_size)]
        loader = make_loader(list(enumerate(spec)), batches, workers=min(cfg.workers, 2), min_side=1, pack=None)
        for batch in loader:
            for s in batch.samples:
                if s.sha256:
                    hashes.setdefault(s.sha256, spec[s.seq])
                if not s.ok:
                    logger.warning("--exclude %s cannot be decoded (%s): excluded by hash only", spec[s.seq], s.reason)
            if batch.n_ok:
                vecs.append(_encode(encoder, batch_pixels(batch, encoder.device)))
                vec_paths.extend(spec[s.seq] for s in batch.samples if s.ok)
        logger.info("exclusion set: %d files, %d embeddings", len(spec), sum(len(v) for v in vecs))
    write_npy_atomic(db_dir / EXCLUDE_EMB, np.concatenate(vecs) if vecs else np.zeros((0, encoder.dim), np.float32))
    with man.transaction() as c:
        c.executemany("INSERT OR IGNORE INTO exclude(sha256, path) VALUES (?, ?)", sorted(hashes.items()))
        man.set("exclude_emb_paths", vec_paths, c)
        man.set("exclude_sources", spec, c)


def build_db(out: str | os.PathLike, encoder_path: str | os.PathLike, *, images: str | os.PathLike | None = None,
             list_file: str | os.PathLike | None = None, exclude: Sequence[str | os.PathLike] = (),
             config: BuildConfig | None = None,
             progress_callback: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build (or resume building) the reference DB ``out`` from a folder or a list of HR images.

    ``encoder_path`` is a CLIP vision .safetensors file or an encoder object (see
    :func:`load_encoder`). Rerunning the same command after an interruption continues where it stopped. With
    ``config.shard = (i, n)`` only shard i is encoded and the result must be combined with
    :func:`merge_shards`. Returns info.json's content (or a shard summary). Raises
    :class:`RefDBError` on unusable inputs and ValueError on bad arguments.
    """
    cfg = config or BuildConfig()
    out = Path(out)
    items, sources = _resolve_sources(images, list_file)
    if not items:
        raise RefDBError(f"no image files found in {sources[0].split(':', 1)[1]} "
                         f"(extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    encoder = load_encoder(encoder_path, cfg.device, cfg.precision)
    out.mkdir(parents=True, exist_ok=True)
    with Manifest(out, create=True) as man:
        _init_or_check_manifest(out, man, encoder, cfg, sources, items, new_files_ok=False)
        _prepare_exclusions(out, man, encoder, [str(e) for e in exclude], cfg)
        process_pending(out, man, encoder, cfg, progress_callback)
    return _finish(out, cfg)


def _init_or_check_manifest(out: Path, man: Manifest, encoder, cfg: BuildConfig, sources: list[str],
                            items: list[tuple[str, str | None]], *, new_files_ok: bool) -> None:
    fp = man.get("encoder")
    if fp is None:
        with man.transaction() as c:
            for k, v in dict(encoder=encoder.fingerprint, encoder_source=str(encoder.source), dim=encoder.dim,
                             mode=cfg.mode, chunk_size=cfg.chunk_size, min_side=cfg.min_side,
                             pack_side=cfg.pack_side, pack_quality=cfg.pack_quality,
                             exclude_threshold=cfg.exclude_threshold, index=cfg.index, sources=sources,
                             created=datetime.now(timezone.utc).isoformat(timespec="seconds")).items():
                man.set(k, v, c)
            man.add_files(items, c)
        logger.info("new reference DB %s: %d files", out, len(items))
        return
    if fp != encoder.fingerprint:
        raise RefDBError(f"{out} was built with encoder {fp['arch']} (sha256 {fp['weights_sha256'][:16]}), not "
                         f"{encoder.source} ({encoder.fingerprint['weights_sha256'][:16]}); use the same encoder "
                         "file or build into a new folder")
    if man.get("mode") != cfg.mode:
        raise RefDBError(f"{out} is a --mode {man.get('mode')} DB; rerun with --mode {man.get('mode')}")
    if new_files_ok:
        with man.transaction() as c:
            added = man.add_files(items, c)
            man.set("sources", list(man.get("sources") or []) + sources, c)
        logger.info("%s: %d new files appended", out, added)
        return
    known = man.paths()
    if known != [p for p, _ in items]:
        raise RefDBError(f"{out} was started from a different image list ({len(known)} files recorded, "
                         f"{len(items)} now); rerun with the original sources to resume, use `add` to append "
                         "images, or build into a new folder")
    logger.info("resuming %s: %s", out, man.counts())


def _finish(out: Path, cfg: BuildConfig) -> dict[str, Any]:
    with Manifest(out) as man:
        counts = man.counts()
        chunk_size = man.get("chunk_size")
        pending_groups = {s // chunk_size for s, _ in man.pending()}
    if cfg.shard[1] > 1:
        summary = {"shard": list(cfg.shard), "counts": counts, "pending_chunks_of_other_shards": len(pending_groups)}
        write_json_atomic(out / "shard.json", summary)
        logger.info("shard %d/%d of %s done; combine the shards with `merge`", *cfg.shard, out)
        return summary
    return finalize(out, index_key=None if cfg.index == "auto" else cfg.index, max_memory_gb=cfg.max_memory_gb,
                    threads=cfg.threads)


def add_images(db: str | os.PathLike, encoder_path: str | os.PathLike, *, images: str | os.PathLike | None = None,
               list_file: str | os.PathLike | None = None, config: BuildConfig | None = None,
               progress_callback: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Append images to an existing DB (existing ids stay the same) and rebuild its index.

    Files already in the DB are ignored; the encoder must be the DB's. Resumable like a build.
    """
    cfg = config or BuildConfig()
    db = Path(db)
    if not (db / "build" / "manifest.sqlite").is_file():
        raise RefDBError(f"{db}: no build manifest; `add` needs a DB built by this tool (with its build/ folder)")
    items, sources = _resolve_sources(images, list_file)
    encoder = load_encoder(encoder_path, cfg.device, cfg.precision)
    with Manifest(db) as man:
        cfg.mode = man.get("mode")
        _init_or_check_manifest(db, man, encoder, cfg, sources, items, new_files_ok=True)
        process_pending(db, man, encoder, cfg, progress_callback)
    cfg.shard = (0, 1)
    return _finish(db, cfg)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge_shards(out: str | os.PathLike, shards: Sequence[str | os.PathLike], *, index: str = "auto",
                 max_memory_gb: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """Merge shard DBs built with ``--shard i/n`` (same sources, encoder, options) into ``out``.

    The result has the same ids as a single-process build. Chunk files are hard-linked when
    possible. Raises :class:`RefDBError` when shards disagree or chunks are missing.
    """
    out = Path(out)
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("merge needs at least one shard DB")
    if (out / "build" / "manifest.sqlite").exists():
        raise RefDBError(f"{out} already holds a DB; merge into a new folder")
    mans = [Manifest(s) for s in shards]
    try:
        ref = mans[0]
        keys = ("encoder", "mode", "chunk_size", "min_side", "pack_side", "pack_quality", "exclude_threshold", "dim",
                "exclude_sources")
        for s, m in zip(shards[1:], mans[1:]):
            for k in keys:
                if m.get(k) != ref.get(k):
                    raise RefDBError(f"shard {s} differs from {shards[0]} in {k!r}; shards must be built with the "
                                     "same sources, encoder and options")
            if m.paths() != ref.paths():
                raise RefDBError(f"shard {s} was built from a different image list than {shards[0]}")
        paths_rows = list(ref.conn.execute("SELECT seq, path, caption FROM files ORDER BY seq"))
        done: dict[int, tuple] = {}
        chunks: dict[str, tuple] = {}
        for s, m in zip(shards, mans):
            for row in m.conn.execute("SELECT name, first_seq, n_files, n_ok, emb_file, pack_file FROM chunks"):
                chunks.setdefault(row[0], (s, row))
            for row in m.conn.execute("SELECT seq, status, reason, sha256, width, height, chunk, row, pack_offset, "
                                      "pack_length FROM files WHERE status != 'pending'"):
                done.setdefault(row[0], row)
        missing = [seq for seq, _, _ in paths_rows if seq not in done]
        if missing:
            cs = ref.get("chunk_size")
            raise RefDBError(f"merge: {len(missing)} files are in no finished shard (chunks "
                             f"{sorted({q // cs for q in missing})[:10]}...); finish every shard (rerun its build "
                             "command) before merging")
        out.mkdir(parents=True, exist_ok=True)
        with Manifest(out, create=True) as man:
            with man.transaction() as c:
                for k in keys + ("sources", "encoder_source", "exclude_emb_paths"):
                    man.set(k, ref.get(k), c)
                man.set("index", index, c)
                c.executemany("INSERT INTO files(seq, path, caption) VALUES (?, ?, ?)", paths_rows)
                c.executemany("INSERT INTO exclude(sha256, path) VALUES (?, ?)", sorted(ref.exclude_hashes().items()))
            for name, (s, row) in sorted(chunks.items()):
                for rel in row[4:6]:
                    if rel:
                        if not (s / rel).is_file():
                            raise RefDBError(f"merge: shard {s} lacks its chunk file {rel}; rebuild that shard")
                        _link_or_copy(s / rel, out / rel)
            if (shards[0] / EXCLUDE_EMB).is_file():
                _link_or_copy(shards[0] / EXCLUDE_EMB, out / EXCLUDE_EMB)
            with man.transaction() as c:
                c.executemany("INSERT INTO chunks(name, first_seq, n_files, n_ok, emb_file, pack_file) "
                              "VALUES (?, ?, ?, ?, ?, ?)", [row for _, (_, row) in sorted(chunks.items())])
                c.executemany("UPDATE files SET status=?, reason=?, sha256=?, width=?, height=?, chunk=?, row=?, "
                              "pack_offset=?, pack_length=? WHERE seq=?", [r[1:] + (r[0],) for r in done.values()])
    finally:
        for m in mans:
            m.close()
    return finalize(out, index_key=None if index == "auto" else index, max_memory_gb=max_memory_gb, threads=threads)


def export_db(src: str | os.PathLike, out: str | os.PathLike, *, ids: Sequence[int] | None = None,
              count: int | None = None, index: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Write a new DB ``out`` holding a subset of ``src`` (``ids`` in the given order, or the first
    ``count`` ids). The subset keeps exact embeddings, metadata and (packed mode) image bytes; the
    new DB is self-contained and can be extended with ``add``."""
    from .db import ReferenceDB

    src, out = Path(src), Path(out)
    db = ReferenceDB.open(src)
    try:
        if (ids is None) == (count is None):
            raise ValueError("export needs exactly one of ids or count")
        sel = list(range(min(count, db.n))) if count is not None else [int(i) for i in ids]
        bad = [i for i in sel if not 0 <= i < db.n]
        if bad:
            raise RefDBError(f"export: ids {bad[:5]} are outside {src} (0..{db.n - 1})")
        if not sel:
            raise RefDBError("export: empty selection")
        recs = db.records(sel)
        with Manifest(src) as sman:
            keys = ("encoder", "mode", "chunk_size", "min_side", "pack_side", "pack_quality", "exclude_threshold", "dim",
                    "encoder_source", "sources")
            conf = {k: sman.get(k) for k in keys}
            loc = {r[0]: r[1:] for r in sman.conn.execute(
                "SELECT f.seq, c.emb_file, f.row FROM files f JOIN chunks c ON f.chunk=c.name WHERE f.status='ok'")}
        vectors = np.stack([np.load(src / loc[r.seq][0], mmap_mode="r", allow_pickle=False)[loc[r.seq][1]]
                            for r in recs])
        if (out / "build" / "manifest.sqlite").exists():
            raise RefDBError(f"{out} already holds a DB; export into a new folder")
        out.mkdir(parents=True, exist_ok=True)
        name = f"{0:012d}"
        emb_file = f"{EMB_DIR}/emb_{name}.npy"
        write_npy_atomic(out / emb_file, vectors.astype(np.float32))
        pack_file, offsets, blobs, off = None, [], [], 0
        if conf["mode"] == "packed":
            for r in recs:
                b = db.read_packed_bytes(r)
                offsets.append((off, len(b)))
                blobs.append(b)
                off += len(b)
            pack_file = f"{PACKED_DIR}/part_{name}.bin"
            write_bytes_atomic(out / pack_file, b"".join(blobs))
        with Manifest(out, create=True) as man:
            with man.transaction() as c:
                for k in keys:
                    man.set(k, conf[k], c)
                man.set("index", index, c)
                man.set("exclude_sources", [], c)
                man.set("chunk_size", max(int(conf["chunk_size"]), len(recs)), c)
                man.set("exported_from", {"db": src.resolve().as_posix(), "n": len(recs)}, c)
                c.executemany(
                    "INSERT INTO files(seq, path, caption, status, sha256, width, height, chunk, row, pack_offset, "
                    "pack_length) VALUES (?, ?, ?, 'ok', ?, ?, ?, ?, ?, ?, ?)",
                    [(j, r.path, r.caption, r.sha256, r.width, r.height, name, j,
                      offsets[j][0] if offsets else None, offsets[j][1] if offsets else None)
                     for j, r in enumerate(recs)])
                c.execute("INSERT INTO chunks(name, first_seq, n_files, n_ok, emb_file, pack_file) VALUES (?,?,?,?,?,?)",
                          (name, 0, len(recs), len(recs), emb_file, pack_file))
    finally:
        db.close()
    return finalize(out, index_key=None if index == "auto" else index, threads=threads)
