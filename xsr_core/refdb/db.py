"""Query-time access to a reference DB: open + validate, search, encoder check, records, images.

``ReferenceDB.open(path)`` checks everything a query relies on up front (info.json, index.faiss,
meta.sqlite, their sizes and counts) and raises :class:`RefDBError` naming the DB and the fix.
Large indexes are memory-mapped read-only. ``signature()`` is a cheap stat-based key so a caller
(the ComfyUI loader node) can cache an open DB and reopen it only when its files change.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..paths import PathConfinementError, confine, env_roots, real_roots
from . import index as index_mod
from .images import ImageSkip, decode_image
from .store import BUILD_DIR, INDEX, INFO, META, META_COLUMNS, RefDBError, sqlite_ro_uri

logger = logging.getLogger(__name__)

_REBUILD_HINT = (
    "rerun `python -m xsr_core.refdb build ... --out {db}` (its build/ folder lets it resume without "
    "re-encoding) or restore the DB folder from a copy"
)


@dataclass(frozen=True)
class RefRecord:
    """One reference: row ``id`` of the DB (== faiss id)."""

    id: int  # faiss id / row number
    seq: int  # build sequence number
    path: str  # source path at build time
    sha256: str  # content hash of the source file
    width: int  # source image size
    height: int
    caption: str | None  # optional caption from the image list
    pack_file: str | None  # packed mode: shard file (relative to the DB folder)
    pack_offset: int | None
    pack_length: int | None


def db_signature(path: str | os.PathLike) -> tuple:
    """(mtime_ns, size) of the DB's info.json, index.faiss and meta.sqlite (cheap, no reads)."""
    path = Path(path)
    sig = []
    for name in (INFO, INDEX, META):
        try:
            st = (path / name).stat()
            sig.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((name, None, None))
    return tuple(sig)


