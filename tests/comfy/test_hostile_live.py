"""Hostile and careless input through the live server (issue #13): crafted DBs, symlinks and weight
files read nothing they should not, NaN/inf and oversized inputs are refused at queue time naming the
node and input, 16-bit / RGBA folder images decode right, node builds with odd names and failures
leave clean folders — and the server keeps serving after each."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from xsr_helpers import committed_chunks, tamper, upload_lr8
from xsr_core.comfy_server import ComfyError, execution_error
from xsr_core.demo import xsr_graph
from xsr_core.testing.zoo import CLIP_VISION_NAME, DEMO_REFDB, ZOO_NAMES

pytestmark = pytest.mark.comfy


def graph(lr_name, **kw):
    kw.setdefault("steps", 1)
    return xsr_graph(lr_name, **ZOO_NAMES, **kw)


def retrieve_only(lr_name, refdb=DEMO_REFDB, top_k=4):
    g = graph(lr_name, top_k=top_k)
    g["db"]["inputs"]["db_name"] = refdb
    keep = ("lr", "prep", "cv", "models", "db", "retrieve")
    out = {k: v for k, v in g.items() if k in keep}
    out["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["retrieve", 0]}}
    return out


@pytest.fixture(scope="module")
def lr8(comfy, tmp_path_factory):
    return upload_lr8(comfy, tmp_path_factory.mktemp("lr"), "hostile_lr8.png", 3)


@pytest.fixture(scope="module")
def refdb_root(comfy) -> Path:
    return Path(comfy.base_dir) / "models" / "xsr_refdb"  # the server's own (each server of the matrix has one)


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (96, 96), (250, 10, 200)).save(p)
    return p


_RUNS = itertools.count()


def _still_serving(comfy, lr8):
    """A good prompt runs afterwards (top_k varies so ComfyUI's cache cannot answer for the server)."""
    k = 1 + next(_RUNS) % 4
    entry = comfy.run(retrieve_only(lr8, top_k=k))
    assert len(entry["outputs"]["retrieve"]["xsr_refs"]) == k


# ----------------------------------------------------------------------------- 1. confinement


@pytest.mark.parametrize("how", ["absolute", "climb"])
def test_crafted_packed_db_cannot_read_or_preview_outside_its_folder(comfy, lr8, refdb_root, secret, how):
    name = f"crafted_{how}"
    db = refdb_root / name
    shutil.rmtree(db, ignore_errors=True)
    shutil.copytree(refdb_root / DEMO_REFDB, db)
    target = str(secret) if how == "absolute" else os.path.relpath(secret, db)
    tamper(db, "UPDATE refs SET pack_file=?, pack_offset=0, pack_length=?", target, secret.stat().st_size)
    pid = comfy.queue(retrieve_only(lr8, refdb=name))
    entry = comfy.wait(pid)
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "XSR_Retrieve", entry["status"]
    assert "outside the folders XSR may read" in err["exception_message"]
    assert "retrieve" not in entry.get("outputs", {}), "no preview may be served from a crafted DB"
    _still_serving(comfy, lr8)


def test_crafted_paths_db_pointing_anywhere_is_refused(comfy, lr8, refdb_root, secret):
    db = refdb_root / "crafted_paths"
    shutil.rmtree(db, ignore_errors=True)
    shutil.copytree(refdb_root / DEMO_REFDB, db)
    info = json.loads((db / "info.json").read_text())
    info["mode"] = "paths"
    (db / "info.json").write_text(json.dumps(info))
    tamper(db, "UPDATE refs SET path=?, pack_file=NULL", str(secret))
    with pytest.raises(ComfyError, match=r"secret\.png.*outside the folders XSR may read"):
        comfy.run(retrieve_only(lr8, refdb="crafted_paths"))
    _still_serving(comfy, lr8)


def test_symlink_in_input_folder_pointing_outside_is_refused(comfy, lr8, secret, tmp_path):
    folder = comfy.base_dir / "input" / "hostile_links"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "a.png")
    link = folder / "b.png"
    if not link.is_symlink():
        link.symlink_to(secret)
    prompt = {
        "f": {"class_type": "XSR_LoadImageFolder", "inputs": {"folder": "hostile_links", "limit": 0}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["f", 0]}},
    }
    with pytest.raises(ComfyError, match=r"HTTP 400.*b\.png.*outside"):
        comfy.queue(prompt)
    _still_serving(comfy, lr8)


