"""bench/count_trainable.py: stage-2 trainable parameters per ControlNet scope on the meta device (issue #11.2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_count_trainable_real_sd15_shapes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "count_trainable.py"), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "trainable_params.json").read_text())
    assert {"device", "date", "command", "rows"} <= set(data)
    rows = {(r["variant"], r["controlnet_train"]): r for r in data["rows"]}
    n_cn, n_ad = data["controlnet_params"], data["adapter_params"]
    assert rows[("adain", "all")]["controlnet_trainable"] == n_cn == rows[("text_only", "all")]["total_trainable"]
    assert rows[("adain", "none")]["total_trainable"] == n_ad and ("text_only", "none") not in rows
    att, zc = rows[("adain", "attention")], rows[("adain", "zero_convs")]
    assert att["default"] and 0 < zc["controlnet_trainable"] < att["controlnet_trainable"] < n_cn
    assert att["total_trainable"] == att["controlnet_trainable"] + n_ad
    assert rows[("text_only", "attention")]["adapter_trainable"] == 0
    assert n_cn > 3e8  # the real SD1.5 ControlNet, not a tiny one
    assert "attention** (default)" in (tmp_path / "trainable_params.md").read_text()
