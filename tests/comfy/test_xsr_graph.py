"""The full xsr_x16 graph on the live server (tiny zoo): x16 output, strength-0 parity, batches, errors."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from comfy_helpers import png_size
from xsr_core.comfy_server import ComfyError
from xsr_core.demo import xsr_graph
from xsr_core.testing.zoo import ZOO_NAMES
from xsr_helpers import upload_lr8

pytestmark = pytest.mark.comfy


def graph(lr_name, **kw):
    kw.setdefault("steps", 2)
    return xsr_graph(lr_name, **ZOO_NAMES, **kw)


@pytest.fixture(scope="module")
def lr8(comfy, tmp_path_factory):
    return upload_lr8(comfy, tmp_path_factory.mktemp("lr"), "lr8.png", 7)


def test_xsr_x16_runs_end_to_end(comfy, lr8):
    entry = comfy.run(graph(lr8))
    out = comfy.output_images(entry, "save")
    assert len(out) == 1 and png_size(out[0]) == (128, 128)
    ui = entry["outputs"]["retrieve"]
    assert len(ui["xsr_thumbs"]) == 4 and len(ui["xsr_refs"]) == 4 and "images" not in ui  # no stock preview
    assert all(r["full"]["type"] == "temp" for r in ui["xsr_refs"])  # the enlarged view: the HR file
    assert all(r["name"].startswith("synthetic_") for r in ui["xsr_refs"])
    assert entry["outputs"]["enhance"]["text"][0].endswith("high quality, detailed")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_reference_previews_are_written_once_per_reference(comfy, tmp_path):
    from xsr_core.testing.synthetic import synthetic_image

    p = tmp_path / "lr_previews.png"  # an LR of its own: ComfyUI's cache must not answer for Retrieve
    synthetic_image(11, 128).resize((8, 8), Image.BICUBIC).save(p)
    lr = comfy.upload_image(p)
    first = comfy.run(graph(lr, top_k=3))["outputs"]["retrieve"]
    again = comfy.run(graph(lr, top_k=2))["outputs"]["retrieve"]  # Retrieve runs again: the same top 2
    assert [r["name"] for r in again["xsr_refs"]] == [r["name"] for r in first["xsr_refs"]][:2]
    # cached references reuse their thumbnail and full-size previews (no new PNG per prompt)
    assert again["xsr_thumbs"] == first["xsr_thumbs"][:2]
    assert [r["full"] for r in again["xsr_refs"]] == [r["full"] for r in first["xsr_refs"]][:2]
    for thumb, ref in zip(first["xsr_thumbs"], first["xsr_refs"]):
        full_bytes = comfy.view(ref["full"])
        small, full = _pixels(comfy.view(thumb)), _pixels(full_bytes)
        assert small.shape == (256, 256, 3) and full.ndim == 3  # the 256 px thumbnail and the HR image
        assert thumb != ref["full"]
        # a packed DB's enlarged view is its stored JPEG as it is (no decode / re-encode per new reference)
        assert full_bytes[:3] == b"\xff\xd8\xff" and min(full.shape[:2]) >= 256


def test_strength_zero_is_bit_identical_to_graph_without_xsr_patches(comfy, lr8):
    g = graph(lr8, strength=0.0)
    xsr = comfy.output_images(comfy.run(g), "save")[0]
    plain = graph(lr8)
    # the same graph without XSR patches: U-Net and ControlNet straight from the loaders
    plain["apply"]["inputs"]["control_net"] = ["cn", 0]
    plain["sample"]["inputs"]["model"] = ["ckpt", 0]
    del plain["patch"]
    ref = comfy.output_images(comfy.run(plain), "save")[0]
    assert np.array_equal(_pixels(xsr), _pixels(ref))
    # the zoo's adapter has non-zero gates: at strength 1 the image embedding changes the result
    one = comfy.output_images(comfy.run(graph(lr8, strength=1.0)), "save")[0]
    assert not np.array_equal(_pixels(one), _pixels(ref))


def test_batch_of_two_lr_images(comfy, lr8):
    g = graph(lr8)
    g["lr2"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["lr", 0], "batch_index": 0, "length": 1}}
    g["both"] = {"class_type": "ImageBatch", "inputs": {"image1": ["lr", 0], "image2": ["lr2", 0]}}
    g["prep"]["inputs"]["image"] = ["both", 0]
    entry = comfy.run(g)
    out = comfy.output_images(entry, "save")
    assert len(out) == 2 and all(png_size(o) == (128, 128) for o in out)
    assert len(entry["outputs"]["retrieve"]["xsr_refs"]) == 8


@pytest.mark.parametrize("case", ["missing_weights", "wrong_kind", "empty_db", "lr_too_large"])
def test_bad_inputs_give_node_errors_and_server_keeps_serving(comfy, lr8, write_png, case):
    g = graph(lr8)
    if case == "missing_weights":
        g["models"]["inputs"]["rfa_name"] = "does_not_exist.safetensors"
        with pytest.raises(ComfyError, match="rfa_name|does_not_exist"):
            comfy.run(g)
    elif case == "wrong_kind":
        g["models"]["inputs"]["rfa_name"] = "i2t.safetensors"
        with pytest.raises(ComfyError, match="holds a I2T model"):
            comfy.run(g)
    elif case == "empty_db":
        g["db"]["inputs"]["db_name"] = "../xsr"
        with pytest.raises(ComfyError):
            comfy.run(g)
    else:
        big = comfy.upload_image(write_png((96, 96, "RGB"), "big.png"))
        g["lr"]["inputs"]["image"] = big
        with pytest.raises(ComfyError, match="96x96"):
            comfy.run(g)
    assert comfy.object_info("XSR_Retrieve")


def test_interrupt_during_sampling_then_next_prompt_runs(comfy, lr8):
    g = graph(lr8, steps=400, seed=5)  # long enough never to finish before the interrupt
    pid = comfy.queue(g)
    deadline = time.monotonic() + 120
    # wait until sampling started (progress appears in the queue as running), then interrupt
    while time.monotonic() < deadline:
        q = comfy.get_json("/queue")
        if q["queue_running"]:
            break
        time.sleep(0.2)
    time.sleep(3)
    comfy.interrupt()
    entry = comfy.wait(pid, timeout=300)
    status = entry["status"]
    assert status["status_str"] == "error" or any(m[0] == "execution_interrupted" for m in status["messages"])
    entry = comfy.run(graph(lr8, seed=6))
    assert png_size(comfy.output_images(entry, "save")[0]) == (128, 128)


def test_build_reference_db_node_then_retrieve_from_it(comfy, lr8, tmp_path):
    from xsr_core.testing.synthetic import write_synthetic_images

    folder = "xsr_refs_test"
    write_synthetic_images(tmp_path / folder, 6, size=128, seed=11)
    for p in sorted((tmp_path / folder).iterdir()):
        comfy.upload_image(p, subfolder=folder)
    g = graph(lr8)
    g["build"] = {
        "class_type": "XSR_BuildReferenceDB",
        "inputs": {"clip_vision": ["cv", 0], "images_folder": folder, "db_name": "built_by_node", "mode": "packed"},
    }
    g["retrieve"]["inputs"]["refdb"] = ["build", 0]
    entry = comfy.run(g)
    names = [r["name"] for r in entry["outputs"]["retrieve"]["xsr_refs"]]
    assert len(names) == 4 and all(n.startswith("synthetic_") for n in names)

    bad = graph(lr8)
    bad["build"] = {
        "class_type": "XSR_BuildReferenceDB",
        "inputs": {"clip_vision": ["cv", 0], "images_folder": "/etc", "db_name": "nope", "mode": "packed"},
    }
    bad["retrieve"]["inputs"]["refdb"] = ["build", 0]
    with pytest.raises(ComfyError, match="outside the folders"):
        comfy.run(bad)
