"""faiss index choice, memory estimate, build and I/O for reference DBs (DESIGN §2.2).

Vectors are L2-normalised float32 CLIP CLS embeddings; the metric is inner product (= cosine).
The automatic choice follows the faiss wiki "Guidelines to choose an index" and was tuned with
``bench/refdb_scale.py`` (2 CPU cores, 1024-d, top-4; see bench/results/refdb_scale.md):

* N < ``FLAT_MAX`` → ``Flat`` (exact).
* up to a few million → ``IVF{k}_HNSW32,SQ8``: k ≈ 4·√N rounded to a power of two (the wiki's
  4·√N … 16·√N range, at its low end so that k-means training stays affordable on a CPU), an HNSW
  coarse quantizer (so the centroid search is not a 16 MB brute-force scan per query) and 8-bit
  scalar-quantised codes (1 byte per dimension, near-exact inner products).
* ≥ ``LARGE_N`` → ``IVF65536_HNSW32,SQ8``, or ``IVF65536_HNSW32,PQ{d/8}`` when the SQ8 codes would
  not fit the memory budget.

Search parameters (``nprobe``, ``quantizer_efSearch``, ``efSearch``) are part of the plan and are
stored in info.json so that every reader searches the index the same way.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import default_file_mode

logger = logging.getLogger(__name__)

FLAT_MAX = 30_000  # below this, exact search is cheap enough (≤ 120 MB, a few ms per query)
LARGE_N = 3_000_000  # from here, 65536 lists (the wiki's 1M-10M row)
MMAP_MIN_BYTES = 256 << 20  # indexes larger than this are opened memory-mapped read-only
# Search-time defaults tuned with bench/refdb_scale.py (target: recall@4 >= 0.95 at <= 2 ms p50, 1M x 1024).
DEFAULT_NPROBE = 8  # 1M x 1024, IVF4096: recall@4 0.975, 1.90 ms CPU p50 (nprobe 4: 0.956, 0.98 ms); bench data
LARGE_NPROBE = 16  # IVF65536 (>= LARGE_N): lists are ~4x shorter; extrapolated, not measured here
DEFAULT_QUANTIZER_EF = 64
DEFAULT_HNSW_EF_SEARCH = 64
TRAIN_POINTS_PER_CENTROID = 48  # k-means sample size per list (faiss warns below 39)
KMEANS_NITER = 10


@dataclass
class IndexPlan:
    """What index to build and how to search it."""

    key: str  # faiss index_factory string, e.g. "Flat", "IVF4096_HNSW32,SQ8", "HNSW32"
    dim: int  # vector dimension
    n: int  # number of vectors the plan was made for
    search_params: dict[str, int] = field(default_factory=dict)  # faiss ParameterSpace name -> value
    est_bytes: int = 0  # estimated index size in memory / on disk
    train_size: int = 0  # vectors used for training (0: no training)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def estimate_index_bytes(key: str, n: int, dim: int) -> int:
    """Approximate memory (≈ file size) of index ``key`` holding ``n`` vectors of ``dim``."""
    coarse = 0
    m = re.match(r"IVF(\d+)(_HNSW(\d+))?,", key)
    ids = 0
    if m:
        nlist = int(m.group(1))
        coarse = nlist * dim * 4 + (nlist * int(m.group(3)) * 2 * 4 if m.group(2) else 0)
        ids = 8  # IVF stores a 64-bit id per vector
    codes = key.split(",")[-1]
    if key == "Flat" or codes == "Flat":
        per = dim * 4
    elif codes.startswith("SQ8"):
        per = dim
    elif codes.startswith("SQfp16") or codes.startswith("SQ16"):
        per = dim * 2
    elif codes.startswith("SQ4"):
        per = (dim + 1) // 2
    elif pq := re.match(r"PQ(\d+)(x(\d+))?", codes):
        per = math.ceil(int(pq.group(1)) * int(pq.group(3) or 8) / 8)
    elif h := re.match(r"HNSW(\d+)", key):
        per = dim * 4 + int(h.group(1)) * 2 * 4 + 8
    else:
        per = dim * 4
    return int(coarse + n * (per + ids))


def _plan_params(key: str) -> dict[str, int]:
    if key.startswith("IVF"):
        nlist = int(re.match(r"IVF(\d+)", key).group(1))
        params = {"nprobe": LARGE_NPROBE if nlist >= 65536 else DEFAULT_NPROBE}
        if "_HNSW" in key.split(",")[0]:
            params["quantizer_efSearch"] = DEFAULT_QUANTIZER_EF
        return params
    if key.startswith("HNSW"):
        return {"efSearch": DEFAULT_HNSW_EF_SEARCH}
    return {}


def plan_for_key(key: str, n: int, dim: int, search_params: dict[str, int] | None = None) -> IndexPlan:
    """The plan for an explicit faiss factory ``key`` (``--index``), with default search parameters."""
    key = key.strip()
    if not key:
        raise ValueError("empty faiss index key")
    train = 0
    m = re.match(r"IVF(\d+)", key)
    if m:
        nlist = int(m.group(1))
        if n < nlist:
            raise ValueError(
                f"index {key!r} needs at least {nlist} vectors to train, the DB has {n}; "
                "use a smaller IVF size or --index Flat"
            )
        train = min(n, TRAIN_POINTS_PER_CENTROID * nlist)
        if re.search(r"PQ\d+", key):  # PQ codebooks want >= 39 x 256 training points
            train = min(n, max(train, 10_000))
    elif re.search(r"PQ\d+|SQ", key):
        train = min(n, 65536)
    params = _plan_params(key)
    params.update(search_params or {})
    return IndexPlan(
        key=key, dim=dim, n=n, search_params=params, est_bytes=estimate_index_bytes(key, n, dim), train_size=train
    )


def choose_index(n: int, dim: int, *, max_memory_bytes: int | None = None) -> IndexPlan:
    """Automatic index for ``n`` vectors of ``dim`` within ``max_memory_bytes`` (default: half the RAM)."""
    if n <= 0:
        raise ValueError("cannot index an empty set of vectors")
    budget = max_memory_bytes if max_memory_bytes is not None else physical_memory_bytes() // 2
    if n < FLAT_MAX and estimate_index_bytes("Flat", n, dim) <= budget:
        return plan_for_key("Flat", n, dim)
    nlist = 65536 if n >= LARGE_N else min(_pow2(4 * math.sqrt(n)), _pow2(n / 39) if n >= 39 else 1)
    nlist = max(nlist, 64)
    for codes in ("SQ8", f"PQ{max(8, dim // 8)}", f"PQ{max(8, dim // 16)}"):
        key = f"IVF{nlist}_HNSW32,{codes}"
        if estimate_index_bytes(key, n, dim) <= budget:
            return plan_for_key(key, n, dim)
    raise ValueError(f"no index of {n} x {dim} vectors fits {budget / 2**30:.1f} GiB; raise --max-memory")


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def set_search_params(index, params: dict[str, int]) -> None:
    """Apply stored search parameters (``nprobe``, ``quantizer_efSearch``, ``efSearch``) to ``index``."""
    import faiss

    if not params:
        return
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def build_index(vectors: np.ndarray, plan: IndexPlan, *, seed: int = 0, threads: int | None = None):
    """Train (when needed) and fill a faiss index following ``plan``; ids are row numbers.

    ``vectors`` must be L2-normalised float32 (N, D). Training uses a seeded sample, so a build is
    deterministic for a given faiss version and thread count.
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if d != plan.dim:
        raise ValueError(f"vectors are {d}-d, the index plan is for {plan.dim}-d")
    logger.info("building faiss index %s for %d x %d vectors (est. %.1f MiB)", plan.key, n, d, plan.est_bytes / 2**20)
    t0 = time.time()
    index = faiss.index_factory(d, plan.key, faiss.METRIC_INNER_PRODUCT)
    ivf = None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        pass
    if ivf is not None:
        ivf.cp.niter = KMEANS_NITER
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
        ivf.cp.min_points_per_centroid = 5
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = 40
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        m = min(n, plan.train_size or n)
        sample = x if m >= n else x[np.sort(rng.choice(n, size=m, replace=False))]
        index.train(sample)
    step = 65536
    for i in range(0, n, step):
        index.add(x[i : i + step])
    set_search_params(index, plan.search_params)
    logger.info("faiss index %s built in %.1f s", plan.key, time.time() - t0)
    return index


def write_index(index, path: str | os.PathLike) -> None:
    """Write ``index`` atomically (temp file in the same folder + fsync + rename)."""
    import faiss

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; DB files follow the umask (store.file_mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_index(path: str | os.PathLike, *, mmap: bool | None = None):
    """Read an index; large ones (≥ 256 MiB, or ``mmap=True``) memory-mapped read-only.

    Falls back to a normal read for index types faiss cannot memory-map.
    """
    import faiss

    path = str(path)
    if mmap is None:
        mmap = os.path.getsize(path) >= MMAP_MIN_BYTES
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            logger.debug("faiss cannot memory-map %s (%s); reading it into memory", path, e)
    return faiss.read_index(path)
