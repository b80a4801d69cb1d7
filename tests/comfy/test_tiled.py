"""The tiled x16 path on the live server (tiny zoo): any size up to 256 px, per-tile retrieval, no seams, parity."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from comfy_helpers import png_size
from xsr_core.comfy_server import ComfyError
from xsr_core.demo import xsr_graph, xsr_tiled_graph
from xsr_core.testing.zoo import CHECKPOINT_NAME, CLIP_VISION_NAME, CONTROLNET_NAME, DEMO_REFDB

pytestmark = pytest.mark.comfy
ZOO = {"ckpt": CHECKPOINT_NAME, "controlnet": CONTROLNET_NAME, "clip_vision": CLIP_VISION_NAME, "refdb": DEMO_REFDB}


def tiled(lr_name, **kw):
    # two tiles per model call: the tiny U-Net's 4096-token attention of a whole CFG batch of tiles
    # would take GBs of RAM on the CPU runner (the auto setting takes all tiles when RAM is free)
    kw.setdefault("steps", 2)
    kw.setdefault("tile_batch", 2)
    return xsr_tiled_graph(lr_name, **ZOO, **kw)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)


def _upload(comfy, tmp_path_factory, arr: np.ndarray, name: str) -> str:
    p = tmp_path_factory.mktemp("tiled_lr") / name
    Image.fromarray(arr).save(p)
    return comfy.upload_image(p)


def _synthetic(seed: int, side: int = 32) -> np.ndarray:
    from xsr_core.testing.synthetic import synthetic_image

    return np.asarray(synthetic_image(seed, 128).convert("RGB").resize((side, side), Image.BICUBIC))


def _ramp(h: int, w: int) -> np.ndarray:
    """A smooth LR (colour ramps): the seam test needs an input without edges of its own."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([40 + 3 * x, 60 + 2.5 * y * 48 / h, 200 - 1.5 * x - y * 48 / h], axis=-1)
    return arr.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lr64x48(comfy, tmp_path_factory):
    return _upload(comfy, tmp_path_factory, _ramp(48, 64), "smooth_64x48.png")


@pytest.fixture(scope="module")
def strip(comfy, tmp_path_factory):
    """A smooth 64x8 LR: three 32x8 tiles (starts 0, 16, 32 LR px). Its 64x16-latent tiles keep the tiny
    U-Net's attention at 1024 tokens, 16x cheaper on CPU than the 4096 tokens of a 32x32 tile."""
    return _upload(comfy, tmp_path_factory, _ramp(8, 64), "smooth_64x8.png")


@pytest.fixture(scope="module")
def run_64x48(comfy, lr64x48):
    # one step without CFG: six 512x512 tiles of the tiny U-Net are slow on the CPU runner
    return comfy.run(tiled(lr64x48, seed=3, steps=1, cfg=1.0, tile_batch=3))


def test_64x48_lr_gives_1024x768_with_per_tile_refs_and_captions(run_64x48):
    entry = run_64x48
    out = entry["outputs"]["save"]["images"]
    assert len(out) == 1
    preview = entry["outputs"]["preview"]
    info = preview["xsr_tiles"][0]
    assert info["tiling"]["rows"] == 2 and info["tiling"]["cols"] == 3 and len(info["tiles"]) == 6
    assert all(len(t["refs"]) == 4 for t in info["tiles"])
    assert len(preview["xsr_tile_images"]) == 24 and len(info["captions"]) == 6
    assert all(c.endswith("high quality, detailed") for c in info["captions"])
    assert len(entry["outputs"]["retrieve"]["xsr_refs"]) == 24


def test_64x48_output_size(comfy, run_64x48):
    data = comfy.output_images(run_64x48, "save")[0]
    assert png_size(data) == (1024, 768)


