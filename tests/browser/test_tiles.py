"""web/xsr_tiles.js in the real frontend: the shipped tiled workflow loads, and XSR_TilePreview shows the tile grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_frontend import LOAD, ZOO, load_workflow, lr_name, page, queue_and_wait, with_names  # noqa: F401  (fixtures)
from xsr_core.testing.zoo import CONTROLNET_NAME
from xsr_core.workflow import ui_to_api

pytestmark = [pytest.mark.browser, pytest.mark.comfy]
TILED_ZOO = {**ZOO, "xsr_controlnet.safetensors": CONTROLNET_NAME}
MUTED = 2


@pytest.fixture(scope="module")
def wide_lr(comfy, tmp_path_factory):
    """A 72x8 LR of two different halves: three 32x8 tiles (starts 0, 20, 40 LR px)."""
    from xsr_core.testing.synthetic import synthetic_image

    a = np.asarray(synthetic_image(5, 128).convert("RGB").resize((36, 8), Image.BICUBIC))
    b = np.asarray(synthetic_image(6, 128).convert("RGB").resize((36, 8), Image.BICUBIC))
    p = tmp_path_factory.mktemp("tiles_lr") / "tiles_lr72x8.png"
    Image.fromarray(np.concatenate([a, b], axis=1)).save(p)
    return comfy.upload_image(p)


def test_tiled_workflow_loads_and_matches_ui_to_api(page, comfy):  # noqa: F811
    wf = load_workflow("xsr_x16_tiled")
    res = page.evaluate(LOAD, wf)
    assert res["missing"] is None, f"missing node types: {res['missing']}"
    assert res["alerts"] == [], res["alerts"]
    ours = ui_to_api(wf, comfy.object_info())
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in res["output"].items()}
    assert theirs == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ours.items()}
    assert page.errors.errors == []


def test_tile_preview_shows_the_grid_and_a_tile_on_click(page, comfy, wide_lr):  # noqa: F811
    wf = with_names(load_workflow("xsr_x16_tiled"), {**TILED_ZOO, "xsr_lr.png": wide_lr}, steps=1)
    for node in wf["nodes"]:  # retrieval and captions only: the sampling chain is muted
        if node["type"] in ("KSampler", "VAEDecodeTiled", "XSR_ColorFix", "SaveImage"):
            node["mode"] = MUTED
    queue_and_wait(page, comfy, wf, want_refs=None)
    page.wait_for_function("() => document.querySelectorAll('.xsr-tiles .xsr-tile').length === 3")
    tiles = page.evaluate("""() => [...document.querySelectorAll('.xsr-tiles .xsr-tile')].map((t) => ({
        left: t.style.left, width: t.style.width, src: t.querySelector('img')?.getAttribute('src') ?? null}))""")
    lefts = [float(t["left"].rstrip("%")) for t in tiles]
    assert lefts == pytest.approx([0.0, 100 * 20 / 72, 100 * 40 / 72], abs=1e-3)
    assert all(t["src"] and "/view?" in t["src"] for t in tiles)
    # click the last tile: its 4 references and its caption appear below the grid
    page.locator(".xsr-tiles .xsr-tile").nth(2).click()
    page.wait_for_function("() => document.querySelector('.xsr-tile-detail')?.textContent.startsWith('tile 3 of 3')")
    assert page.locator(".xsr-tile-detail figure").count() == 4
    assert page.locator(".xsr-tile-detail .xsr-tile-caption").text_content().endswith("high quality, detailed")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.xsr-tiles img')].every((i) => i.complete && i.naturalWidth > 0)"
    )
    assert page.errors.errors == []
