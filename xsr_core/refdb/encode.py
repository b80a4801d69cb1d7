"""Build step 2, encoding + commit: pending chunks of the manifest → CLS vectors → chunk files
written atomically and committed in one SQLite transaction each (the unit of resume).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import index as index_mod
from .config import BuildConfig
from .images import DecodedSample
from .loader import RAW_MAX_PIXELS, batch_pixels, make_loader, source_roots
from .store import EMB_DIR, PACKED_DIR, Manifest, RefDBError, write_bytes_atomic, write_npy_atomic

logger = logging.getLogger(__name__)


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
    return _encode_start(encoder, x)()


def _encode_start(encoder, x: torch.Tensor) -> Callable[[], np.ndarray]:
    """Queue the encoding of uint8 crops (B, 3, 224, 224); the returned call waits and gives :func:`_encode`'s result.

    On CUDA the CLS vectors are copied into pinned host memory behind the encoder's kernels and an event
    marks the copy, so the host is free until the call (on CPU the work is done here).
    """
    if encoder.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    cls = encoder.encode_cls_u8(x).float()
    if cls.device.type != "cuda":
        out = index_mod.normalize(cls.cpu().numpy())
        return lambda: out
    host = torch.empty(cls.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(cls, non_blocking=True)  # queued on the stream of cls's device (not necessarily the current device)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(cls.device))

    def wait() -> np.ndarray:
        done.synchronize()
        return index_mod.normalize(host.numpy())

    return wait


def encode_batches(loader: Iterable, encoder, *, in_flight: int = 1) -> Iterator[tuple[object, np.ndarray | None]]:
    """``(batch, L2-normalised CLS of its ok files or None)`` for each loader batch, in loader order.

    Up to ``in_flight`` batches are queued on the device before the oldest one's vectors are read back,
    so the encoder computes while the host receives the next batch from the loader workers and crops it
    (0: encode, wait, then take the next batch — the build loop before this existed).
    """
    queue: collections.deque = collections.deque()
    for batch in loader:
        queue.append((batch, _encode_start(encoder, batch_pixels(batch, encoder.device)) if batch.n_ok else None))
        while len(queue) > in_flight:
            done, wait = queue.popleft()
            yield done, wait() if wait is not None else None
    while queue:
        done, wait = queue.popleft()
        yield done, wait() if wait is not None else None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05)


def process_pending(
    db_dir: str | os.PathLike,
    manifest: Manifest,
    encoder,
    cfg: BuildConfig,
    progress_callback: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
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
        batches.extend(
            list(range(s, min(s + cfg.batch_size, start + m))) for s in range(start, start + m, cfg.batch_size)
        )
        start += m
    pack = (int(manifest.get("pack_side")), int(manifest.get("pack_quality"))) if mode == "packed" else None
    on_gpu = encoder.device.type == "cuda"
    loader = make_loader(
        items,
        batches,
        workers=cfg.workers,
        min_side=int(manifest.get("min_side")),
        pack=pack,
        pin_memory=on_gpu,
        raw_max_pixels=RAW_MAX_PIXELS if on_gpu else None,
        roots=source_roots(manifest.get("sources") or [], cfg.allowed_roots),
    )
    (db_dir / EMB_DIR).mkdir(parents=True, exist_ok=True)
    if pack:
        (db_dir / PACKED_DIR).mkdir(parents=True, exist_ok=True)
    n_ok = n_skip = done_files = 0
    gi, buf_samples, buf_emb = 0, [], []
    t0 = time.time()
    with _progress(len(items), f"encoding {db_dir.name}", cfg.progress) as bar:
        for batch, emb_batch in encode_batches(loader, encoder):
            if emb_batch is not None:
                buf_emb.append(emb_batch)
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


def _commit_chunk(
    db_dir: Path, manifest: Manifest, samples: list[DecodedSample], emb: np.ndarray, packed: bool
) -> None:
    name = f"{samples[0].seq:012d}"
    emb_file = pack_file = None
    results, row, offset, blobs = [], 0, 0, []
    for s in samples:
        r = dict(
            seq=s.seq,
            status="ok" if s.ok else "skipped",
            reason=s.reason,
            sha256=s.sha256,
            width=s.width or None,
            height=s.height or None,
            row=None,
            pack_offset=None,
            pack_length=None,
        )
        if s.ok:
            r["row"] = row
            row += 1
            if packed:
                r["pack_offset"], r["pack_length"] = offset, len(s.packed)
                blobs.append(s.packed)
                offset += len(s.packed)
        else:
            logger.warning(
                "skipping %s: %s",
                manifest.conn.execute("SELECT path FROM files WHERE seq=?", (s.seq,)).fetchone()[0],
                s.reason,
            )
        results.append(r)
    if row:
        emb_file = f"{EMB_DIR}/emb_{name}.npy"
        write_npy_atomic(db_dir / emb_file, emb.astype(np.float32))
        if packed:
            pack_file = f"{PACKED_DIR}/part_{name}.bin"
            write_bytes_atomic(db_dir / pack_file, b"".join(blobs))
    manifest.commit_chunk(name, samples[0].seq, results, emb_file, pack_file)