def _seam_ratio(img: np.ndarray, edges: list[int]) -> float:
    """Mean horizontal gradient energy in 2-px bands at the tile edges over the mean elsewhere."""
    gx = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))  # (W-1,) energy between column c and c+1
    band = np.zeros_like(gx, dtype=bool)
    for e in edges:
        band[max(0, e - 2) : e + 1] = True
    return float(gx[band].mean() / gx[~band].mean())


@pytest.mark.slow
def test_no_seams_at_tile_borders_on_a_smooth_input(comfy, strip):
    """Deterministic run on a smooth LR: no excess gradient energy where tiles meet.

    The tiny zoo's random VAE paints noise-like texture over every image, so even hard (non-overlapping)
    tiles leave no seam that can be told from it here; that the blending removes seams is shown on a
    smooth field by tests/unit/test_tiling.py::test_blending_leaves_no_seam_where_hard_tiles_do. This
    live run checks the wiring: tile crops, hint crops and blending put every tile in its place, so the
    borders look like the inside (a misplaced or mis-weighted tile shows as a band at its edges).
    """
    # tiles of the 64x8 LR start at x = 0, 16, 32 LR px: their edges lie at 256, 512, 768 output px
    entry = comfy.run(tiled(strip, seed=3, tile_batch=3))
    blended = _pixels(comfy.output_images(entry, "save")[0])
    assert _seam_ratio(blended, [256, 512, 768]) < 1.3
    again = _pixels(comfy.output_images(comfy.run(tiled(strip, seed=3, tile_batch=3)), "save")[0])
    assert np.array_equal(blended, again)  # deterministic


def test_tiles_with_different_content_retrieve_different_references(comfy, tmp_path_factory):
    a, b = _synthetic(1), _synthetic(2)
    lr = _upload(comfy, tmp_path_factory, np.concatenate([a, b, a], axis=1), "aba_96x32.png")
    g = tiled(lr, overlap=0)
    for node in ("sample", "decode", "fix", "save"):  # only the preview output: retrieval without sampling
        del g[node]
    entry = comfy.run(g)
    tiles = entry["outputs"]["preview"]["xsr_tiles"][0]["tiles"]
    assert len(tiles) == 3
    names = [[r["name"] for r in t["refs"]] for t in tiles]
    scores = [[round(r["score"], 5) for r in t["refs"]] for t in tiles]
    assert names[0] == names[2] and scores[0] == scores[2]  # the same content: the same references
    assert (names[0], scores[0]) != (names[1], scores[1])
    assert names[0] != names[1]


def test_32x32_through_the_tiled_path_equals_the_untiled_graph(comfy, tmp_path_factory):
    lr = _upload(comfy, tmp_path_factory, _synthetic(4), "lr32.png")
    untiled = xsr_graph(lr, **ZOO, steps=1, seed=7)
    ref = comfy.output_images(comfy.run(untiled), "save")[0]
    g = tiled(lr, seed=7, steps=1, tiled_decode=False)
    out = comfy.output_images(comfy.run(g), "save")[0]
    assert png_size(out) == (512, 512)
    assert np.array_equal(_pixels(out), _pixels(ref))


@pytest.mark.slow
def test_strength_zero_is_bit_identical_to_the_tiled_graph_without_xsr_patches(comfy, strip):
    zero = comfy.output_images(comfy.run(tiled(strip, seed=5, steps=1, strength=0.0)), "save")[0]
    plain = tiled(strip, seed=5, steps=1)
    plain["apply"]["inputs"]["control_net"] = ["cn", 0]
    plain["tiled"]["inputs"]["model"] = ["ckpt", 0]
    del plain["patch"]
    ref = comfy.output_images(comfy.run(plain), "save")[0]
    assert np.array_equal(_pixels(zero), _pixels(ref))
    one = comfy.output_images(comfy.run(tiled(strip, seed=5, steps=1)), "save")[0]
    assert not np.array_equal(_pixels(one), _pixels(ref))


