#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, live-ComfyUI tests, browser tests.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${XSR_VENV:-$ROOT/.venv}/bin/python" -m pytest tests -ra --durations=15 "$@"
