#!/usr/bin/env bash
# One device call for bench/bench_vram_modes.py: ComfyUI 0.33's real main.py on the GPU in each VRAM mode.
#
#   bash bench/run_gpu_vram.sh CARRY      # CARRY holds ComfyUI-0.33.0.tar.gz, whl/*.whl, kitchen/
#
# The GPU image has torch, transformers, safetensors, numpy ...; this installs (into /tmp/site) only
# the carried wheels whose import the image lacks. Two packages are cut to fit the 64 MiB transfer:
# comfy-kitchen without its compiled CUDA/HIP extensions (kitchen/: the package falls back to its
# triton/eager backends, which only fp8/nvfp4/int8 quantized ops use; SD1.5 fp16 uses none) and PyAV
# replaced by bench/support/av_stub when missing (the x16 graph touches no video/audio; ComfyUI 0.33's
# LoadImage decodes images through PyAV, so the LR then comes from the probe pack's PIL loader). The report
# says so. Results go to bench/results/vram_modes_<device>.{json,md} and to $OUT.
set -u
CARRY="$(cd "${1:?carry folder}" && pwd)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/site /tmp/c033
python3 - "$CARRY/whl" <<'PY' > /tmp/site_missing.txt
import glob, importlib.util, sys, zipfile
for whl in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        mods = z.read(top[0]).decode().split() if top else sorted({n.split("/")[0] for n in names
                   if not n.split("/")[0].endswith((".dist-info", ".data")) and (n.endswith(".py") or "/" in n)})
    mods = [m.removesuffix(".py") for m in mods if "." not in m.removesuffix(".py") and not m.startswith("_")] or mods

    def found(m):
        try:
            return importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            return False

    if not all(found(m) for m in mods):
        print(whl)
PY
echo "installing: $(xargs -n1 basename < /tmp/site_missing.txt | tr '\n' ' ')"
[[ -s /tmp/site_missing.txt ]] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $(cat /tmp/site_missing.txt) || exit 1; }
python3 -c "import comfy_kitchen" 2>/dev/null || cp -r "$CARRY"/kitchen/* /tmp/site/
export PYTHONPATH=/tmp/site
NOTE="comfy-kitchen: $(python3 -c 'import comfy_kitchen.backends.cuda as c; print("CUDA extension", "present" if c._EXT_AVAILABLE else "absent (slim copy)")' 2>&1 | tail -1)."
if ! python3 -c "import av" 2>/dev/null; then
    export PYTHONPATH="/tmp/site:$PWD/bench/support/av_stub"
    NOTE="$NOTE PyAV: stubbed (bench/support/av_stub); the LR is loaded by the probe pack's PIL loader (0.33's LoadImage decodes through PyAV)."
    PIL_LOADER=--pil-loader
fi
tar -xzf "$CARRY/ComfyUI-0.33.0.tar.gz" -C /tmp/c033
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "note: $NOTE"
timeout "${VRAM_T:-250}" python3 bench/bench_vram_modes.py --comfy /tmp/c033/ComfyUI --workdir /tmp/vram --note "$NOTE" ${PIL_LOADER:-} \
    ${VRAM_ARGS:-}
rc=$?
[[ -n "${OUT:-}" ]] && { mkdir -p "$OUT"; cp bench/results/vram_modes_* "$OUT"/ 2>/dev/null; for f in /tmp/vram/base/comfyui-*.log; do tail -n 200 "$f" > "$OUT/$(basename "$f")"; done 2>/dev/null; }
exit $rc
