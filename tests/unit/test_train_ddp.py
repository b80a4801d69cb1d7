"""DDP on CPU: two gloo processes (torchrun) train the RFA stage; marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rfa_ddp_two_cpu_processes(tiny_zoo, tmp_path):
    from xsr_core.train.synthetic import write_image_set
    from xsr_helpers import prepare_folder

    imgs = write_image_set(tmp_path / "imgs", n=12, size=128)
    data = tmp_path / "data"
    prepare_folder(data, tiny_zoo["clip_vision"], imgs, split="8,2,2", min_side=64, dedup_threshold=0.999)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "xsr_core.train",
        "rfa",
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--cpu",
        "--batch_size",
        "2",
        "--max_steps",
        "4",
        "--log_steps",
        "1",
        "--checkpointing_steps",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--model",
        json.dumps({"width": 32, "depth": 1, "heads": 4}),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer (the main process), every optimiser step once
    assert (out / "final" / "rfa.safetensors").is_file() and (
        out / "checkpoints" / "checkpoint_1" / "state.json"
    ).is_file()
    assert "world_size=2" in proc.stderr or "processes: 2" in proc.stderr
