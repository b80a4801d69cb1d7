"""On-disk state of a reference DB: the resumable build manifest, the metadata table, atomic writes.

Layout of a DB folder::

    info.json            N, dim, index key + search params, encoder fingerprint, mode, sizes, ...
    index.faiss          faiss index, id i == meta row i
    meta.sqlite          refs(id, seq, path, sha256, width, height, caption, pack_file, pack_offset, pack_length)
    report.json          skipped / duplicate / excluded files with reasons
    packed/part_*.bin    packed-mode references (JPEG bytes at offsets), one file per committed chunk
    build/manifest.sqlite  resumable build state (WAL): files -> status, chunk, row
    build/emb/emb_*.npy    committed embedding chunks (float32, L2-normalised, rows = ok files of the chunk)
    build/exclude.npy      embeddings of --exclude images

Crash safety: chunk files are written to a temp name, fsynced and renamed; only then is one SQLite
transaction committed that marks the chunk's files done. A kill at any moment leaves either an
orphan chunk file (ignored, overwritten on resume) or a committed chunk; the final files are
written with temp + rename and info.json last.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..paths import default_file_mode

INFO = "info.json"
INDEX = "index.faiss"
META = "meta.sqlite"
REPORT = "report.json"
PACKED_DIR = "packed"
BUILD_DIR = "build"
MANIFEST = "build/manifest.sqlite"
EMB_DIR = "build/emb"
EXCLUDE_EMB = "build/exclude.npy"
DB_FORMAT_VERSION = 1


class RefDBError(RuntimeError):
    """A reference DB problem; the message names the DB (or file) and says what to do."""


def sqlite_ro_uri(path: str | os.PathLike) -> str:
    """A read-only SQLite ``file:`` URI for ``path`` with every special character escaped.

    Folder names may hold ``#``, ``%``, ``?`` or spaces; unescaped, SQLite would read them as the
    URI's fragment/query and open (or create) a different file.
    """
    from urllib.parse import quote

    return f"file:{quote(Path(path).resolve().as_posix(), safe='/')}?mode=ro"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mode() -> int:
    """The one mode of every file a DB build writes: ``0o666 & ~umask`` (what ``open()`` gives, so
    group/other can read DB files like ComfyUI's own outputs unless the user's umask says otherwise)."""
    return default_file_mode()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success fsync it, give it :func:`file_mode` and
    rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------- manifest

_MANIFEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY,            -- global order: ids follow it
    path TEXT NOT NULL UNIQUE,          -- absolute source path
    caption TEXT,
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | ok | skipped
    reason TEXT,                        -- why skipped
    sha256 TEXT, width INTEGER, height INTEGER,
    chunk TEXT,                         -- committed chunk name (ok and skipped)
    row INTEGER,                        -- row in the chunk's embedding file (ok)
    pack_offset INTEGER, pack_length INTEGER
);
CREATE TABLE IF NOT EXISTS chunks (
    name TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, n_files INTEGER NOT NULL, n_ok INTEGER NOT NULL,
    emb_file TEXT, pack_file TEXT
);
CREATE TABLE IF NOT EXISTS exclude (sha256 TEXT PRIMARY KEY, path TEXT NOT NULL);
"""


