"""bench/bench_train.py runs with --tiny on CPU and writes its JSON/markdown results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_train_tiny_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_train.py"),
            "--tiny",
            "--batch-sizes",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("train_*_tiny.json")
    data = json.loads(js.read_text())
    assert {"device", "date", "command", "results"} <= set(data)
    stages = [(r["stage"], r.get("grad_ckpt")) for r in data["results"]]
    assert stages == [("2", False), ("2", True), ("1-rfa", None), ("1-i2t", None)]
    assert all(r["img_per_s"] > 0 for r in data["results"])
    s2 = [r for r in data["results"] if r["stage"] == "2"]
    assert {r["controlnet_train"] for r in s2} == {"attention"}  # the trainer's default scope, not "all"
    assert all(r["controlnet_trainable_params_m"] < r["trainable_params_m"] for r in s2)
    assert js.with_suffix(".md").read_text().startswith("# Training throughput")
