"""Build step 3, finalize: committed chunks → dedup (sha256), exclusion of evaluation images
(same bytes or CLS cosine), the faiss index, meta.sqlite, report.json and info.json.

The exclusion set itself is prepared (decoded + encoded once per build) by :func:`prepare_exclusions`.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..clip_preprocess import PREPROCESS_VERSION
from ..paths import PathConfinementError, within
from . import index as index_mod
from .config import BuildConfig
from .encode import encode_batches
from .images import discover_images
from .loader import make_loader
from .store import (
    DB_FORMAT_VERSION,
    EMB_DIR,
    EXCLUDE_EMB,
    INDEX,
    INFO,
    META,
    PACKED_DIR,
    REPORT,
    Manifest,
    RefDBError,
    write_json_atomic,
    write_meta,
    write_npy_atomic,
)

logger = logging.getLogger(__name__)


def _gather_vectors(db_dir: Path, rows: list, dim: int) -> np.ndarray:
    out = np.empty((len(rows), dim), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for j, r in enumerate(rows):
        f = r["emb_file"]
        if f not in cache:
            cache.clear()  # rows come in seq order: one chunk at a time
            try:
                p = within(f, db_dir)
            except PathConfinementError as e:
                raise RefDBError(f"{db_dir}: the build manifest names {e}; it was altered. Rebuild the DB.") from None
            if not p.is_file():
                raise RefDBError(
                    f"{db_dir}: embedding chunk {f} is missing; the build folder is damaged. "
                    "Delete the DB folder and rebuild it."
                )
            cache[f] = np.load(p, mmap_mode="r", allow_pickle=False)
        out[j] = cache[f][r["row"]]
    return out


def finalize(
    db_dir: str | os.PathLike,
    *,
    index_key: str | None = None,
    max_memory_gb: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
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
        cfg = {
            k: man.get(k)
            for k in (
                "encoder",
                "mode",
                "exclude_threshold",
                "index",
                "dim",
                "chunk_size",
                "min_side",
                "pack_side",
                "pack_quality",
                "sources",
                "encoder_source",
                "exclude_emb_paths",
            )
        }
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
        "counts": {
            "files": len(rows) + len(skipped),
            "ok": len(rows),
            "skipped": len(skipped),
            "duplicates": len(dups),
            "excluded": len(excluded),
            "references": len(kept),
        },
    }
    write_json_atomic(db_dir / REPORT, report)
    if not kept:
        why = "; ".join(f"{Path(p).name}: {reason}" for _, p, reason in skipped[:3])
        raise RefDBError(
            f"{db_dir}: no usable reference image is left ({len(skipped)} skipped, {len(dups)} "
            f"duplicates, {len(excluded)} excluded{'; ' + why if why else ''}). Add valid images."
        )
    n = len(kept)
    budget = int(max_memory_gb * 2**30) if max_memory_gb else None
    try:
        plan = (
            index_mod.choose_index(n, dim, max_memory_bytes=budget)
            if index_key == "auto"
            else index_mod.plan_for_key(index_key, n, dim)
        )
    except ValueError as e:
        raise RefDBError(f"{db_dir}: {e}") from e
    logger.info(
        "index %s for %d references: estimated %.1f MiB (plus %.1f MiB of vectors while building)",
        plan.key,
        n,
        plan.est_bytes / 2**20,
        vectors.nbytes / 2**20,
    )
    index = index_mod.build_index(vectors, plan, threads=threads)
    index_mod.write_index(index, db_dir / INDEX)
    del index
    meta_rows = [
        (
            i,
            r["seq"],
            r["path"],
            r["sha256"],
            r["width"],
            r["height"],
            r["caption"],
            r["pack_file"],
            r["pack_offset"],
            r["pack_length"],
        )
        for i, r in enumerate(kept)
    ]
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
        "build": {
            k: cfg[k] for k in ("chunk_size", "min_side", "pack_side", "pack_quality", "exclude_threshold", "sources")
        },
        "files": {INDEX: (db_dir / INDEX).stat().st_size, META: (db_dir / META).stat().st_size},
    }
    write_json_atomic(db_dir / INFO, info)
    logger.info("reference DB %s: %d references, index %s", db_dir, n, plan.key)
    return info


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
            raise RefDBError(
                f"{db_dir}: this build was started with a different --exclude set ({len(done)} files, "
                f"now {len(spec)}); rerun with the same --exclude or build into a new folder"
            )
        return
    hashes: dict[str, str] = {}
    vecs, vec_paths = [], []
    if spec:
        batches = [list(range(s, min(s + cfg.batch_size, len(spec)))) for s in range(0, len(spec), cfg.batch_size)]
        loader = make_loader(list(enumerate(spec)), batches, workers=min(cfg.workers, 2), min_side=1, pack=None)
        for batch, emb in encode_batches(loader, encoder):
            for s in batch.samples:
                if s.sha256:
                    hashes.setdefault(s.sha256, spec[s.seq])
                if not s.ok:
                    logger.warning("--exclude %s cannot be decoded (%s): excluded by hash only", spec[s.seq], s.reason)
            if emb is not None:
                vecs.append(emb)
                vec_paths.extend(spec[s.seq] for s in batch.samples if s.ok)
        logger.info("exclusion set: %d files, %d embeddings", len(spec), sum(len(v) for v in vecs))
    write_npy_atomic(db_dir / EXCLUDE_EMB, np.concatenate(vecs) if vecs else np.zeros((0, encoder.dim), np.float32))
    with man.transaction() as c:
        c.executemany("INSERT OR IGNORE INTO exclude(sha256, path) VALUES (?, ?)", sorted(hashes.items()))
        man.set("exclude_emb_paths", vec_paths, c)
        man.set("exclude_sources", spec, c)
