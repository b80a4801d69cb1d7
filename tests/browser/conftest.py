"""Browser tests: headless Chromium (Debian's /usr/bin/chromium) driving the real ComfyUI frontend.

The live server is the session-wide ``comfy`` fixture of tests/conftest.py, shared with tests/comfy.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("XSR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium via Playwright; fails (never skips) with the install line when missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need the Python package 'playwright': "
            "pip install -c scripts/constraints.txt playwright (no 'playwright install': "
            "they use the system Chromium)",
            pytrace=False,
        )
    exe = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    if not exe:
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium "
            "(or set XSR_CHROMIUM to a Chromium/Chrome binary)",
            pytrace=False,
        )
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
    except Exception as e:  # noqa: BLE001 - report the launch failure with the fix
        pw.stop()
        pytest.fail(f"could not start Chromium ({exe}): {e}", pytrace=False)
    try:
        yield b
    finally:
        b.close()
        pw.stop()
