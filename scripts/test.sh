#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests once, the live-ComfyUI and browser
# tests once per ComfyUI of the test matrix (0.3.75 with frontend 1.32.9, 0.33.0 with frontend 1.49.6;
# the version is in each test id, e.g. test_x[comfyui-0.33.0]). One pytest run, one summary line.
# Extra arguments go to pytest (e.g. `--comfyui 0.33.0 tests/browser`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Browser tests drive Debian's Chromium with Playwright (no browser download); install it once.
if [[ -z "${XSR_CHROMIUM:-}" ]] && ! command -v chromium >/dev/null; then
    echo "[xsr-test] installing Debian's chromium for the browser tests" >&2
    if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
VENV="${XSR_VENV:-$ROOT/.venv}"
# Lint and formatting (pyproject's [tool.ruff]; ruff comes with the test extra) before the tests.
[[ -x "$VENV/bin/ruff" ]] || { echo "[xsr-test] $VENV/bin/ruff is missing: run scripts/setup.sh (test extra)" >&2; exit 1; }
if ! { "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check .; }; then
    echo "[xsr-test] ruff check/format failed; to fix: ruff format . && ruff check --fix ." >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 XSR_COMFYUI_MATRIX="${XSR_COMFYUI_MATRIX:-$VENV/comfyui_matrix.json}"
# no path arguments: pyproject's testpaths (tests/)
exec "$VENV/bin/python" -m pytest -ra --durations=15 "$@"
