"""Reference DB: build → search, odd images, dedup / exclusion, packed mode, errors, kill -9 resume,
shards + merge, add, export, verify (tiny CLIP encoder, small generated images, CPU)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from xsr_helpers import committed_chunks
from xsr_core.clip_vision import ClipVisionEncoder
from xsr_core.refdb import (
    BuildConfig,
    ReferenceDB,
    RefDBError,
    add_images,
    build_db,
    db_signature,
    export_db,
    merge_shards,
    verify_db,
)
from xsr_core.refdb.cli import main as cli_main
from xsr_core.testing.tiny_clip import make_tiny_clip_vision

REPO = Path(__file__).resolve().parents[2]
N_GOOD = 14


@pytest.fixture(autouse=True)
def _trust_test_images(monkeypatch, tmp_path_factory):
    """Paths-mode DBs here point at images in pytest's temp folders: list that as an allowed root
    (a DB may read outside its own folder only where the user allowed it; tests of that rule unset it)."""
    monkeypatch.setenv("XSR_ALLOWED_ROOTS", str(tmp_path_factory.getbasetemp()))


def _cfg(**kw) -> BuildConfig:
    base = dict(workers=0, batch_size=4, chunk_size=4, progress=False, threads=1)
    base.update(kw)
    return BuildConfig(**base)


def _draw(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), tuple(int(x) for x in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = [x0, y0, x0 + int(rng.integers(8, w // 2 + 8)), y0 + int(rng.integers(8, h // 2 + 8))]
        fill = tuple(int(x) for x in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    return img


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refdb")
    enc = make_tiny_clip_vision(root / "enc.safetensors", seed=0)
    imgs = root / "images"
    (imgs / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        img = _draw(rng, int(rng.integers(80, 180)), int(rng.integers(80, 180)))
        sub = "b/" if i % 3 == 0 else ""
        img.save(imgs / f"{sub}img{i:02d}.{'png' if i % 2 else 'jpg'}", quality=95)
    return {"root": root, "enc": enc, "images": imgs}


@pytest.fixture(scope="module")
def db(data):
    build_db(data["root"] / "db", data["enc"], images=data["images"], config=_cfg())
    return data["root"] / "db"


@pytest.fixture(scope="module")
def encoder(data):
    return ClipVisionEncoder.from_file(data["enc"])


def _hr_query(encoder, path):
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return encoder.encode_images(torch.from_numpy(arr)[None]).cls


def _contents(path):
    """Everything a DB answers with: metadata rows, exact vectors (Flat), report counts."""
    with ReferenceDB.open(path) as db:
        rows = [(r.id, r.seq, r.path, r.sha256, r.width, r.height) for r in db.records(range(db.n))]
        vecs = db.index.reconstruct_n(0, db.n)
        return rows, vecs, db.info["counts"]


# ------------------------------------------------------------------------------------ basics


def test_build_then_search_finds_the_hr_image_itself(db, data, encoder):
    with ReferenceDB.open(db, allowed_roots=[data["images"]]) as ref:
        assert ref.n == N_GOOD and ref.dim == 32 and ref.index_key == "Flat"
        ref.check_encoder(encoder.fingerprint)
        recs = ref.records(range(ref.n))
        assert [r.path for r in recs] == sorted(
            (p.as_posix() for p in data["images"].rglob("*.*")),
            key=lambda p: Path(p).relative_to(data["images"]).as_posix(),
        )
        for r in recs:
            scores, ids = ref.search(_hr_query(encoder, r.path), k=4)
            assert ids.shape == (1, 4) and ids[0, 0] == r.id, r.path
            assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)
            assert np.all(np.diff(scores[0]) <= 1e-6)
        scores, ids = ref.search(np.ones((2, 32), np.float32), k=50)  # k > N
        assert ids.shape == (2, N_GOOD) and sorted(ids[0].tolist()) == list(range(N_GOOD))
        img = ref.load_images([3])[0]
        assert img.mode == "RGB" and img.size == (recs[3].width, recs[3].height)
        info = json.loads((db / "info.json").read_text())
        for key in ("n", "dim", "index", "encoder", "build_date", "tool_version", "mode", "preprocess"):
            assert key in info
    assert verify_db(db, allowed_roots=[data["images"]]) == []


def test_cli_search_info_verify(db, data, capsys):
    q = sorted(data["images"].glob("*.png"))[0]
    assert cli_main(["search", "--db", str(db), "--encoder", str(data["enc"]), "--image", str(q), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert hits[0]["path"] == q.as_posix() and len(hits) == 4
    assert cli_main(["info", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == N_GOOD
    assert cli_main(["verify", "--db", str(db)]) == 0


def test_cli_verify_names_sources_outside_allowed_roots(db, data, capsys, monkeypatch):
    monkeypatch.delenv("XSR_ALLOWED_ROOTS")
    assert cli_main(["verify", "--db", str(db)]) == 1  # a paths DB's sources are outside it: named, not read
    out = capsys.readouterr().out
    assert out.count("lies outside the folders XSR may read") == N_GOOD and "XSR_ALLOWED_ROOTS" in out
    assert cli_main(["verify", "--db", str(db), "--allow-root", str(data["images"])]) == 0


def test_odd_images_dedup_and_exclusion(tmp_path, data, encoder):
    imgs = tmp_path / "imgs"
    shutil.copytree(data["images"], imgs)
    rng = np.random.default_rng(5)
    base = _draw(rng, 120, 100)
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90)
    (imgs / "odd_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (imgs / "odd_garbage.jpg").write_bytes(b"this is not an image")
    base.convert("CMYK").save(imgs / "odd_cmyk.jpg")
    a16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(a16).save(imgs / "odd_16bit.png")
    pal = _draw(rng, 90, 90).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(imgs / "odd_palette.png", transparency=0)
    rgba = _draw(rng, 100, 90).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(imgs / "odd_rgba.png")
    Image.new("RGB", (3, 3), (10, 20, 30)).save(imgs / "odd_tiny.png")
    shutil.copy(imgs / "img01.png", imgs / "zz_dup_of_img01.png")
    # evaluation images: an exact copy of img02.jpg, and img05.png re-encoded as JPEG (other bytes)
    ev = tmp_path / "eval"
    ev.mkdir()
    shutil.copy(imgs / "img02.jpg", ev / "test_a.jpg")
    Image.open(imgs / "img05.png").convert("RGB").save(ev / "test_b.jpg", quality=95)
    out = tmp_path / "db"
    info = build_db(out, data["enc"], images=imgs, exclude=[ev], config=_cfg(exclude_threshold=0.9995))
    report = json.loads((out / "report.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"odd_truncated.jpg", "odd_garbage.jpg", "odd_tiny.png"}
    assert "too small" in skipped["odd_tiny.png"] and "decode" in skipped["odd_garbage.jpg"]
    assert [Path(d["path"]).name for d in report["duplicates"]] == ["zz_dup_of_img01.png"]
    excluded = sorted(Path(e["path"]).name for e in report["excluded"])
    assert excluded == ["img02.jpg", "img05.png"]
    with ReferenceDB.open(out) as ref:
        names = {Path(r.path).name for r in ref.records(range(ref.n))}
        assert {"odd_cmyk.jpg", "odd_16bit.png", "odd_palette.png", "odd_rgba.png", "img01.png"} <= names
        assert not names & {"img02.jpg", "img05.png", "zz_dup_of_img01.png"}
        assert ref.n == info["n"] == N_GOOD + 4 - 2
        r16 = next(r for r in ref.records(range(ref.n)) if r.path.endswith("odd_16bit.png"))
        arr = ref.load_images([r16.id], as_numpy=True)[0]
        gray = np.asarray(base.convert("L"))
        assert np.abs(arr[..., 0].astype(int) - gray).max() <= 1  # 16-bit scaled, not clipped


# ------------------------------------------------------------------------------- packed / moves


def test_packed_mode_is_self_contained_and_paths_mode_names_missing_files(tmp_path, data):
    imgs = tmp_path / "imgs"
    shutil.copytree(data["images"], imgs)
    big = _draw(np.random.default_rng(9), 900, 700)
    big.save(imgs / "big.png")
    build_db(tmp_path / "packed", data["enc"], images=imgs, config=_cfg(mode="packed"))
    build_db(tmp_path / "paths", data["enc"], images=imgs, config=_cfg(mode="paths"))
    shutil.copytree(tmp_path / "packed", tmp_path / "copied")
    shutil.rmtree(imgs)
    with ReferenceDB.open(tmp_path / "copied") as ref:
        assert ref.mode == "packed"
        bid = next(r.id for r in ref.records(range(ref.n)) if r.path.endswith("big.png"))
        im = ref.load_images([bid])[0]
        assert min(im.size) == 512 and im.size[0] > im.size[1]
        assert len(ref.load_images(range(ref.n))) == ref.n
    assert verify_db(tmp_path / "copied") == []
    with ReferenceDB.open(tmp_path / "paths", allowed_roots=[imgs]) as ref:
        with pytest.raises(RefDBError, match=r"img00\.jpg.*moved or deleted"):
            ref.load_images([0])
    problems = verify_db(tmp_path / "paths", allowed_roots=[imgs])
    assert problems and all("is missing" in p for p in problems)


# ------------------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path, db, data):
    bad = tmp_path / "bad"
    shutil.copytree(db, bad)
    # corrupt index (same size, garbage)
    idx = bad / "index.faiss"
    good_idx = idx.read_bytes()
    idx.write_bytes(b"\x00" * len(good_idx))
    with pytest.raises(RefDBError, match=r"index\.faiss is corrupt.*rerun"):
        ReferenceDB.open(bad)
    idx.unlink()
    with pytest.raises(RefDBError, match=r"index\.faiss is missing"):
        ReferenceDB.open(bad)
    idx.write_bytes(good_idx)
    # truncated metadata
    meta = bad / "meta.sqlite"
    good_meta = meta.read_bytes()
    meta.write_bytes(good_meta[: len(good_meta) // 2])
    with pytest.raises(RefDBError, match=r"meta\.sqlite is .*truncated"):
        ReferenceDB.open(bad)
    meta.write_bytes(b"\x13" * len(good_meta))  # same size, not a database
    with pytest.raises(RefDBError, match=r"meta\.sqlite is corrupt"):
        ReferenceDB.open(bad)
    meta.write_bytes(good_meta)
    # N mismatch between index and metadata
    info = json.loads((bad / "info.json").read_text())
    conn = sqlite3.connect(meta)
    conn.execute("DELETE FROM refs WHERE id = ?", (info["n"] - 1,))
    conn.commit()
    conn.close()
    info["files"]["meta.sqlite"] = meta.stat().st_size
    (bad / "info.json").write_text(json.dumps(info))
    with pytest.raises(RefDBError, match="different builds"):
        ReferenceDB.open(bad)
    # an unfinished build, a non-DB folder, an empty DB
    (bad / "info.json").unlink()
    with pytest.raises(RefDBError, match="not finished"):
        ReferenceDB.open(bad)
    with pytest.raises(RefDBError, match="not a reference DB"):
        ReferenceDB.open(tmp_path)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    Image.new("RGB", (3, 3)).save(only_bad / "tiny.png")
    (only_bad / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(RefDBError, match=r"no usable reference image.*2 skipped.*tiny\.png: too small"):
        build_db(tmp_path / "empty", data["enc"], images=only_bad, config=_cfg())
    assert not (tmp_path / "empty").exists(), "a failed new build must leave no half-built DB folder"
    (tmp_path / "no_images").mkdir()
    with pytest.raises(RefDBError, match="no image files"):
        build_db(tmp_path / "none", data["enc"], images=tmp_path / "no_images", config=_cfg())
    assert not (tmp_path / "none").exists()


def test_other_encoder_is_refused(tmp_path, db, data):
    other = make_tiny_clip_vision(tmp_path / "other.safetensors", seed=7)
    fp = ClipVisionEncoder.from_file(other).fingerprint
    with ReferenceDB.open(db) as ref:
        with pytest.raises(
            RefDBError, match=r"different CLIP vision encoder.*weights_sha256.*DB encoder.*query encoder"
        ):
            ref.check_encoder(fp)
        with pytest.raises(RefDBError, match="preprocess"):
            ref.check_encoder(dict(ref.fingerprint, preprocess="something-else"))
    with pytest.raises(RefDBError, match="different CLIP vision encoder"):
        cli_search = [
            "search",
            "--db",
            str(db),
            "--encoder",
            str(other),
            "--image",
            str(next(data["images"].glob("*.png"))),
        ]
        from xsr_core.refdb.cli import build_parser

        args = build_parser().parse_args(cli_search)
        args.func(args)
    assert cli_main(cli_search) == 2
    # resuming / adding with another encoder is refused too
    with pytest.raises(RefDBError, match="built with encoder"):
        add_images(db, other, images=data["images"], config=_cfg())


# -------------------------------------------------------------------- resume, shards, add, export

SLOW_COMMIT_CLI = """
import sys, time
from xsr_core.refdb import store
from xsr_core.refdb.cli import main
commit = store.Manifest.commit_chunk
def slow_commit(self, *a, **kw):
    time.sleep(0.7)
    return commit(self, *a, **kw)
