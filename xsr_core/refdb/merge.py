"""Combining and subsetting DBs: merge the shards of a ``--shard i/n`` build, export a subset."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..paths import PathConfinementError, within
from .finalize import finalize
from .store import EMB_DIR, EXCLUDE_EMB, PACKED_DIR, Manifest, RefDBError, write_bytes_atomic, write_npy_atomic

logger = logging.getLogger(__name__)

# manifest settings that decide what the vectors and packed images are: equal across the shards of a build,
# carried into an exported subset
_ENCODING_KEYS = (
    "encoder",
    "mode",
    "chunk_size",
    "min_side",
    "pack_side",
    "pack_quality",
    "exclude_threshold",
    "dim",
)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge_shards(
    out: str | os.PathLike,
    shards: Sequence[str | os.PathLike],
    *,
    index: str = "auto",
    max_memory_gb: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
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
        keys = (*_ENCODING_KEYS, "exclude_sources")
        for s, m in zip(shards[1:], mans[1:]):
            for k in keys:
                if m.get(k) != ref.get(k):
                    raise RefDBError(
                        f"shard {s} differs from {shards[0]} in {k!r}; shards must be built with the "
                        "same sources, encoder and options"
                    )
            if m.paths() != ref.paths():
                raise RefDBError(f"shard {s} was built from a different image list than {shards[0]}")
        paths_rows = list(ref.conn.execute("SELECT seq, path, caption FROM files ORDER BY seq"))
        done: dict[int, tuple] = {}
        chunks: dict[str, tuple] = {}
        for s, m in zip(shards, mans):
            for row in m.conn.execute("SELECT name, first_seq, n_files, n_ok, emb_file, pack_file FROM chunks"):
                chunks.setdefault(row[0], (s, row))
            for row in m.conn.execute(
                "SELECT seq, status, reason, sha256, width, height, chunk, row, pack_offset, "
                "pack_length FROM files WHERE status != 'pending'"
            ):
                done.setdefault(row[0], row)
        missing = [seq for seq, _, _ in paths_rows if seq not in done]
        if missing:
            cs = ref.get("chunk_size")
            raise RefDBError(
                f"merge: {len(missing)} files are in no finished shard (chunks "
                f"{sorted({q // cs for q in missing})[:10]}...); finish every shard (rerun its build "
                "command) before merging"
            )
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
                        try:
                            src_file, dst_file = within(rel, s), within(rel, out)
                        except PathConfinementError as e:
                            raise RefDBError(f"merge: shard {s} names {e}; its manifest was altered") from None
                        if not src_file.is_file():
                            raise RefDBError(f"merge: shard {s} lacks its chunk file {rel}; rebuild that shard")
                        _link_or_copy(src_file, dst_file)
            if (shards[0] / EXCLUDE_EMB).is_file():
                _link_or_copy(shards[0] / EXCLUDE_EMB, out / EXCLUDE_EMB)
            with man.transaction() as c:
                c.executemany(
                    "INSERT INTO chunks(name, first_seq, n_files, n_ok, emb_file, pack_file) VALUES (?, ?, ?, ?, ?, ?)",
                    [row for _, (_, row) in sorted(chunks.items())],
                )
                c.executemany(
                    "UPDATE files SET status=?, reason=?, sha256=?, width=?, height=?, chunk=?, row=?, "
                    "pack_offset=?, pack_length=? WHERE seq=?",
                    [r[1:] + (r[0],) for r in done.values()],
                )
    finally:
        for m in mans:
            m.close()
    return finalize(out, index_key=None if index == "auto" else index, max_memory_gb=max_memory_gb, threads=threads)


def export_db(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ids: Sequence[int] | None = None,
    count: int | None = None,
    index: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
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
            keys = (*_ENCODING_KEYS, "encoder_source", "sources")
            conf = {k: sman.get(k) for k in keys}
            loc = {
                r[0]: r[1:]
                for r in sman.conn.execute(
                    "SELECT f.seq, c.emb_file, f.row FROM files f JOIN chunks c ON f.chunk=c.name WHERE f.status='ok'"
                )
            }
        try:
            vectors = np.stack(
                [np.load(within(loc[r.seq][0], src), mmap_mode="r", allow_pickle=False)[loc[r.seq][1]] for r in recs]
            )
        except PathConfinementError as e:
            raise RefDBError(f"export: {src}'s manifest names {e}; it was altered. Rebuild the DB.") from None
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
                    [
                        (
                            j,
                            r.path,
                            r.caption,
                            r.sha256,
                            r.width,
                            r.height,
                            name,
                            j,
                            offsets[j][0] if offsets else None,
                            offsets[j][1] if offsets else None,
                        )
                        for j, r in enumerate(recs)
                    ],
                )
                c.execute(
                    "INSERT INTO chunks(name, first_seq, n_files, n_ok, emb_file, pack_file) VALUES (?,?,?,?,?,?)",
                    (name, 0, len(recs), len(recs), emb_file, pack_file),
                )
    finally:
        db.close()
    return finalize(out, index_key=None if index == "auto" else index, threads=threads)
