"""The shipped workflows and web/xsr.js in the real ComfyUI frontend (headless Chromium, tiny zoo).

Runs on each ComfyUI of the test matrix, so on frontend 1.32.9 (ComfyUI 0.3.75) and 1.49.6 (0.33.0):
- every workflows/*.json loads with no missing nodes, offers exactly the public models for download
  (1.32: the missing-models dialog; 1.49: the errors panel's store), opens with no overlapping nodes,
  and the frontend's own conversion (app.graphToPrompt) equals xsr_core.workflow.ui_to_api;
- xsr_x16 queued from the page renders the K reference thumbnails (scores, full names on hover,
  overlay at the reference's full resolution, no stock preview beside them) on XSR_Retrieve and the
  caption, labelled as output, on XSR_Enhance; the same in the Nodes 2.0 (Vue) renderer;
- a caption holding HTML renders as text (no script runs).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from xsr_core.testing.zoo import CHECKPOINT_NAME, CLIP_VISION_NAME, CONTROLNET_NAME, DEMO_REFDB
from xsr_core.workflow import ui_to_api
from xsr_helpers import upload_lr8

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = ["xsr_x16", "xsr_x16_text_only", "xsr_x16_batch_folder"]
ZOO = {
    "v1-5-pruned-emaonly.safetensors": CHECKPOINT_NAME,
    "xsr_controlnet.safetensors": CONTROLNET_NAME,
    "xsr_text_only_controlnet.safetensors": CONTROLNET_NAME,
    "clip_vision_l.safetensors": CLIP_VISION_NAME,
    "xsr_refdb": DEMO_REFDB,
}
REAL_MODELS = {"v1-5-pruned-emaonly.safetensors", "clip_vision_l.safetensors"}  # the XSR ControlNet has no URL
XSR_TRAINED = ("xsr_controlnet.safetensors", "xsr_text_only_controlnet.safetensors")  # no public download
XSS = "<img src=x onerror=window.__xss=1>"
# console errors that concern this pack (the offline frontend logs its own: 404 templates, CSP-blocked registry calls)
OURS = re.compile(r"xsr", re.I)
OURS_JS = "/extensions/comfyui-xsr/"
NOISE = re.compile(r"Content Security Policy|Failed to load resource")  # offline registry look-ups, 404 thumbnails
SCHEMA = re.compile(r"Invalid workflow|zod", re.I)

# ready to load a workflow: the stock and XSR node types, the frontend's own Note (the shipped workflows carry one;
# with Nodes 2.0 it can register after the pack's extensions) and the gallery extension
APP_READY = """() => {
  const app = window.comfyAPI?.app?.app;
  const types = window.LiteGraph?.registered_node_types ?? {};
  return !!(app?.graph && app.canvas && types.KSampler && types.Note && types.XSR_Retrieve && types.XSR_Enhance
            && app.extensions?.some((e) => e.name === "xsr.gallery"));
}"""

LOAD = """async (wf) => {
  const app = window.comfyAPI.app.app;
  // frontend 1.32: the load calls app.showMissingNodesError / showMissingModelsError (dialogs);
  // frontend 1.49: it fills the Pinia stores behind the errors panel ('missingNodesError', 'missingModel')
  const pinia = document.querySelector("#vue-app")?.__vue_app__?.config.globalProperties.$pinia;
  const store = (id) => pinia?._s.get(id);
  const seen = {missing: null, models: null, frontend: window.__COMFYUI_FRONTEND_VERSION__ ?? null};
  const origNodes = app.showMissingNodesError, origModels = app.showMissingModelsError;
  const asModels = (m) => m.map((x) => ({name: x.name, url: x.url ?? null, directory: x.directory ?? null}));
  app.showMissingNodesError = (m) => { seen.missing = m; };
  app.showMissingModelsError = (m) => { seen.models = asModels(m); };
  try { await app.loadGraphData(wf); } finally {
    app.showMissingNodesError = origNodes; app.showMissingModelsError = origModels;
  }
  const nodesErr = store("missingNodesError")?.missingNodesError;
  if (nodesErr?.nodeTypes?.length) seen.missing = nodesErr.nodeTypes;
  const candidates = store("missingModel")?.missingModelCandidates;
  if (candidates?.length) seen.models = asModels(candidates);
  seen.stores = !!store("missingModel");
  const p = await app.graphToPrompt();
  const alerts = [...document.querySelectorAll(".p-toast-message")].map((t) => t.textContent)
    .filter((t) => /invalid workflow|zod|error/i.test(t));
  document.querySelectorAll(".p-toast-message .p-toast-close-button").forEach((b) => b.click());
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const boxes = app.graph.nodes.map((n) => ({id: n.id, type: n.type,
    box: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}));
  return {...seen, alerts, boxes, types: app.graph.nodes.map((n) => n.type), output: p.output};
}"""


def overlapping(boxes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                out.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return out


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def with_names(wf: dict, mapping: dict, steps: int | None = None) -> dict:
    """A UI workflow with widget string values replaced (tiny zoo names, uploaded LR) and KSampler steps set."""
    wf = copy.deepcopy(wf)
    for node in wf["nodes"]:
        vals = node.get("widgets_values") or []
        node["widgets_values"] = [mapping.get(v, v) if isinstance(v, str) else v for v in vals]
        if steps is not None and node["type"] == "KSampler":
            node["widgets_values"][2] = steps
    return wf


@pytest.fixture(scope="module")
def lr_name(comfy, tmp_path_factory):
    return upload_lr8(comfy, tmp_path_factory.mktemp("browser_lr"), "browser_lr8.png", 11)


class PageErrors:
    def __init__(self, page):
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, msg):
        url = str((msg.location or {}).get("url", ""))
        if msg.type == "error" and (OURS_JS in url or (OURS.search(msg.text) and not NOISE.search(msg.text))):
            self.errors.append(f"console.error: {msg.text}")
        elif msg.type == "warning" and SCHEMA.search(msg.text):  # the frontend's workflow validation
            self.errors.append(f"console.warn: {msg.text}")


@pytest.fixture(scope="module")
def page(browser, comfy, lr_name):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.errors = PageErrors(pg)
    pg.set_default_timeout(60_000)
    # a first visit opens the templates browser (a modal dialog): mark this user as not new
    comfy.post_json("/settings/Comfy.TutorialCompleted", True)
    pg.goto(comfy.url, wait_until="domcontentloaded")
    pg.wait_for_function(APP_READY, timeout=90_000)
    pg.evaluate("() => document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach((b) => b.click())")
    pg.wait_for_function("() => !document.querySelector('.p-dialog-mask')")
    yield pg
    ctx.close()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_without_missing_nodes_and_matches_ui_to_api(page, comfy, name):
    wf = load_workflow(name)
    res = page.evaluate(LOAD, wf)
    assert res["missing"] is None, f"missing node types: {res['missing']}"
    assert res["alerts"] == [], res["alerts"]
    assert sorted(res["types"]) == sorted(n["type"] for n in wf["nodes"])
    # the test server lacks the real SD/ControlNet/CLIP files: the frontend offers exactly those for download
    assert res["models"] is not None
    offered = [m for m in res["models"] if m.get("url")]
    assert {m["name"] for m in offered} == REAL_MODELS
    assert all(m["url"].startswith("https://huggingface.co/") for m in offered)
    # frontend 1.49's store also lists missing files that have no download (the XSR-trained ControlNet,
    # written by `train export`): listed, never offered for download
    assert {m["name"] for m in res["models"] if not m.get("url")} <= set(XSR_TRAINED), res["models"]
    # as laid out by the frontend (its own minimum node sizes), no node hides another
    assert overlapping(res["boxes"]) == []
    # the frontend's own UI -> API conversion agrees with ours
    ours = ui_to_api(wf, comfy.object_info())
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in res["output"].items()}
    assert theirs == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ours.items()}
    assert page.errors.errors == []


def queue_and_wait(page, comfy, wf: dict, want_refs: int | None, timeout_ms: int = 240_000) -> None:
    """Load ``wf``, queue it from the page, wait for success (and for ``want_refs`` gallery thumbnails)."""
    res = page.evaluate(LOAD, wf)
    assert res["missing"] is None and res["models"] is None and res["alerts"] == [], res
    page.evaluate("""() => {
      const app = window.comfyAPI.app.app;
      window.__xsr_done = false; window.__xsr_error = null;
      const api = window.comfyAPI.api.api;
      api.addEventListener("execution_success", () => { window.__xsr_done = true; }, {once: true});
      api.addEventListener("execution_error", (e) => { window.__xsr_error = JSON.stringify(e.detail); }, {once: true});
      return app.queuePrompt(0, 1);
    }""")
    page.wait_for_function("() => window.__xsr_done || window.__xsr_error", timeout=timeout_ms)
    err = page.evaluate("() => window.__xsr_error")
    assert err is None, f"execution failed: {err}\n{comfy.log_tail(30)}"
    if want_refs is not None:
        page.wait_for_function(
            f"() => document.querySelectorAll('.xsr-gallery .xsr-ref').length === {want_refs} "
            "&& document.querySelector('.xsr-caption')?.textContent.length > 0"
        )


GALLERY = """(nodeId) => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(nodeId);
  const out = window.comfyAPI.app.app.nodeOutputs?.[String(nodeId)] ?? null;
  return {
    refs: [...document.querySelectorAll('.xsr-gallery .xsr-ref')].map((f) => ({
      score: f.querySelector('.xsr-ref-score').textContent, name: f.querySelector('.xsr-ref-name').textContent,
      hover: f.querySelector('.xsr-ref-name').title, src: f.querySelector('img').getAttribute('src'),
      shown: f.getBoundingClientRect().width > 0})),
    // the stock preview (classic: node.imgs; both: the output store's "images")
    stock: (node?.imgs?.length ?? 0) + (out?.images?.length ?? 0),
    label: document.querySelector('.xsr-caption-label')?.textContent ?? null,
  };
}"""


def check_gallery_and_overlay(page, wf, want_refs: int) -> None:
    """The gallery on XSR_Retrieve (scores, names, no stock preview) and the full-resolution overlay."""
    retrieve = next(n["id"] for n in wf["nodes"] if n["type"] == "XSR_Retrieve")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.xsr-gallery img')].every((i) => i.complete && i.naturalWidth > 0)"
    )
    g = page.evaluate(GALLERY, retrieve)
    refs = g["refs"]
    assert len(refs) == want_refs and all(r["shown"] for r in refs), refs
    assert all(re.fullmatch(r"#[1-4] -?\d\.\d{3}", r["score"]) for r in refs), refs
    assert all(r["name"].startswith("synthetic_") and r["hover"] == r["name"] for r in refs), refs
    assert [r["score"][:2] for r in refs] == [f"#{i + 1}" for i in range(want_refs)]
    assert g["stock"] == 0, "the stock image preview is shown beside the XSR gallery"
    assert g["label"] and "output" in g["label"], g["label"]
    thumb = page.evaluate("() => document.querySelector('.xsr-gallery img').naturalWidth")
    # click a thumbnail: the overlay shows that reference at its full resolution with its name; Escape closes it
    page.locator(".xsr-gallery .xsr-ref").nth(1).click()
    overlay = page.locator(".xsr-overlay")
    overlay.wait_for(state="visible")
    assert refs[1]["name"] in overlay.locator(".xsr-overlay-caption").text_content()
    page.wait_for_function("() => document.querySelector('.xsr-overlay img').naturalWidth > 0")
    full = page.evaluate(
        "() => [document.querySelector('.xsr-overlay img').naturalWidth,"
        " document.querySelector('.xsr-overlay img').naturalHeight]"
    )
    # the tiny zoo's demo DB holds 256x256 images (xsr_core.testing.zoo.write_demo_refdb):
    # the HR file, not the thumbnail
    assert full == [256, 256] and overlay.locator("img").get_attribute("src") != refs[1]["src"], (full, thumb)
    page.keyboard.press("Escape")
    overlay.wait_for(state="detached")


def test_queue_xsr_x16_shows_references_and_caption(page, comfy, lr_name):
    wf = with_names(load_workflow("xsr_x16"), {**ZOO, "xsr_lr.png": lr_name}, steps=2)
    queue_and_wait(page, comfy, wf, want_refs=4)
    check_gallery_and_overlay(page, wf, want_refs=4)
    caption = page.evaluate("() => document.querySelector('.xsr-caption').textContent")
    assert caption.endswith("high quality, detailed")
    assert page.errors.errors == []


def test_caption_with_html_renders_as_text(page, comfy, lr_name):
    wf = with_names(load_workflow("xsr_x16"), {**ZOO, "xsr_lr.png": lr_name}, steps=2)
    enhance = next(n for n in wf["nodes"] if n["type"] == "XSR_Enhance")
    enhance["widgets_values"][2] = XSS  # max_tokens, num_beams, caption_override, extra_prompt
    # XSR_Retrieve is cached from the previous test (same LR): only the caption is re-sent
    queue_and_wait(page, comfy, wf, want_refs=None)
    page.wait_for_function("(x) => document.querySelector('.xsr-caption').textContent.startsWith(x)", arg=XSS)
    page.wait_for_timeout(300)  # give a (wrongly) injected <img onerror> the time to fire
    assert page.evaluate("() => window.__xss") is None
    assert page.locator(".xsr-caption img").count() == 0
    assert page.errors.errors == []


@pytest.fixture
def vue_page(browser, comfy, lr_name):
    """A page with the Nodes 2.0 (Vue) renderer on (setting Comfy.VueNodes.Enabled); restored afterwards."""
    comfy.post_json("/settings/Comfy.TutorialCompleted", True)
    comfy.post_json("/settings/Comfy.VueNodes.Enabled", True)
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.errors = PageErrors(pg)
    pg.set_default_timeout(60_000)
    try:
        pg.goto(comfy.url, wait_until="domcontentloaded")
        pg.wait_for_function(APP_READY, timeout=90_000)
        pg.evaluate("() => document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach((b) => b.click())")
        pg.wait_for_function("() => !document.querySelector('.p-dialog-mask')")
        assert (
            pg.evaluate("() => window.comfyAPI.app.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
        )
        yield pg
    finally:
        ctx.close()
        comfy.post_json("/settings/Comfy.VueNodes.Enabled", False)


def test_gallery_and_caption_in_nodes_2_0(vue_page, comfy, lr_name):
    page = vue_page
    wf = with_names(load_workflow("xsr_x16"), {**ZOO, "xsr_lr.png": lr_name}, steps=2)
    retrieve = next(n for n in wf["nodes"] if n["type"] == "XSR_Retrieve")
    retrieve["widgets_values"][0] = 3  # top_k: a new XSR_Retrieve result (the earlier tests cached 4)
    queue_and_wait(page, comfy, wf, want_refs=3)
    # rendered by Vue: the gallery sits inside the XSR_Retrieve node's DOM element
    assert page.locator(f"[data-node-id='{retrieve['id']}'] .xsr-gallery").count() == 1
    check_gallery_and_overlay(page, wf, want_refs=3)
    assert page.errors.errors == []