store.Manifest.commit_chunk = slow_commit
sys.exit(main(sys.argv[1:]))
"""


def test_kill9_during_build_then_resume_gives_identical_db(tmp_path, db, data):
    out = tmp_path / "killed"
    args = [
        "build",
        "--images",
        str(data["images"]),
        "--encoder",
        str(data["enc"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--chunk-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "xsr_core.refdb", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # the killed run widens the window between writing a chunk and committing it (patched in the child)
    slow = [sys.executable, "-c", SLOW_COMMIT_CLI, *args]
    proc = subprocess.Popen(slow, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "build" / "manifest.sqlite"
    deadline = time.time() + 400  # generous: interpreter + torch start-up on a loaded CI machine
    committed = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            committed = committed_chunks(manifest)
            if committed >= 2:
                time.sleep(0.35)  # land inside the write → commit window of the next chunk
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 2 <= committed < 4, "the build should have been killed half-way"
    with pytest.raises(RefDBError, match="not finished"):
        ReferenceDB.open(out)
    conn = sqlite3.connect(manifest)
    done_before = conn.execute("SELECT COUNT(*) FROM files WHERE status != 'pending'").fetchone()[0]
    conn.close()
    assert 0 < done_before < N_GOOD
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows, vecs, counts = _contents(out)
    rows0, vecs0, counts0 = _contents(db)
    assert rows == rows0 and counts == counts0
    np.testing.assert_allclose(vecs, vecs0, atol=1e-6)
    emb = sorted(p.name for p in (out / "build" / "emb").iterdir())
    assert len(emb) == -(-N_GOOD // 4)  # no orphan / duplicate chunk files


def test_shards_merge_to_the_single_process_db(tmp_path, db, data):
    shards = []
    for i in range(3):
        s = tmp_path / f"s{i}"
        build_db(s, data["enc"], images=data["images"], config=_cfg(shard=(i, 3)))
        shards.append(s)
        with pytest.raises(RefDBError, match="shard"):
            ReferenceDB.open(s)
    with pytest.raises(RefDBError, match="no finished shard"):
        merge_shards(tmp_path / "partial", shards[:2])
    merge_shards(tmp_path / "merged", shards)
    rows, vecs, counts = _contents(tmp_path / "merged")
    rows0, vecs0, counts0 = _contents(db)
    assert rows == rows0 and counts == counts0
    np.testing.assert_allclose(vecs, vecs0, atol=1e-6)


def test_add_keeps_ids_and_export_subset(tmp_path, db, data):
    files = sorted(data["images"].rglob("*.*"), key=lambda p: p.relative_to(data["images"]).as_posix())
    first = tmp_path / "first.txt"
    first.write_text("".join(f"{p}\tcaption {i}\n" for i, p in enumerate(files[:6])))
    rest = tmp_path / "rest.txt"
    rest.write_text("".join(f"{p}\n" for p in files))  # overlaps: known files are ignored
    out = tmp_path / "grow"
    calls = []
    build_db(
        out,
        ClipVisionEncoder.from_file(data["enc"]),
        list_file=first,
        config=_cfg(),
        progress_callback=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (6, 6) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    rows_a, _, _ = _contents(out)
    add_images(out, data["enc"], list_file=rest, config=_cfg())
    rows_b, vecs_b, _ = _contents(out)
    assert rows_b[:6] == rows_a and len(rows_b) == N_GOOD
    with ReferenceDB.open(out) as ref:
        assert ref.records([0])[0].caption == "caption 0"
        sig = ref.signature()
        assert not ref.is_stale()
    export_db(out, tmp_path / "sub", count=5, index="HNSW32")
    with ReferenceDB.open(tmp_path / "sub") as sub:
        assert sub.n == 5 and sub.index_key == "HNSW32"
        assert [r.sha256 for r in sub.records(range(5))] == [r[3] for r in rows_b[:5]]
        _, ids = sub.search(vecs_b[2:3], k=1)
        assert ids[0, 0] == 2
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("7, 3 11")
    assert cli_main(["export", "--db", str(out), "--out", str(tmp_path / "sub2"), "--ids", str(ids_file)]) == 0
    with ReferenceDB.open(tmp_path / "sub2") as sub2:
        assert [r.sha256 for r in sub2.records(range(3))] == [rows_b[i][3] for i in (7, 3, 11)]
    add_images(out, data["enc"], images=data["images"], config=_cfg())  # nothing new: same DB, new files
    assert db_signature(out) != sig
