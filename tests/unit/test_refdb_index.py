"""faiss index choice and approximate-vs-exact recall on seeded clustered synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

from xsr_core.refdb.index import (
    FLAT_MAX,
    build_index,
    choose_index,
    estimate_index_bytes,
    normalize,
    plan_for_key,
    read_index,
    set_search_params,
    write_index,
)

RECALL_TOLERANCE = 0.9  # stated tolerance: approximate top-4 must share >= 90% of exact Flat top-4


def _clustered(n, dim, seed, n_clusters=32):
    w = np.random.default_rng(1234)
    centres = normalize(w.standard_normal((n_clusters, dim)))
    rng = np.random.default_rng(seed)
    c = rng.integers(0, n_clusters, n)
    return normalize(centres[c] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4)


@pytest.fixture(scope="module")
def vectors():
    xb = _clustered(6000, 64, seed=1)
    xq = _clustered(200, 64, seed=2)
    exact = build_index(xb, plan_for_key("Flat", len(xb), 64), threads=1)
    _, gt = exact.search(xq, 4)
    return xb, xq, gt


def _recall(ids, gt):
    return float(np.mean([len(set(a) & set(b)) / gt.shape[1] for a, b in zip(ids, gt)]))


@pytest.mark.parametrize("key", ["IVF64,Flat", "IVF64_HNSW32,SQ8", "HNSW32"])
def test_approximate_index_matches_exact_top4(vectors, key, tmp_path):
    xb, xq, gt = vectors
    plan = plan_for_key(key, len(xb), xb.shape[1])
    index = build_index(xb, plan, threads=1)
    _, ids = index.search(xq, 4)
    assert _recall(ids, gt) >= RECALL_TOLERANCE, key
    # what the DB stores and reopens (memory-mapped for IVF) answers the same
    write_index(index, tmp_path / "index.faiss")
    again = read_index(tmp_path / "index.faiss", mmap=True)
    set_search_params(again, plan.search_params)
    _, ids2 = again.search(xq, 4)
    assert np.array_equal(ids, ids2)


def test_exact_self_search_and_normalize():
    xb = _clustered(500, 16, seed=3)
    assert np.allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-5)
    index = build_index(xb, plan_for_key("Flat", 500, 16))
    scores, ids = index.search(xb[:10], 1)
    assert ids[:, 0].tolist() == list(range(10)) and np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_choose_index_by_size_and_memory():
    assert choose_index(100, 1024).key == "Flat"
    assert choose_index(FLAT_MAX - 1, 1024).key == "Flat"
    p = choose_index(1_000_000, 1024, max_memory_bytes=8 << 30)
    assert p.key == "IVF4096_HNSW32,SQ8"
    assert p.search_params["nprobe"] >= 1 and "quantizer_efSearch" in p.search_params
    assert choose_index(100_000, 1024, max_memory_bytes=8 << 30).key == "IVF1024_HNSW32,SQ8"
    assert choose_index(10_000_000, 1024, max_memory_bytes=64 << 30).key.startswith("IVF65536_HNSW32,SQ8")
    small_budget = choose_index(10_000_000, 1024, max_memory_bytes=4 << 30)
    assert "PQ" in small_budget.key and small_budget.est_bytes <= 4 << 30
    with pytest.raises(ValueError, match="fits"):
        choose_index(10_000_000, 1024, max_memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="needs at least"):
        plan_for_key("IVF4096,SQ8", 1000, 64)


def test_memory_estimate_close_to_actual(vectors, tmp_path):
    xb, _, _ = vectors
    for key in ("Flat", "IVF64_HNSW32,SQ8", "HNSW32"):
        plan = plan_for_key(key, len(xb), xb.shape[1])
        write_index(build_index(xb, plan, threads=1), tmp_path / "i.faiss")
        size = (tmp_path / "i.faiss").stat().st_size
        assert 0.7 * size <= estimate_index_bytes(key, len(xb), xb.shape[1]) <= 1.4 * size, key


def _synthetic_db(path, xb, index_key):
    """A DB whose embeddings are ``xb`` (a hand-made manifest with one committed chunk), finalised
    with the forced ``index_key`` exactly as `build --index KEY` finalises."""
    from xsr_core.refdb import finalize
    from xsr_core.refdb.store import Manifest, write_npy_atomic

    write_npy_atomic(path / "build" / "emb" / "emb_000000000000.npy", xb)
    with Manifest(path, create=True) as man:
        with man.transaction() as c:
            for k, v in dict(
                encoder={"arch": "synthetic", "weights_sha256": "0", "preprocess": "-"},
                mode="paths",
                dim=xb.shape[1],
                chunk_size=len(xb),
                min_side=1,
                pack_side=512,
                pack_quality=90,
                exclude_threshold=0.95,
                index=index_key,
                sources=[],
                encoder_source="-",
            ).items():
                man.set(k, v, c)
            c.executemany(
                "INSERT INTO files(seq, path, status, sha256, width, height, chunk, row) "
                "VALUES (?, ?, 'ok', ?, 1, 1, 'c0', ?)",
                [(i, f"/synthetic/{i}.png", f"{i:064x}", i) for i in range(len(xb))],
            )
            c.execute(
                "INSERT INTO chunks VALUES ('c0', 0, ?, ?, 'build/emb/emb_000000000000.npy', NULL)", (len(xb), len(xb))
            )
    return finalize(path, index_key=index_key)


@pytest.mark.parametrize("key", ["IVF64_HNSW32,SQ8", "HNSW32"])
def test_forced_index_db_matches_flat_db(vectors, tmp_path, key):
    from xsr_core.refdb import ReferenceDB

    xb, xq, gt = vectors
    (tmp_path / "flat").mkdir()
    (tmp_path / "approx").mkdir()
    assert _synthetic_db(tmp_path / "flat", xb, "Flat")["index"]["key"] == "Flat"
    info = _synthetic_db(tmp_path / "approx", xb, key)
    assert info["index"]["key"] == key and info["index"]["search_params"]  # nprobe / efSearch recorded
    with ReferenceDB.open(tmp_path / "flat") as flat, ReferenceDB.open(tmp_path / "approx", mmap=True) as approx:
        _, ids_exact = flat.search(xq, 4)
        assert np.array_equal(ids_exact, gt)
        _, ids = approx.search(xq, 4)
        assert _recall(ids, ids_exact) >= RECALL_TOLERANCE
