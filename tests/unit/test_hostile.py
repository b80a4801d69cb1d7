"""Hostile and careless input (issue #13) without ComfyUI: crafted DBs read nothing outside their
folder, weight files declaring huge configs are refused before allocation, odd DB names, one file
mode, DataLoader workers die with a kill -9'd build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from xsr_helpers import tamper
from xsr_core.models import RFA
from xsr_core.refdb import BuildConfig, ReferenceDB, RefDBError, build_db, verify_db
from xsr_core.refdb.cli import main as cli_main
from xsr_core.testing.tiny_clip import make_tiny_clip_vision
from xsr_core.testing.tiny_models import tiny_rfa_config
from xsr_core.weights import META_CONFIG, XSRWeightsError, load_model, save_model

REPO = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> BuildConfig:
    return BuildConfig(**dict(dict(workers=0, batch_size=4, chunk_size=4, progress=False, threads=1), **kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    enc = make_tiny_clip_vision(root / "enc.safetensors", seed=0)
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (72 + 8 * i, 80, 3), dtype=np.uint8)).save(imgs / f"img{i}.png")
    secret = root / "secret"
    secret.mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)).save(secret / "private.png")
    return {"root": root, "enc": enc, "images": imgs, "secret": secret / "private.png"}


@pytest.fixture(scope="module")
def packed(data):
    out = data["root"] / "packed"
    build_db(out, data["enc"], images=data["images"], config=_cfg(mode="packed"))
    return out


# ------------------------------------------------------------------------------- confinement


@pytest.mark.parametrize("how", ["absolute", "climb", "symlink"])
def test_packed_rows_pointing_outside_the_db_are_refused_and_verified(tmp_path, packed, data, how):
    db = tmp_path / "crafted"
    shutil.copytree(packed, db)
    secret = data["secret"]
    if how == "absolute":
        target = str(secret)
    elif how == "climb":
        target = os.path.relpath(secret, db)  # ../../hostile0/secret/private.png
    else:
        (db / "packed" / "evil.bin").symlink_to(secret)
        target = "packed/evil.bin"
    size = secret.stat().st_size
    tamper(db, "UPDATE refs SET pack_file=?, pack_offset=0, pack_length=? WHERE id=0", target, size)
    with ReferenceDB.open(db) as ref:
        with pytest.raises(RefDBError, match=r"outside the folders XSR may read.*crafted"):
            ref.load_images([0])
        assert len(ref.load_images([1, 2])) == 2  # the honest rows still work
    problems = verify_db(db)
    assert any(p.startswith("id 0:") and "outside" in p for p in problems), problems
    assert cli_main(["verify", "--db", str(db)]) == 1


def test_packed_row_with_absurd_length_is_refused_before_reading(tmp_path, packed):
    db = tmp_path / "crafted"
    shutil.copytree(packed, db)
    tamper(db, "UPDATE refs SET pack_offset=0, pack_length=? WHERE id=0", 1 << 40)
    with ReferenceDB.open(db) as ref, pytest.raises(RefDBError, match="damaged or crafted"):
        ref.load_images([0])
    assert any("beyond the end" in p for p in verify_db(db))


def test_paths_db_reads_only_under_allowed_roots(tmp_path, data, monkeypatch):
    monkeypatch.delenv("XSR_ALLOWED_ROOTS", raising=False)
    monkeypatch.delenv("XSR_REFDB_ALLOWED_ROOTS", raising=False)
    db = tmp_path / "paths"
    build_db(db, data["enc"], images=data["images"], config=_cfg(mode="paths"))
    tamper(db, "UPDATE refs SET path=? WHERE id=0", str(data["secret"]))
    with ReferenceDB.open(db, allowed_roots=[data["images"]]) as ref:
        with pytest.raises(RefDBError, match=r"private\.png.*outside the folders XSR may read"):
            ref.load_images([0])
        assert len(ref.load_images([1])) == 1
    with ReferenceDB.open(db) as ref, pytest.raises(RefDBError, match="XSR_ALLOWED_ROOTS"):
        ref.load_images([1])  # no root given: a paths DB may read only inside its own folder
    monkeypatch.setenv("XSR_ALLOWED_ROOTS", str(data["images"]))
    problems = verify_db(db)
    assert problems and all(p.startswith("id 0:") for p in problems)
    assert any("private.png" in p and "outside" in p for p in problems)


def test_build_skips_symlinks_leaving_the_images_folder(tmp_path, data):
    imgs = tmp_path / "imgs"
    shutil.copytree(data["images"], imgs)
    (imgs / "zz_link.png").symlink_to(data["secret"])
    db = tmp_path / "db"
    info = build_db(db, data["enc"], images=imgs, config=_cfg(mode="packed"))
    assert info["n"] == 6
    report = json.loads((db / "report.json").read_text())
    (skip,) = report["skipped"]
    assert skip["path"].endswith("zz_link.png") and "outside the source folder" in skip["reason"]


# ---------------------------------------------------------------------------------- weights


def _crafted_rfa(path: Path, **config) -> Path:
    """A tiny real RFA file whose metadata declares another config."""
    model = RFA(tiny_rfa_config(32, 16))
    save_model(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta[META_CONFIG])
    cfg.update(config)
    meta[META_CONFIG] = json.dumps(cfg)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_weight_file_declaring_a_huge_config_is_refused_before_allocation(tmp_path):
    # width 4096 x depth 2 is ~400 M parameters (1.6 GB) if built for real; the file is ~100 KB
    path = _crafted_rfa(tmp_path / "huge.safetensors", width=4096, clip_dim=4096, out_dim=4096, depth=2)
    assert path.stat().st_size < 300_000
    code = textwrap.dedent(f"""
        import resource, sys
        from xsr_core.models import RFA
        from xsr_core.weights import XSRWeightsError, load_model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_model({str(path)!r}, expected=RFA)
        except XSRWeightsError as e:
            print("REFUSED", e)
        print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert "REFUSED" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "larger than the file" in res.stdout or "another shape" in res.stdout
    growth_kb = int(res.stdout.split("GROWTH_KB")[1].split()[0])
    assert growth_kb < 200_000, f"the loader grew by {growth_kb} KB before refusing"


