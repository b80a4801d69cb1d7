"""Render example_workflows/<name>.png: each shipped workflow opened in the real ComfyUI frontend.

    .venv/bin/python scripts/workflow_thumbnails.py [--comfyui-version 0.33.0]

Copies workflows/*.json to example_workflows/ (the folder ComfyUI's template browser and the registry
read) and screenshots each one in headless Chromium (Debian's /usr/bin/chromium) on a ComfyUI of the
test matrix with the tiny zoo, fitted to view, as a 640x400 PNG beside it (the workflow's nodes and links,
with its real model names).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from xsr_core.comfy_server import ComfyServer, comfyui_matrix, prepare_base_dir
from xsr_core.testing.zoo import write_zoo

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "comfy" / "support" / "xsr_test_support"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui-version", default="0.3.75", help="ComfyUI of the test matrix to render with")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    matrix = {m.version: m for m in comfyui_matrix(repo_root=REPO)}
    install = matrix.get(args.comfyui_version) or next(iter(matrix.values()))
    out_dir = REPO / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_dir(Path(tmp) / "base", REPO, extra_nodes=[SUPPORT])
        write_zoo(
            base / "models", seed=0, clip_tokenizer_dir=install.path / "comfy" / "sd1_tokenizer", diffusers_folder=False
        )
        with (
            ComfyServer(comfy_dir=install.path, base_dir=base, pythonpath=install.pythonpath) as server,
            sync_playwright() as pw,
        ):
            server.post_json("/settings/Comfy.TutorialCompleted", True)
            browser = pw.chromium.launch(
                executable_path=args.chromium,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            page = browser.new_page(viewport={"width": 2700, "height": 1600})
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_function(
                "() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.XSR_Retrieve",
                timeout=120_000,
            )
            page.evaluate(
                "() => document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach((b) => b.click())"
            )
            for wf_path in sorted((REPO / "workflows").glob("*.json")):
                shutil.copyfile(wf_path, out_dir / wf_path.name)
                page.evaluate(
                    "async (wf) => { const app = window.comfyAPI.app.app; await app.loadGraphData(wf);"
                    " app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true); }",
                    __import__("json").loads(wf_path.read_text()),
                )
                page.evaluate(
                    "() => { document.querySelectorAll('.p-toast-message .p-toast-close-button')"
                    ".forEach((b) => b.click());"
                    " const app = window.comfyAPI.app.app; (app.canvas.fitViewToSelectionAnimated ? null : null);"
                    " const nodes = app.graph.nodes; let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;"
                    " for (const n of nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);"
                    " x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }"
                    " const c = app.canvas.canvas,"
                    " s = Math.min((c.width - 120) / (x1 - x0), (c.height - 160) / (y1 - y0));"
                    " app.canvas.ds.scale = s; app.canvas.ds.offset = [-x0 + 80 / s, -y0 + 80 / s];"
                    " app.graph.setDirtyCanvas(true, true); }"
                )
                page.wait_for_timeout(800)
                page.keyboard.press("Escape")  # the missing-models dialog (the real SD files are not here)
                page.evaluate(
                    "() => document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-toast-close-button')"
                    ".forEach((b) => b.click())"
                )
                page.wait_for_timeout(400)
                png = page.screenshot(clip={"x": 60, "y": 50, "width": 2560, "height": 1600})
                img = Image.open(io.BytesIO(png)).convert("RGB")
                img.thumbnail((640, 400), Image.LANCZOS)
                img.save(out_dir / (wf_path.stem + ".png"), optimize=True)
                print(out_dir / (wf_path.stem + ".png"), img.size)
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
