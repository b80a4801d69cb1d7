"""Foundation: the pack loads in a real ComfyUI, the tiny zoo runs, XSR_PrepareLR works and fails well."""

from __future__ import annotations

import pytest

from xsr_core.comfy_server import ComfyError, execution_error
from xsr_core.testing.zoo import CHECKPOINT_NAME
from xsr_core.workflow import api_node, ksampler

from comfy_helpers import png_size

pytestmark = pytest.mark.comfy


def test_pack_loads_without_import_failure(comfy):
    log = comfy.log_text()
    assert "comfyui-xsr" in log, "the pack was not seen by ComfyUI's custom-node loader"
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not failed, f"import failures: {failed}\n{comfy.log_tail()}"
    info = comfy.object_info()
    assert "XSR_PrepareLR" in info
    node = info["XSR_PrepareLR"]
    assert node["category"] == "xsr"
    assert node["output_name"][:2] == ["hint", "latent"]


def txt2img(seed=1, steps=2, size=64):
    return {
        "1": api_node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "2": api_node("CLIPTextEncode", clip=["1", 1], text="a photo of a cat"),
        "3": api_node("CLIPTextEncode", clip=["1", 1], text="blurry"),
        "4": api_node("EmptyLatentImage", width=size, height=size, batch_size=1),
        "5": ksampler(["1", 0], ["2", 0], ["3", 0], ["4", 0], seed=seed, steps=steps, cfg=5.0),
        "6": api_node("VAEDecode", samples=["5", 0], vae=["1", 2]),
        "7": api_node("SaveImage", images=["6", 0], filename_prefix="txt2img"),
    }


def prepare_lr_prompt(image_name, prefix):
    """LoadImage -> XSR_PrepareLR -> SaveImage of the hint (nodes "1" to "3")."""
    return {
        "1": api_node("LoadImage", image=image_name),
        "2": api_node("XSR_PrepareLR", image=["1", 0]),
        "3": api_node("SaveImage", images=["2", 0], filename_prefix=prefix),
    }


def test_stock_txt2img_on_tiny_zoo(comfy):
    entry = comfy.run(txt2img())
    images = comfy.output_images(entry, "7")
    assert len(images) == 1
    assert png_size(images[0]) == (64, 64)


@pytest.mark.parametrize("w,h,mode", [(32, 32, "RGB"), (40, 24, "RGBA"), (20, 36, "L")])
def test_prepare_lr_gives_exactly_16x(comfy, write_png, w, h, mode):
    name = comfy.upload_image(write_png((w, h, mode), f"lr_{w}x{h}_{mode}.png"))
    prompt = {
        **prepare_lr_prompt(name, "hint"),
        "4": api_node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "5": api_node("VAEDecode", samples=["2", 1], vae=["4", 2]),
        "6": api_node("SaveImage", images=["5", 0], filename_prefix="latent"),
    }
    entry = comfy.run(prompt)
    assert png_size(comfy.output_images(entry, "3")[0]) == (16 * w, 16 * h)
    assert png_size(comfy.output_images(entry, "6")[0]) == (16 * w, 16 * h)


def test_prepare_lr_rejects_oversized_lr_and_server_keeps_serving(comfy, write_png):
    name = comfy.upload_image(write_png((100, 80, "RGB"), "too_big.png"))
    prompt = prepare_lr_prompt(name, "bad")
    entry = comfy.wait(comfy.queue(prompt))
    err = execution_error(entry)
    assert err is not None, "an oversized LR must fail the prompt"
    assert err["node_type"] == "XSR_PrepareLR"
    assert "100x80" in err["exception_message"] and "64" in err["exception_message"]
    with pytest.raises(ComfyError, match="XSR_PrepareLR"):
        comfy.run(prompt)
    # the server is still serving: a good prompt runs afterwards
    assert comfy.object_info("XSR_PrepareLR")
    entry = comfy.run(txt2img(seed=2))
    assert png_size(comfy.output_images(entry, "7")[0]) == (64, 64)
