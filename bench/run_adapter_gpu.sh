#!/usr/bin/env bash
# One device call for bench_adapter (host cost per site + eager/CUDA-graph step, plain vs XSR), results to $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
mkdir -p "$OUT"
timeout 40 python3 bench/bench_adapter.py --host --dtype fp16 --out "$OUT" 2>&1 | tail -n 16
timeout 170 python3 bench/bench_adapter.py --rounds 3 --steps 20 --out "$OUT" 2>&1 | grep -v "Warning\|warn(" | tail -n 30
ls "$OUT"