def test_the_tile_batch_does_not_change_the_image(comfy, strip):
    # the tile batch is only a speed/memory knob
    one = _pixels(comfy.output_images(comfy.run(tiled(strip, seed=8, steps=1, tile_batch=1)), "save")[0])
    three = _pixels(comfy.output_images(comfy.run(tiled(strip, seed=8, steps=1, tile_batch=3)), "save")[0])
    assert np.abs(one - three).max() <= 1.0


def test_untiled_prepare_points_at_the_tiled_workflow_and_sizes_are_checked(comfy, strip, write_png):
    g = xsr_graph(comfy.upload_image(write_png((96, 80, "RGB"), "big96.png")), **ZOO, steps=1)
    with pytest.raises(ComfyError, match="xsr_x16_tiled"):
        comfy.run(g)
    too_big = comfy.upload_image(write_png((300, 40, "RGB"), "big300.png"))
    with pytest.raises(ComfyError, match="256"):
        comfy.run(tiled(too_big))
    wrong = tiled(strip, steps=1)
    wrong["other"] = {"class_type": "XSR_PrepareLRTiled", "inputs": {"image": ["lr", 0], "overlap": 0}}
    wrong["tiled"]["inputs"]["tiling"] = ["other", 4]  # 2 tiles vs the 3 rows of the conditioning
    with pytest.raises(ComfyError, match="tiles"):
        comfy.run(wrong)
    assert comfy.object_info("XSR_TiledModel")


def test_shipped_tiled_workflow_is_the_tiled_graph(comfy):
    """workflows/xsr_x16_tiled.json converted with the live /object_info equals xsr_tiled_graph()
    (nodes, links, widgets)."""
    import json
    from pathlib import Path

    from xsr_core.workflow import ui_to_api

    wf = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "xsr_x16_tiled.json").read_text())
    api = ui_to_api(wf, comfy.object_info())
    graph = xsr_tiled_graph(
        "xsr_lr.png",
        ckpt="v1-5-pruned-emaonly.safetensors",
        controlnet="xsr_controlnet.safetensors",
        clip_vision="clip_vision_l.safetensors",
        refdb="xsr_refdb",
    )
    assert sorted(v["class_type"] for v in api.values()) == sorted(v["class_type"] for v in graph.values())
    by_kind = {v["class_type"]: v for v in api.values()}
    kind = {k: v["class_type"] for k, v in graph.items()}
    for key, node in graph.items():
        want = {n: ([kind[v[0]], v[1]] if isinstance(v, list) else v) for n, v in node["inputs"].items()}
        got = {
            n: ([api[v[0]]["class_type"], v[1]] if isinstance(v, list) else v)
            for n, v in by_kind[node["class_type"]]["inputs"].items()
        }
        assert got == want, key


def test_demo_picks_the_workflow_by_lr_size(tmp_path):
    from xsr_core.demo import TILED_WORKFLOW, WORKFLOW, pick_workflow

    for (w, h), want in (
        ((32, 32), WORKFLOW),
        ((64, 20), WORKFLOW),
        ((65, 20), TILED_WORKFLOW),
        ((256, 100), TILED_WORKFLOW),
    ):
        p = tmp_path / f"{w}x{h}.png"
        Image.new("RGB", (w, h)).save(p)
        assert pick_workflow(p) == want
    Image.new("RGB", (300, 10)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit, match="256"):
        pick_workflow(tmp_path / "big.png")


@pytest.mark.slow
def test_demo_writes_the_x16_result_of_a_large_lr(tmp_path):
    """`scripts/demo.sh --image X` (python -m xsr_core demo) on a 72x8 LR: the tiled workflow, 1152x128 out."""
    from xsr_core import demo

    lr = tmp_path / "wide.png"
    Image.fromarray(_ramp(8, 72)).save(lr)
    rc = demo.main(
        ["--image", str(lr), "--out", str(tmp_path / "out"), "--steps", "1", "--workdir", str(tmp_path / "work")]
    )
    assert rc == 0
    assert Image.open(tmp_path / "out" / "wide_x16.png").size == (1152, 128)
