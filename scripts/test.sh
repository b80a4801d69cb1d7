#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, live-ComfyUI tests, browser tests.
# Extra arguments go to pytest.
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
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${XSR_VENV:-$ROOT/.venv}/bin/python" -m pytest tests -ra --durations=15 "$@"
