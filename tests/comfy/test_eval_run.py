"""Researcher workflow on the tiny zoo: batch `run` over 6 images (killed midway and resumed), then `metrics`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from xsr_core.demo import xsr_graph
from xsr_core.eval.run import hr_to_lr
from xsr_core.testing.synthetic import write_synthetic_images
from xsr_core.testing.zoo import ZOO_NAMES
from xsr_helpers import eval_run_cmd

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def test_hr_to_lr_is_the_training_degradation():
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    lr = hr_to_lr(img, 128)
    assert lr.size == (8, 8) and lr.getpixel((4, 4)) == (10, 200, 30)


def _cmd(hr, out, wf, models):
    # the demo DB was not deduplicated against these images
    return eval_run_cmd(hr, out, wf, models, "--hr-side", "128", "--allow-unexcluded-db")


def test_run_resumes_after_kill_then_metrics_table(tmp_path, tiny_zoo, comfy_dir):
    hr = tmp_path / "hr"
    write_synthetic_images(hr, 6, size=160, seed=3)
    wf = tmp_path / "xsr_x16_api.json"
    wf.write_text(json.dumps(xsr_graph("placeholder.png", **ZOO_NAMES, steps=2)))
    out = tmp_path / "sr"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_dir))
    proc = subprocess.Popen(
        _cmd(hr, out, wf, tiny_zoo["root"]),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(out.glob("*.png"))) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(done_before) < 6
    res = subprocess.run(
        _cmd(hr, out, wf, tiny_zoo["root"]), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    outs = sorted(out.glob("*.png"))
    assert [p.stem for p in outs] == sorted(p.stem for p in hr.glob("*.png"))
    for p in outs:
        assert Image.open(p).size == (128, 128)
        if p.name in done_before:  # finished images were not recomputed
            assert p.stat().st_mtime_ns == done_before[p.name]
    manifest = json.loads((out / "run.json").read_text())
    assert sorted(m["seed"] for m in manifest["images"].values()) == list(range(6))

    # the exact HR crops the LRs were made from are saved beside the outputs
    for p in outs:
        assert Image.open(out / "hr_crop" / p.name).size == (128, 128) and Image.open(out / "lr" / p.name).size == (
            8,
            8,
        )
    # metrics against the HR originals: the same x16 crop is applied (and checked against the saved crops)
    table_dir = tmp_path / "metrics"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "xsr_core",
            "eval",
            "metrics",
            "--sr",
            str(out),
            "--hr",
            str(hr),
            "--metrics",
            "psnr,ssim",
            "--out",
            str(table_dir),
            "--allow-unexcluded-db",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    md = (table_dir / "metrics.md").read_text()
    # without the flag, a run made with a DB not deduplicated against its inputs is refused in one line
    res = subprocess.run(
        [sys.executable, "-m", "xsr_core", "eval", "metrics", "--sr", str(out), "--metrics", "psnr"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "not deduplicated" in res.stderr and "Traceback" not in res.stderr
    assert "FID" in md and "PSNR" in md and "SeeSR" in md
