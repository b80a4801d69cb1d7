"""The AdaIN adapter's ComfyUI binding: parity with diffusers, gate-0 identity, clone() and stacking.

ComfyUI runs in-process in a subprocess (adapter_worker.py): its modules keep global state and a
top-level ``nodes`` module that must not meet this repository's ``nodes/`` package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory, comfy_dir, tiny_zoo):
    out = tmp_path_factory.mktemp("adapter") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "adapter_worker.py"), str(comfy_dir), str(REPO), str(tiny_zoo["root"]), str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"adapter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_cross_framework_parity_unet_and_controlnet(worker_results):
    """Same weights in diffusers and ComfyUI, same non-zero adapter and E: outputs agree within 1e-4 (fp32)."""
    rows = worker_results["parity"]
    assert len(rows) == 6  # 3 timesteps x (U-Net, U-Net + ControlNet)
    for r in rows:
        assert r["adapter_effect"] > 1e-2, f"the adapter must change the output: {r}"
        assert r["cond_maxdiff"] < 1e-4, f"cond branch differs: {r}"
        assert r["uncond_maxdiff"] < 1e-4, f"uncond branch differs: {r}"


def test_gate_zero_and_strength_zero_are_bit_identical(worker_results):
    g = worker_results["gate0"]
    assert g["plain_deterministic"]
    assert g["strength0_equal"], "strength 0 must give the unpatched U-Net+ControlNet output bit for bit"
    assert g["gates0_equal"], "zero gates must give the unpatched output bit for bit"
    assert g["nonzero_changes"]


def test_survives_clone_and_stacks_with_another_attn2_replace(worker_results):
    s = worker_results["stack"]
    assert s["dummy_calls"] == 16, "the earlier attn2 replace must still run in every U-Net block"
    assert s["same_as_unstacked"] == 0.0, "chaining into a pass-through replace must not change the result"
    assert s["clone_keeps_patch"]


def test_cli_encoder_and_comfyui_clip_vision_agree(worker_results):
    """A DB built by the command line and queried in ComfyUI (CLIPVisionLoader on the same file) agree."""
    enc = worker_results["encoder"]
    assert enc["fingerprint_equal"], "the same file must give the same encoder fingerprint in both paths"
    assert len(enc["cosines"]) == 12 and min(enc["cosines"]) >= 0.999, enc["cosines"]
