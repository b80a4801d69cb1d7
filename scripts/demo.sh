#!/usr/bin/env bash
# Set up (idempotent) and run the XSR demo: the bundled 32x32 LR image -> x16 through a real,
# headless ComfyUI. Extra arguments go to `python -m xsr_core demo` (e.g. --image my_lr.png: any LR up
# to 256 px per side, any aspect ratio; above 64 px the tiled workflow runs; --models
# /path/to/ComfyUI/models --ckpt ... --controlnet ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${XSR_VENV:-$ROOT/.venv}/bin/python" -m xsr_core demo "$@"
