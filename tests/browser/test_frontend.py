"""The shipped workflows and web/xsr.js in the real ComfyUI frontend (headless Chromium, tiny zoo).

- every workflows/*.json loads with no missing-node dialog and no page error, and the frontend's own
  conversion (app.graphToPrompt) equals xsr_core.workflow.ui_to_api;
- xsr_x16 queued from the page renders the K reference thumbnails (scores, names, overlay) on
  XSR_Retrieve and the caption on XSR_Enhance;
- a caption holding HTML renders as text (no script runs).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from xsr_core.testing.zoo import CHECKPOINT_NAME, CLIP_VISION_NAME, CONTROLNET_NAME, DEMO_REFDB
from xsr_core.workflow import ui_to_api

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = ["xsr_x16", "xsr_x16_text_only", "xsr_x16_batch_folder"]
ZOO = {"v1-5-pruned-emaonly.safetensors": CHECKPOINT_NAME, "xsr_controlnet.safetensors": CONTROLNET_NAME,
       "xsr_text_only_controlnet.safetensors": CONTROLNET_NAME,
       "clip_vision_l.safetensors": CLIP_VISION_NAME, "xsr_refdb": DEMO_REFDB}
REAL_MODELS = {"v1-5-pruned-emaonly.safetensors", "clip_vision_l.safetensors"}  # the XSR ControlNet has no URL
XSS = "<img src=x onerror=window.__xss=1>"
# console errors that concern this pack (the offline frontend logs its own: 404 templates, CSP-blocked registry calls)
OURS = re.compile(r"xsr", re.I)
OURS_JS = "/extensions/comfyui-xsr/"
NOISE = re.compile(r"Content Security Policy|Failed to load resource")  # offline registry look-ups, 404 thumbnails
SCHEMA = re.compile(r"Invalid workflow|zod", re.I)

APP_READY = """() => {
  const app = window.comfyAPI?.app?.app;
  const types = window.LiteGraph?.registered_node_types ?? {};
  return !!(app?.graph && app.canvas && types.KSampler && types.XSR_Retrieve && types.XSR_Enhance
            && app.extensions?.some((e) => e.name === "xsr.gallery"));
}"""

LOAD = """async (wf) => {
  const app = window.comfyAPI.app.app;
  const seen = {missing: null, models: null};
  const origNodes = app.showMissingNodesError, origModels = app.showMissingModelsError;
  app.showMissingNodesError = (m) => { seen.missing = m; };
  app.showMissingModelsError = (m) => { seen.models = m.map((x) => ({name: x.name, url: x.url ?? null, directory: x.directory})); };
  try { await app.loadGraphData(wf); } finally {
    app.showMissingNodesError = origNodes; app.showMissingModelsError = origModels;
  }
  const p = await app.graphToPrompt();
  const alerts = [...document.querySelectorAll(".p-toast-message")].map((t) => t.textContent)
    .filter((t) => /invalid workflow|zod|error/i.test(t));
  document.querySelectorAll(".p-toast-message .p-toast-close-button").forEach((b) => b.click());
  return {missing: seen.missing, models: seen.models, alerts, types: app.graph.nodes.map((n) => n.type), output: p.output};
}"""


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
    from xsr_core.testing.synthetic import synthetic_image

    p = tmp_path_factory.mktemp("browser_lr") / "browser_lr8.png"
    synthetic_image(11, 128).resize((8, 8), Image.BICUBIC).save(p)
    return comfy.upload_image(p)


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
    assert res["models"] is not None and {m["name"] for m in res["models"]} == REAL_MODELS
    assert all(m["url"].startswith("https://huggingface.co/") for m in res["models"])
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
        page.wait_for_function(f"() => document.querySelectorAll('.xsr-gallery .xsr-ref').length === {want_refs} "
                               "&& document.querySelector('.xsr-caption')?.textContent.length > 0")


def test_queue_xsr_x16_shows_references_and_caption(page, comfy, lr_name):
    wf = with_names(load_workflow("xsr_x16"), {**ZOO, "xsr_lr.png": lr_name}, steps=2)
    queue_and_wait(page, comfy, wf, want_refs=4)
    refs = page.evaluate("""() => [...document.querySelectorAll('.xsr-gallery .xsr-ref')].map((f) => ({
        score: f.querySelector('.xsr-ref-score').textContent, name: f.querySelector('.xsr-ref-name').textContent,
        src: f.querySelector('img').getAttribute('src')}))""")
    assert all(re.fullmatch(r"#[1-4] -?\d\.\d{3}", r["score"]) for r in refs), refs
    assert all(r["name"].startswith("synthetic_") for r in refs), refs
    assert [r["score"][:2] for r in refs] == ["#1", "#2", "#3", "#4"]
    page.wait_for_function("() => [...document.querySelectorAll('.xsr-gallery img')].every((i) => i.complete && i.naturalWidth > 0)")
    caption = page.evaluate("() => document.querySelector('.xsr-caption').textContent")
    assert caption.endswith("high quality, detailed")
    # click a thumbnail: the overlay shows it enlarged with its name; Escape closes it
    page.locator(".xsr-gallery .xsr-ref").nth(1).click()
    overlay = page.locator(".xsr-overlay")
    overlay.wait_for(state="visible")
    assert refs[1]["name"] in overlay.locator(".xsr-overlay-caption").text_content()
    assert overlay.locator("img").get_attribute("src") == refs[1]["src"]
    page.keyboard.press("Escape")
    overlay.wait_for(state="detached")
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
