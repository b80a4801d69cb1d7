"""XSR's models load whole in every VRAM mode (ComfyUI's lowvram/novram path), never half on the CPU.

Under ``--novram`` ComfyUI 0.33 gives every model a ~0 byte weight budget and streams only ``comfy.ops``
layers; a plain PyTorch layer that does not fit stays on the offload device and runs there (seen on an
H200: the RFA, I2T and adapter ran on the CPU). The check drives ComfyUI's own ``LoadedModel`` exactly as
``load_models_gpu`` does in NO_VRAM mode (weight budget 0.1 bytes), in a subprocess per ComfyUI version of
the matrix (ComfyUI's modules keep global state), for XSR's patchers and, as the control that shows the
check can fail, for a stock ModelPatcher around the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.comfy

WORKER = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    from pathlib import Path
    comfy_dir, repo = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    def load_package(name, init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)

    load_package("comfyui_xsr", repo / "__init__.py")
    common = importlib.import_module("comfyui_xsr.nodes.common")
    binding = importlib.import_module("comfyui_xsr.nodes.comfy_binding")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    cfg = RFAConfig(clip_dim=32, width=32, depth=2, heads=4, num_patches=4, out_dim=32)
    dev = torch.device("cpu")
    out = {}
    for name, cls in (("stock", comfy.model_patcher.ModelPatcher), ("xsr", common.WholeModelPatcher),
                      ("adapter", binding.XSRAdapterPatcher)):
        patcher = cls(RFA(cfg), load_device=dev, offload_device=dev)
        loaded = mm.LoadedModel(patcher)
        loaded.model_load(0.1)  # what load_models_gpu passes in NO_VRAM mode
        row = {"size": patcher.model_size(), "loaded": patcher.loaded_size()}
        row["fully_unloaded"] = bool(loaded.model_unload(memory_to_free=1))  # ComfyUI asks back 1 byte
        out[name] = row
    Path(sys.argv[3]).write_text(json.dumps(out))
    """
)


def test_xsr_models_load_whole_under_a_novram_budget(tmp_path, comfy_dir):
    out = tmp_path / "whole.json"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(comfy_dir), str(REPO), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    # the control: a stock patcher leaves the plain PyTorch layers of the model unloaded (they would run on
    # the offload device), so the check below can fail
    assert rows["stock"]["loaded"] < rows["stock"]["size"], rows
    for name in ("xsr", "adapter"):
        row = rows[name]
        assert row["loaded"] == row["size"] > 0, (name, row)
        # asked for memory back, ComfyUI unloads it whole instead of leaving a half-loaded model behind
        assert row["fully_unloaded"], (name, row)
