#!/usr/bin/env bash
# One device call for bench/bench_vram_modes.py: ComfyUI 0.33's real main.py on the GPU in each VRAM mode.
#
#   bash bench/run_gpu_vram.sh [CARRY ...]   # default: the .gpu/part* folders of scripts/gpu_carry.sh
#
# The GPU image has torch, transformers, safetensors, numpy, aiohttp ...; bench/gpu_install.sh installs (into
# /tmp/site) the carried wheels whose import the image lacks, and finds ComfyUI-0.33.0.tar.gz in a carried
# folder or in /tmp/carry (put there by an earlier call of a warm machine). comfy-kitchen comes without its
# compiled CUDA/HIP extensions (the package falls back to its triton/eager backends, which only
# fp8/nvfp4/int8 quantized ops use; SD1.5 fp16 uses none). When PyAV is missing (not carried), it is replaced
# by bench/support/av_stub (the x16 graph touches no video/audio; ComfyUI 0.33's LoadImage decodes images
# through PyAV, so the LR then comes from the probe pack's PIL loader). The report says so. Results go to
# bench/results/vram_modes_<device>.{json,md} and to $OUT.
set -u
[[ $# -gt 0 ]] || set -- .gpu/part*
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/c033
bash "$(dirname "$0")/gpu_install.sh" "$@" || exit 1
export PYTHONPATH=/tmp/site
NOTE="comfy-kitchen: $(python3 -c 'import comfy_kitchen.backends.cuda as c; print("CUDA extension", "present" if c._EXT_AVAILABLE else "absent (slim copy)")' 2>&1 | tail -1)."
if ! python3 -c "import av" 2>/dev/null; then
    export PYTHONPATH="/tmp/site:$PWD/bench/support/av_stub"
    NOTE="$NOTE PyAV: stubbed (bench/support/av_stub); the LR is loaded by the probe pack's PIL loader (0.33's LoadImage decodes through PyAV)."
    PIL_LOADER=--pil-loader
else
    NOTE="$NOTE PyAV $(python3 -c 'import av; print(av.__version__)'): real; ComfyUI's own LoadImage loads the LR."
fi
[[ -d /tmp/c033/ComfyUI ]] || tar -xzf /tmp/carry/ComfyUI-0.33.0.tar.gz -C /tmp/c033 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "note: $NOTE"
timeout "${VRAM_T:-250}" python3 bench/bench_vram_modes.py --comfy /tmp/c033/ComfyUI --workdir /tmp/vram --note "$NOTE" ${PIL_LOADER:-} \
    ${VRAM_ARGS:-}
rc=$?
[[ -n "${OUT:-}" ]] && { mkdir -p "$OUT"; cp bench/results/vram_modes_* "$OUT"/ 2>/dev/null; for f in /tmp/vram/base/comfyui-*.log; do tail -n 200 "$f" > "$OUT/$(basename "$f")"; done 2>/dev/null; }
exit $rc
