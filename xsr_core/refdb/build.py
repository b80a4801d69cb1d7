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

One module per lifecycle step: :mod:`.config` (options), :mod:`.loader` (decoding workers),
:mod:`.encode` (encode + commit chunks), :mod:`.finalize` (dedup, exclusion, index, metadata),
:mod:`.merge` (shards, export); this module holds the entry points ``build_db`` / ``add_images``
and re-exports the names the others define.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import BuildConfig, parse_shard
from .encode import _encode, _progress, encode_batches, load_encoder, process_pending, resolve_device
from .finalize import _exclude_items, _gather_vectors, _prepare_exclusions, finalize
from .images import discover_images, read_list_file
from .loader import RAW_MAX_PIXELS, DecodedBatch, _FileDataset, batch_pixels, die_with_parent, make_loader, source_roots
from .merge import _link_or_copy, export_db, merge_shards
from .store import BUILD_DIR, MANIFEST, PACKED_DIR, REPORT, Manifest, RefDBError, write_json_atomic

__all__ = [  # the entry points, and the names of the step modules this module always offered
    "RAW_MAX_PIXELS",
    "BuildConfig",
    "DecodedBatch",
    "add_images",
    "batch_pixels",
    "build_db",
    "die_with_parent",
    "encode_batches",
    "export_db",
    "finalize",
    "load_encoder",
    "make_loader",
    "merge_shards",
    "parse_shard",
    "process_pending",
    "resolve_device",
    "source_roots",
    "_FileDataset",
    "_encode",
    "_exclude_items",
    "_gather_vectors",
    "_link_or_copy",
    "_prepare_exclusions",
    "_progress",
]

logger = logging.getLogger(__name__)

# the BuildConfig fields a new DB records in its manifest (encode, finalize and merge read them back from there)
_RECORDED_SETTINGS = ("mode", "chunk_size", "min_side", "pack_side", "pack_quality", "exclude_threshold", "index")


# --------------------------------------------------------------------------------- entry points


def _resolve_sources(
    images: str | os.PathLike | None, list_file: str | os.PathLike | None
) -> tuple[list[tuple[str, str | None]], list[str]]:
    if bool(images) == bool(list_file):
        raise ValueError("give exactly one of --images DIR or --list FILE")
    try:
        if images:
            return [(p, None) for p in discover_images(images)], [f"images:{Path(images).resolve().as_posix()}"]
        return read_list_file(list_file), [f"list:{Path(list_file).resolve().as_posix()}"]
    except FileNotFoundError as e:
        raise RefDBError(str(e)) from None


def build_db(
    out: str | os.PathLike,
    encoder_path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    list_file: str | os.PathLike | None = None,
    exclude: Sequence[str | os.PathLike] = (),
    config: BuildConfig | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
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
        raise RefDBError(
            f"no image files found in {sources[0].split(':', 1)[1]} "
            f"(extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    encoder = load_encoder(encoder_path, cfg.device, cfg.precision)
    new = not (out / MANIFEST).exists()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with Manifest(out, create=True) as man:
            _init_or_check_manifest(out, man, encoder, cfg, sources, items, new_files_ok=False)
            _prepare_exclusions(out, man, encoder, [str(e) for e in exclude], cfg)
            process_pending(out, man, encoder, cfg, progress_callback)
        return _finish(out, cfg)
    except BaseException as e:
        if new:
            _discard_failed_build(out, created, e)
        raise


def _discard_failed_build(out: Path, created: bool, error: BaseException) -> None:
    """After a new build failed: delete it when nothing worth keeping exists; else leave it resumable.

    Kept when chunks were committed and the failure was not final (an interrupt, a crash): the
    folder has no info.json, so nothing lists or opens it, and rerunning the build continues it.
    A build that found no usable image, or committed nothing, leaves no folder behind.
    """
    committed = 0
    try:
        with Manifest(out) as man:
            committed = man.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            pending = man.counts().get("pending", 0)
    except Exception:  # noqa: BLE001 - an unreadable manifest is nothing to keep
        pending = 1
    final = isinstance(error, RefDBError) and not pending  # finalize refused the result
    if committed and not final:
        logger.warning(
            "build of %s stopped (%s); %d finished chunks are kept: rerun the same build to continue",
            out,
            type(error).__name__,
            committed,
        )
        return
    target = out if created else out / BUILD_DIR
    shutil.rmtree(target, ignore_errors=True)
    if not created:  # the folder was there before: remove only what this build wrote
        (out / REPORT).unlink(missing_ok=True)
        shutil.rmtree(out / PACKED_DIR, ignore_errors=True)
    logger.info("removed the unfinished build %s", target)


def _init_or_check_manifest(
    out: Path,
    man: Manifest,
    encoder,
    cfg: BuildConfig,
    sources: list[str],
    items: list[tuple[str, str | None]],
    *,
    new_files_ok: bool,
) -> None:
    fp = man.get("encoder")
    if fp is None:
        with man.transaction() as c:
            for k, v in dict(
                encoder=encoder.fingerprint,
                encoder_source=str(encoder.source),
                dim=encoder.dim,
                **{k: getattr(cfg, k) for k in _RECORDED_SETTINGS},
                sources=sources,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ).items():
                man.set(k, v, c)
            man.add_files(items, c)
        logger.info("new reference DB %s: %d files", out, len(items))
        return
    if fp != encoder.fingerprint:
        raise RefDBError(
            f"{out} was built with encoder {fp['arch']} (sha256 {fp['weights_sha256'][:16]}), not "
            f"{encoder.source} ({encoder.fingerprint['weights_sha256'][:16]}); use the same encoder "
            "file or build into a new folder"
        )
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
        raise RefDBError(
            f"{out} was started from a different image list ({len(known)} files recorded, "
            f"{len(items)} now); rerun with the original sources to resume, use `add` to append "
            "images, or build into a new folder"
        )
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
    return finalize(
        out, index_key=None if cfg.index == "auto" else cfg.index, max_memory_gb=cfg.max_memory_gb, threads=cfg.threads
    )


def add_images(
    db: str | os.PathLike,
    encoder_path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    list_file: str | os.PathLike | None = None,
    config: BuildConfig | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
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