def _as_query_array(query: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(query, torch.Tensor):
            query = query.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    q = np.asarray(query, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2:
        raise ValueError(f"search takes query vectors (B, D), got shape {q.shape}")
    return index_mod.normalize(q)


class ReferenceDB:
    """An open, validated reference DB (thread-safe for concurrent searches and reads)."""

    def __init__(
        self,
        path: Path,
        info: dict[str, Any],
        index,
        conn: sqlite3.Connection,
        signature: tuple,
        allowed_roots: Sequence[str | os.PathLike] = (),
    ):
        self.path = path
        self.real_path = Path(os.path.realpath(path))
        # where a paths-mode DB may read its source images: the DB folder, the caller's roots, XSR_ALLOWED_ROOTS
        self.allowed_roots = real_roots([self.real_path, *allowed_roots, *env_roots()])
        self.info = info
        self.index = index
        self._conn = conn
        self._lock = threading.Lock()
        self._signature = signature

    # ------------------------------------------------------------------ open / validate
    @classmethod
    def open(
        cls, path: str | os.PathLike, *, mmap: bool | None = None, allowed_roots: Sequence[str | os.PathLike] = ()
    ) -> "ReferenceDB":
        """Open and validate the DB folder ``path``; raises :class:`RefDBError` with the fix.

        ``allowed_roots``: folders (besides the DB folder and ``XSR_ALLOWED_ROOTS``) a paths-mode DB
        may read its source images from; packed shards must always lie inside the DB folder.
        """
        db = Path(path)
        hint = _REBUILD_HINT.format(db=db)
        if not db.is_dir():
            raise RefDBError(f"reference DB {db} does not exist (expected a folder with {INFO}, {INDEX}, {META})")
        sig = db_signature(db)
        info_path = db / INFO
        if not info_path.is_file():
            if (db / "shard.json").is_file():
                raise RefDBError(
                    f"{db} is one shard of a sharded build; combine the shards with "
                    "`python -m xsr_core.refdb merge --out DB SHARD...` and open the merged DB"
                )
            if (db / BUILD_DIR).is_dir():
                raise RefDBError(
                    f"reference DB {db} is not finished (no {INFO}: the build was interrupted or failed); {hint}"
                )
            raise RefDBError(f"{db} is not a reference DB (no {INFO}); build one with `python -m xsr_core.refdb build`")
        try:
            info = json.loads(info_path.read_text())
            n, dim = int(info["n"]), int(info["dim"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RefDBError(f"reference DB {db}: {INFO} is unreadable or incomplete ({e}); {hint}") from e
        if n <= 0:
            raise RefDBError(f"reference DB {db} is empty (N = 0); build it from a folder with usable images")
        for name in (INDEX, META):
            p = db / name
            if not p.is_file():
                raise RefDBError(f"reference DB {db}: {name} is missing; {hint}")
            want = (info.get("files") or {}).get(name)
            if want is not None and p.stat().st_size != want:
                raise RefDBError(
                    f"reference DB {db}: {name} is {p.stat().st_size} bytes but was written as {want} "
                    f"(truncated or replaced); {hint}"
                )
        try:
            index = index_mod.read_index(db / INDEX, mmap=mmap)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else e
            raise RefDBError(f"reference DB {db}: {INDEX} is corrupt or not a faiss index ({first}); {hint}") from e
        if index.ntotal != n or index.d != dim:
            raise RefDBError(
                f"reference DB {db}: {INDEX} holds {index.ntotal} x {index.d} vectors but {INFO} says "
                f"{n} x {dim}; the files come from different builds. {hint}"
            )
        try:
            conn = sqlite3.connect(sqlite_ro_uri(db / META), uri=True, check_same_thread=False)
            cnt, lo, hi = conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM refs").fetchone()
            if os.path.getsize(db / META) < (64 << 20):
                ok = conn.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise sqlite3.DatabaseError(ok)
        except sqlite3.Error as e:
            raise RefDBError(f"reference DB {db}: {META} is corrupt or truncated ({e}); {hint}") from e
        if cnt != n or (n and (lo, hi) != (0, n - 1)):
            conn.close()
            raise RefDBError(
                f"reference DB {db}: {META} has {cnt} rows (ids {lo}..{hi}) but the index has {n} "
                f"vectors; the files come from different builds. {hint}"
            )
        index_mod.set_search_params(index, (info.get("index") or {}).get("search_params") or {})
        return cls(db, info, index, conn, sig, allowed_roots)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self.index = None

    def __enter__(self) -> "ReferenceDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReferenceDB({self.path}, n={self.n}, index={self.index_key}, mode={self.mode})"

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return int(self.info["n"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def mode(self) -> str:
        return str(self.info.get("mode", "paths"))

    @property
    def index_key(self) -> str:
        return str((self.info.get("index") or {}).get("key", "?"))

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self.info.get("encoder") or {})

    def signature(self) -> tuple:
        """The stat-based signature the DB had when opened (compare with :func:`db_signature`)."""
        return self._signature

    def is_stale(self) -> bool:
        """True when the DB's files changed on disk since this object opened them."""
        return db_signature(self.path) != self._signature

    # ------------------------------------------------------------------ queries
    def check_encoder(self, fingerprint: dict[str, str]) -> None:
        """Raise :class:`RefDBError` if ``fingerprint`` (see ``clip_vision.fingerprint_state_dict``) is
        not the encoder + preprocessing this DB was built with."""
        mine = self.fingerprint
        keys = ("arch", "weights_sha256", "preprocess")
        if all(mine.get(k) == fingerprint.get(k) for k in keys):
            return
        what = [k for k in keys if mine.get(k) != fingerprint.get(k)]

        def _fmt(fp: dict) -> str:
            return f"{fp.get('arch')} weights {str(fp.get('weights_sha256'))[:16]} preprocess {fp.get('preprocess')}"

        raise RefDBError(
            f"reference DB {self.path} was built with a different CLIP vision encoder ({', '.join(what)} differ): "
            f"DB encoder {_fmt(mine)} (file {self.info.get('encoder_source')}); query encoder {_fmt(fingerprint)}. "
            "Load the CLIP vision model the DB was built with, or rebuild the DB with this one."
        )

    def search(self, query: Any, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine search. ``query``: (B, D) or (D,) tensor/array (normalised here anyway).

        Returns ``(scores, ids)``, both (B, min(k, N)) (float32 cosine, int64 ids), best first. An
        approximate index may return fewer hits for a query; missing slots have id -1 and score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_query_array(query)
        if q.shape[1] != self.dim:
            raise RefDBError(
                f"reference DB {self.path} holds {self.dim}-d vectors; the query is {q.shape[1]}-d "
                "(a different CLIP encoder?)"
            )
        k_eff = min(k, self.n)
        with self._lock:
            if self.index is None:
                raise RefDBError(f"reference DB {self.path} is closed")
            scores, ids = self.index.search(q, k_eff)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def records(self, ids: Sequence[int]) -> list[RefRecord]:
        """Metadata rows for ``ids`` (in the given order); unknown ids raise :class:`RefDBError`."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            return []
        with self._lock:
            rows = {}
            for s in range(0, len(ids), 900):
                part = sorted(set(ids[s : s + 900]))
                q = f"SELECT {','.join(META_COLUMNS)} FROM refs WHERE id IN ({','.join('?' * len(part))})"
                rows.update({r[0]: RefRecord(*r) for r in self._conn.execute(q, part)})
        missing = [i for i in ids if i not in rows]
        if missing:
            raise RefDBError(f"reference DB {self.path}: ids {missing[:5]} do not exist (N = {self.n})")
        return [rows[i] for i in ids]

    def read_packed_bytes(self, rec: RefRecord) -> bytes:
        """The stored JPEG bytes of a packed-mode record."""
        if not rec.pack_file:
            raise RefDBError(f"reference DB {self.path} is a '{self.mode}' DB: reference {rec.id} has no packed image")
        p = self.packed_path(rec)
        off, length = rec.pack_offset, rec.pack_length
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not (isinstance(off, int) and isinstance(length, int) and off >= 0 and 0 < length <= size - off):
                    raise RefDBError(
                        f"reference DB {self.path}: reference {rec.id} points at bytes {off}+{length} of "
                        f"{p} ({size} bytes): the metadata is damaged or crafted; rebuild the DB"
                    )
                f.seek(off)
                data = f.read(length)
        except OSError as e:
            raise RefDBError(
                f"reference DB {self.path}: packed shard {p} is unreadable ({e}); restore the DB folder"
            ) from e
        if len(data) != rec.pack_length:
            raise RefDBError(
                f"reference DB {self.path}: packed shard {p} is truncated (reference {rec.id}); "
                "restore the DB folder or rebuild it"
            )
        return data

    def packed_path(self, rec: RefRecord) -> Path:
        """The resolved shard file of a packed record; refused unless it lies inside the DB folder."""
        try:
            return Path(
                confine(
                    rec.pack_file, [self.real_path], base=self.real_path, what=f"packed shard of reference {rec.id}"
                )
            )
        except PathConfinementError as e:
            raise RefDBError(
                f"reference DB {self.path}: {e}. A DB's packed files live inside its folder: this "
                "meta.sqlite was altered or crafted; rebuild the DB or get it from a trusted source"
            ) from None

    def source_path(self, rec: RefRecord) -> str:
        """The resolved source file of a paths-mode record; refused unless under :attr:`allowed_roots`."""
        try:
            return confine(
                rec.path, self.allowed_roots, base=self.real_path, what=f"source image of reference {rec.id}"
            )
        except PathConfinementError as e:
            raise RefDBError(f"reference DB {self.path}: {e}").with_traceback(None) from None

    def load_images(self, ids: Sequence[int], *, as_numpy: bool = False) -> list:
        """The reference images of ``ids`` as 8-bit RGB PIL images (or HxWx3 uint8 arrays).

        ``paths`` mode reads the source files (a moved or missing file is an error naming it);
        ``packed`` mode reads the JPEGs stored in the DB. Decoding follows the build (RGB, alpha
        over black, EXIF orientation).
        """
        return [im for im, _ in self.load_images_and_bytes(ids, as_numpy=as_numpy)]

    def image_bytes(self, rec: RefRecord) -> tuple[bytes, str]:
        """(the stored file bytes of ``rec``, a name for messages): the packed JPEG, or the source file."""
        if self.mode == "packed":
            return self.read_packed_bytes(rec), f"{self.path}/{rec.pack_file}@{rec.pack_offset}"
        src = self.source_path(rec)
        try:
            with open(src, "rb") as f:
                return f.read(), rec.path
        except OSError as e:
            raise RefDBError(
                f"reference DB {self.path}: reference image {rec.path} (id {rec.id}) cannot be read "
                f"({e.strerror or e}); it was moved or deleted since the build. Restore it, or rebuild the "
                "DB (--mode packed stores the images inside the DB)"
            ) from e

    def load_images_and_bytes(self, ids: Sequence[int], *, as_numpy: bool = False) -> list[tuple[Any, bytes]]:
        """:meth:`load_images` with each image's file bytes (e.g. to show the stored file without re-encoding)."""
        out = []
        for rec in self.records(ids):
            data, what = self.image_bytes(rec)
            try:
                img = decode_image(data, min_side=1, what=what)
            except ImageSkip as e:
                raise RefDBError(
                    f"reference DB {self.path}: reference image {what} (id {rec.id}) is unreadable: {e}"
                ) from e
            out.append((np.asarray(img) if as_numpy else img, data))
        return out


def verify_db(
    path: str | os.PathLike, *, check_hashes: bool = False, allowed_roots: Sequence[str | os.PathLike] = ()
) -> list[str]:
    """Consistency check of a DB; returns a list of problems (empty = healthy).

    Checks what :meth:`ReferenceDB.open` checks (raising :class:`RefDBError` when the DB cannot be
    opened at all), then: manifest vs metadata (every row's sequence number is a committed ``ok``
    file with the same hash), committed chunk files present and inside the DB folder, every
    packed row's shard inside the DB folder with its offsets inside the file, and in ``paths``
    mode that every source file resolves (symlinks followed) under the DB folder, ``allowed_roots``
    or ``XSR_ALLOWED_ROOTS`` and exists (and, with ``check_hashes``, still has the recorded sha256).
    """
    import hashlib

    from .store import Manifest

    problems: list[str] = []
    with ReferenceDB.open(path, allowed_roots=allowed_roots) as db:
        recs = db.records(range(db.n))
        man_path = db.path / "build" / "manifest.sqlite"
        if man_path.is_file():
            with Manifest(db.path) as man:
                files = {r[0]: r[1:] for r in man.conn.execute("SELECT seq, status, sha256, path FROM files")}
                pending = man.counts().get("pending", 0)
                if pending:
                    problems.append(f"manifest: {pending} files still pending (an unfinished `add`?); rerun it")
                for rel in sorted(man.chunk_files()):
                    try:
                        real = confine(rel, [db.real_path], base=db.real_path, what="committed chunk file")
                    except PathConfinementError as e:
                        problems.append(f"manifest: {e}")
                        continue
                    if not os.path.isfile(real):
                        problems.append(f"manifest: committed chunk file {rel} is missing")
            for r in recs:
                f = files.get(r.seq)
                if f is None or f[0] != "ok" or f[1] != r.sha256 or f[2] != r.path:
                    problems.append(f"id {r.id}: metadata row disagrees with the build manifest (seq {r.seq})")
        else:
            problems.append("no build/manifest.sqlite: the DB cannot be resumed or extended with `add`")
        sizes: dict[str, int] = {}
        for r in recs:
            if db.mode == "packed":
                if not r.pack_file:
                    problems.append(f"id {r.id}: packed DB row without packed image")
                    continue
                if r.pack_file not in sizes:
                    try:
                        p = db.packed_path(r)
                    except RefDBError as e:
                        problems.append(f"id {r.id}: {e}")
                        continue
                    sizes[r.pack_file] = p.stat().st_size if p.is_file() else -1
                    if sizes[r.pack_file] < 0:
                        problems.append(f"packed shard {r.pack_file} is missing")
                if sizes[r.pack_file] >= 0 and not (
                    r.pack_offset is not None
                    and r.pack_length is not None
                    and r.pack_offset >= 0
                    and r.pack_length >= 0
                    and r.pack_offset + r.pack_length <= sizes[r.pack_file]
                ):
                    problems.append(f"id {r.id}: packed bytes beyond the end of {r.pack_file}")
            else:
                try:
                    src = db.source_path(r)
                except RefDBError as e:
                    problems.append(f"id {r.id}: {str(e).removeprefix(f'reference DB {db.path}: ')}")
                    continue
                if not os.path.isfile(src):
                    problems.append(f"id {r.id}: source image {r.path} is missing")
                elif check_hashes:
                    with open(src, "rb") as fh:
                        if hashlib.sha256(fh.read()).hexdigest() != r.sha256:
                            problems.append(f"id {r.id}: source image {r.path} changed since the build")
    return problems