@pytest.mark.parametrize("bad", [{"depth": 10**9}, {"mlp_ratio": float("nan")}, {"width": 16, "heads": 0}])
def test_weight_config_values_are_bounded_and_finite(tmp_path, bad):
    path = tmp_path / "bad.safetensors"
    model = RFA(tiny_rfa_config(32, 16))
    save_model(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = dict(json.loads(meta[META_CONFIG]), **bad)
    meta[META_CONFIG] = json.dumps(cfg)  # json writes NaN as NaN, which Python reads back
    save_file(tensors, str(path), metadata=meta)
    t0 = time.monotonic()
    with pytest.raises(XSRWeightsError, match=str(path.name)):
        load_model(path, expected=RFA)
    assert time.monotonic() - t0 < 30


def test_shape_mismatch_is_named_from_the_header(tmp_path):
    path = _crafted_rfa(tmp_path / "wide.safetensors", width=64)
    with pytest.raises(XSRWeightsError, match="another shape|missing|unexpected|larger than the file"):
        load_model(path, expected=RFA)


# ------------------------------------------------------------------------ names, modes, workers


@pytest.mark.parametrize("name", ["db #1", "100%", "what?", "a&b=c;d", "ünï cødé", "x?mode=rwc"])
def test_db_names_with_uri_characters_open_and_leave_no_stray_file(tmp_path, packed, name):
    parent = tmp_path / "dbs"
    parent.mkdir()
    db = parent / name
    shutil.copytree(packed, db)
    before = sorted(p.name for p in parent.iterdir())
    with ReferenceDB.open(db) as ref:
        assert ref.n == 6 and len(ref.load_images([0])) == 1
    assert verify_db(db) == []
    assert sorted(p.name for p in parent.iterdir()) == before, "opening a DB created a stray file"


def test_db_files_follow_the_umask(tmp_path, data):
    old = os.umask(0o022)
    try:
        db = tmp_path / "modes"
        build_db(db, data["enc"], images=data["images"], config=_cfg(mode="packed"))
    finally:
        os.umask(old)
    files = [p for p in db.rglob("*") if p.is_file() and not p.name.startswith("manifest.sqlite")]
    modes = {p.relative_to(db).as_posix(): p.stat().st_mode & 0o777 for p in files}
    for want in ("info.json", "index.faiss", "meta.sqlite", "report.json"):
        assert want in modes
    assert set(modes.values()) == {0o644}, modes
    os.umask(0o077)
    try:
        db2 = tmp_path / "private"
        build_db(db2, data["enc"], images=data["images"], config=_cfg(mode="packed"))
    finally:
        os.umask(old)
    assert {
        p.stat().st_mode & 0o777 for p in db2.rglob("*") if p.is_file() and not p.name.startswith("manifest.sqlite")
    } == {0o600}


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_kill9_of_a_build_takes_its_dataloader_workers_with_it(tmp_path, data):
    imgs = tmp_path / "many"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    # packed mode ships each batch's JPEG bytes through the workers' result pipe: with the parent gone that
    # pipe fills and, without PR_SET_PDEATHSIG, a worker blocks for ever flushing it at exit
    tile = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    for i in range(120):
        Image.fromarray(np.roll(tile, i, axis=1)).save(imgs / f"i{i:04d}.png", compress_level=0)
    cmd = [
        sys.executable,
        "-m",
        "xsr_core.refdb",
        "build",
        "--images",
        str(imgs),
        "--encoder",
        str(data["enc"]),
        "--out",
        str(tmp_path / "db"),
        "--workers",
        "2",
        "--batch-size",
        "8",
        "--chunk-size",
        "64",
        "--mode",
        "packed",
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2, "the build never started its 2 workers"
        time.sleep(1.0)  # let the workers finish their worker_init_fn
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if _running(w)]
        time.sleep(0.2)
    for w in alive:  # clean up before failing, by pid
        os.kill(w, signal.SIGKILL)
    assert not alive, f"DataLoader workers {alive} outlived the killed build"


class _Interrupt(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (raised from the progress callback)."""


def test_interrupted_build_keeps_every_finished_batch_and_resumes(tmp_path, data):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(2)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(imgs / f"{i:02d}.png")
    calls = []

    def interrupt_after_two_batches(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise _Interrupt()

    db = tmp_path / "db"
    cfg = dict(mode="packed", batch_size=3, chunk_size=3)  # the node's rule: one chunk per batch
    with pytest.raises(_Interrupt):
        build_db(db, data["enc"], images=imgs, config=_cfg(**cfg), progress_callback=interrupt_after_two_batches)
    conn = sqlite3.connect(db / "build" / "manifest.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 2  # both finished batches kept
    conn.close()
    with pytest.raises(RefDBError, match="not finished"):
        ReferenceDB.open(db)
    info = build_db(db, data["enc"], images=imgs, config=_cfg(**cfg))
    assert info["n"] == 10


def test_interrupt_before_the_first_commit_leaves_no_folder(tmp_path, data):
    def interrupt(done, total):
        raise _Interrupt()

    with pytest.raises(_Interrupt):
        build_db(
            tmp_path / "db",
            data["enc"],
            images=data["images"],
            config=_cfg(batch_size=2, chunk_size=4),
            progress_callback=interrupt,
        )
    assert not (tmp_path / "db").exists()


def test_meta_size_guard_ignores_other_threads(tmp_path):
    """The guard's hook is process-wide; a model built meanwhile in another thread is not its business."""
    import threading

    from xsr_core.weights import _DeclaredSizeGuard

    errors = []

    def build_elsewhere():
        try:
            torch_nn_linear = __import__("torch").nn.Linear
            torch_nn_linear(512, 512)  # 262k values: far above the guard's limit below
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with _DeclaredSizeGuard("x.safetensors", max_count=1, max_numel=10):
        t = threading.Thread(target=build_elsewhere)
        t.start()
        t.join()
    assert not errors, errors
