"""Start-up shared by the in-process ComfyUI workers (adapter_worker.py, cudagraph_worker.py).

They run in their own process because ComfyUI's modules keep global state and a top-level ``nodes``:
ComfyUI first on ``sys.path``, CPU or not, a fixed torch seed, then the test-support pack and this pack
loaded under fixed package names (``xsr_test_support``, ``comfyui_xsr``) as ComfyUI would load them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_package(name: str, init: Path):
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def boot(comfy_dir: Path, repo: Path, *, cpu: bool, stub_av: bool = False) -> None:
    """Import ComfyUI from ``comfy_dir`` and load the packs; ``stub_av``: stand in for a missing PyAV (GPU image)."""
    sys.path.insert(0, str(comfy_dir))
    sys.path.insert(1, str(repo))
    if stub_av:
        from bench.support.comfy_inprocess import stub_av as _stub

        _stub()
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import torch

    torch.manual_seed(0)
    load_package("xsr_test_support", repo / "tests/comfy/support/xsr_test_support/__init__.py")
    load_package("comfyui_xsr", repo / "__init__.py")