# ---------------------------------------------------------------------------- 2. finite values


@pytest.mark.parametrize(
    "field,value",
    [("strength", math.nan), ("start_percent", math.nan), ("end_percent", math.nan), ("strength", math.inf)],
)
def test_non_finite_floats_are_refused_at_queue_time(comfy, lr8, field, value):
    g = graph(lr8)
    g["patch"]["inputs"][field] = value  # json.dumps writes NaN / Infinity, which the server parses
    with pytest.raises(ComfyError, match=rf"HTTP 400.*XSR_AdaINPatch: input '{field}' is (nan|inf)"):
        comfy.queue(g)
    _still_serving(comfy, lr8)


def test_all_problems_of_a_prompt_are_reported_at_once(comfy, lr8):
    g = graph(lr8, top_k=99)
    g["patch"]["inputs"]["strength"] = math.nan
    g["patch"]["inputs"]["apply_to"] = "everything"
    g["models"]["inputs"]["i2t_name"] = "nope.safetensors"
    g["db"]["inputs"]["db_name"] = "no_such_db"
    g["fix"]["inputs"]["method"] = "magic"
    with pytest.raises(ComfyError) as info:
        comfy.queue(g)
    msg = str(info.value)
    for want in (
        "input 'strength' is nan",
        "'apply_to' is 'everything'",
        "nope.safetensors",
        "no_such_db",
        "'method' is 'magic'",
        "'top_k' is 99",
    ):
        assert want in msg, (want, msg[:3000])
    _still_serving(comfy, lr8)


# ---------------------------------------------------------------------------- 3. weights, caps


def test_weight_file_declaring_a_huge_config_is_refused_at_queue_time(comfy, lr8, tiny_zoo):
    src = Path(comfy.base_dir) / "models" / "xsr" / "rfa.safetensors"
    dst = Path(comfy.base_dir) / "models" / "xsr" / "hostile_huge_rfa.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["xsr.config"])
    cfg.update(width=8192, clip_dim=8192, out_dim=8192, depth=64)  # ~50 G parameters if built for real
    meta["xsr.config"] = json.dumps(cfg)
    save_file(tensors, str(dst), metadata=meta)
    g = graph(lr8)
    g["models"]["inputs"]["rfa_name"] = dst.name
    with pytest.raises(ComfyError, match=r"HTTP 400.*hostile_huge_rfa.*(larger than the file|another shape)"):
        comfy.queue(g)
    _still_serving(comfy, lr8)


def test_top_k_above_the_i2t_limit_is_refused_before_retrieval(comfy, lr8):
    with pytest.raises(ComfyError, match=r"XSR_Retrieve: top_k 8 is more references than the I2T.*accepts \(4\)"):
        comfy.run(retrieve_only(lr8, top_k=8))
    _still_serving(comfy, lr8)


def test_overlong_caption_is_refused_at_queue_time(comfy, lr8):
    g = graph(lr8)
    g["enhance"]["inputs"]["caption_override"] = "a cat " * 20_000  # 120,000 characters
    with pytest.raises(ComfyError, match=r"HTTP 400.*caption_override.*120000 characters.*XSR_MAX_PROMPT_CHARS"):
        comfy.queue(g)


def test_folder_batch_above_the_cap_is_refused_at_queue_time(comfy, lr8):
    folder = comfy.base_dir / "input" / "hostile_many"
    folder.mkdir(exist_ok=True)
    for i in range(65):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"{i:03d}.png")
    prompt = {
        "f": {"class_type": "XSR_LoadImageFolder", "inputs": {"folder": "hostile_many", "limit": 0}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["f", 0]}},
    }
    with pytest.raises(ComfyError, match=r"HTTP 400.*65 images.*64.*XSR_MAX_BATCH"):
        comfy.queue(prompt)
    prompt["f"]["inputs"]["limit"] = 64
    comfy.run(prompt)


# ------------------------------------------------------------------------------- 4. image modes


