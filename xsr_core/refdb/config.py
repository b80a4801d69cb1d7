"""Build options of a reference DB (``build`` / ``add`` CLI flags) and the ``--shard`` parser."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .images import DEFAULT_MIN_SIDE, PACK_QUALITY, PACK_SIDE

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
    allowed_roots: tuple[str, ...] = ()  # folders besides the --images folder that its files may resolve into

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