class Manifest:
    """The resumable build state (``build/manifest.sqlite``, WAL journal)."""

    def __init__(self, db_dir: str | os.PathLike, *, create: bool = False):
        self.db_dir = Path(db_dir)
        self.path = self.db_dir / MANIFEST
        if not self.path.exists() and not create:
            raise RefDBError(
                f"{self.db_dir}: no build manifest ({MANIFEST}); it is not a reference DB built by "
                "this tool, or its build/ folder was deleted (rebuild it)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_MANIFEST_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise RefDBError(
                f"{self.path}: the build manifest is corrupt ({e}); delete {self.db_dir} and rebuild"
            ) from e

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM config WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.conn).execute(
            "INSERT OR REPLACE INTO config(key, value) VALUES (?, ?)", (key, json.dumps(value, sort_keys=True))
        )

    def n_files(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def max_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), -1) FROM files").fetchone()[0]

    def paths(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT path FROM files ORDER BY seq")]

    def add_files(self, items: list[tuple[str, str | None]], conn: sqlite3.Connection) -> int:
        """Append (path, caption) items not already present, continuing the sequence; return how many."""
        start = self.max_seq() + 1
        known = {r[0] for r in conn.execute("SELECT path FROM files")}
        new = [(p, c) for p, c in items if p not in known]
        conn.executemany(
            "INSERT INTO files(seq, path, caption) VALUES (?, ?, ?)",
            [(start + i, p, c) for i, (p, c) in enumerate(new)],
        )
        return len(new)

    def pending(self) -> list[tuple[int, str]]:
        return [(s, p) for s, p in self.conn.execute("SELECT seq, path FROM files WHERE status='pending' ORDER BY seq")]

    def counts(self) -> dict[str, int]:
        return {s: n for s, n in self.conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status")}

    def commit_chunk(
        self, name: str, first_seq: int, results: list[dict[str, Any]], emb_file: str | None, pack_file: str | None
    ) -> None:
        """Mark a chunk's files done in one transaction (after its files were renamed into place)."""
        n_ok = sum(1 for r in results if r["status"] == "ok")
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO chunks(name, first_seq, n_files, n_ok, emb_file, pack_file) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, first_seq, len(results), n_ok, emb_file, pack_file),
            )
            c.executemany(
                "UPDATE files SET status=:status, reason=:reason, sha256=:sha256, width=:width, height=:height, "
                "chunk=:chunk, row=:row, pack_offset=:pack_offset, pack_length=:pack_length WHERE seq=:seq",
                [dict(r, chunk=name) for r in results],
            )

    def ok_rows(self) -> list[sqlite3.Row]:
        self.conn.row_factory = sqlite3.Row
        try:
            return list(
                self.conn.execute(
                    "SELECT f.seq, f.path, f.caption, f.sha256, f.width, f.height, f.row, "
                    "f.pack_offset, f.pack_length, "
                    "c.emb_file, c.pack_file, c.name AS chunk FROM files f JOIN chunks c ON f.chunk = c.name "
                    "WHERE f.status='ok' ORDER BY f.seq"
                )
            )
        finally:
            self.conn.row_factory = None

    def skipped_rows(self) -> list[tuple[int, str, str]]:
        return list(self.conn.execute("SELECT seq, path, reason FROM files WHERE status='skipped' ORDER BY seq"))

    def chunk_files(self) -> set[str]:
        out = set()
        for emb, pack in self.conn.execute("SELECT emb_file, pack_file FROM chunks"):
            out.update(x for x in (emb, pack) if x)
        return out

    def exclude_hashes(self) -> dict[str, str]:
        return {h: p for h, p in self.conn.execute("SELECT sha256, path FROM exclude")}


# ------------------------------------------------------------------------------------ meta table

_META_SCHEMA = """
CREATE TABLE refs (
    id INTEGER PRIMARY KEY,   -- == faiss id
    seq INTEGER NOT NULL,     -- manifest sequence number (where the exact embedding lives)
    path TEXT NOT NULL,       -- source path at build time
    sha256 TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, caption TEXT,
    pack_file TEXT, pack_offset INTEGER, pack_length INTEGER
);
"""
META_COLUMNS = ("id", "seq", "path", "sha256", "width", "height", "caption", "pack_file", "pack_offset", "pack_length")


def write_meta(path: str | os.PathLike, rows: list[tuple]) -> None:
    """Write meta.sqlite atomically; ``rows`` are tuples in :data:`META_COLUMNS` order, id = 0..N-1."""
    with atomic_path(path) as tmp:
        tmp.unlink()
        conn = sqlite3.connect(str(tmp))
        try:
            conn.executescript(_META_SCHEMA)
            conn.executemany(f"INSERT INTO refs VALUES ({','.join('?' * len(META_COLUMNS))})", rows)
            conn.commit()
        finally:
            conn.close()