def test_folder_loader_decodes_16bit_and_rgba_correctly(comfy):
    folder = comfy.base_dir / "input" / "hostile_modes"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(folder / "a_gray16.png")  # mode I;16: mid-gray
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(folder / "b_rgba.png")  # half-transparent red: over black = 100
    prompt = {
        "f": {"class_type": "XSR_LoadImageFolder", "inputs": {"folder": "hostile_modes", "limit": 0}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["f", 0], "filename_prefix": "hostile_modes"}},
    }
    entry = comfy.run(prompt)
    gray, red = [np.asarray(Image.open(io.BytesIO(b))) for b in comfy.output_images(entry, "s")]
    assert abs(int(gray[0, 0, 0]) - 128) <= 1 and gray[0, 0, 0] == gray[0, 0, 2], gray[0, 0]
    assert abs(int(red[0, 0, 0]) - 100) <= 1 and red[0, 0, 1] == 0, red[0, 0]


# ----------------------------------------------------------------------------------- 5. builds


def _build_prompt(folder, db_name, mode="packed"):
    return {
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
        "b": {
            "class_type": "XSR_BuildReferenceDB",
            "inputs": {"clip_vision": ["cv", 0], "images_folder": folder, "db_name": db_name, "mode": mode},
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["b", 1]}},
    }


@pytest.fixture(scope="module")
def hr_folder(comfy, tmp_path_factory):
    from xsr_core.testing.synthetic import write_synthetic_images

    folder = comfy.base_dir / "input" / "hostile_hr"
    write_synthetic_images(folder, 5, size=96, seed=21)
    return "hostile_hr"


def test_db_names_with_uri_characters_build_and_load(comfy, lr8, refdb_root, hr_folder):
    name = "odd #1 100%? ü"
    before = {p.name for p in refdb_root.iterdir()}
    comfy.run(_build_prompt(hr_folder, name))
    db = refdb_root / name
    assert (db / "info.json").is_file()
    assert {p.name for p in refdb_root.iterdir()} - before == {name}, "stray files next to the DB"
    entry = comfy.run(retrieve_only(lr8, refdb=name))
    assert len(entry["outputs"]["retrieve"]["xsr_refs"]) == 4
    modes = {
        p.relative_to(db).as_posix(): p.stat().st_mode & 0o777
        for p in db.rglob("*")
        if p.is_file() and "manifest.sqlite" not in p.name
    }
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_failed_new_node_build_leaves_no_half_db(comfy, lr8, refdb_root):
    folder = comfy.base_dir / "input" / "hostile_tiny"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")  # all below the minimum side
    with pytest.raises(ComfyError, match="no usable reference image"):
        comfy.run(_build_prompt("hostile_tiny", "never_half_built"))
    assert not (refdb_root / "never_half_built").exists()
    with pytest.raises(ComfyError, match=r"HTTP 400.*db_name.*plain folder name"):
        comfy.queue(_build_prompt("hostile_tiny", "../escape"))
    _still_serving(comfy, lr8)


def test_interrupted_node_build_keeps_finished_chunks_and_resumes(comfy, lr8, refdb_root):
    import time

    folder = comfy.base_dir / "input" / "hostile_interrupt"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    n = 480  # 15 chunks of 32: far below the CLI's 4096-file chunks, which kept nothing when interrupted
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    name = "interrupted_build"
    manifest = refdb_root / name / "build" / "manifest.sqlite"
    pid = comfy.queue(_build_prompt("hostile_interrupt", name))
    committed, deadline = 0, time.monotonic() + 300
    while time.monotonic() < deadline and committed < 1:
        committed = committed_chunks(manifest)
        time.sleep(0.05)
    comfy.interrupt()
    entry = comfy.wait(pid)
    assert entry["status"]["status_str"] == "error" or any(
        m[0] == "execution_interrupted" for m in entry["status"]["messages"]
    ), "the build should have been interrupted"
    conn = sqlite3.connect(manifest)
    kept = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    conn.close()
    assert 1 <= kept < n // 32, f"{kept} chunks kept"
    assert not (refdb_root / name / "info.json").exists()
    with pytest.raises(ComfyError, match="not finished"):
        comfy.queue(
            {
                "db": {"class_type": "XSR_LoadReferenceDB", "inputs": {"db_name": name}},
                "show": {"class_type": "PreviewAny", "inputs": {"source": ["db", 0]}},
            }
        )
    entry = comfy.run(_build_prompt("hostile_interrupt", name))  # queue again: continues
    assert json.loads((refdb_root / name / "info.json").read_text())["n"] == n
    _still_serving(comfy, lr8)
