"""Shared test fixtures: the tiny model zoo (generated once per session, never committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsr_core.comfy_server import ComfyServer, prepare_base_dir

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: intra-op threads oversubscribe and run several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    from xsr_core.comfy_server import find_comfyui

    return find_comfyui(REPO)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """The tiny zoo in a ComfyUI models/ layout (name -> path; 'root' is the models folder).

    CLIP's tokenizer files for the diffusers copy come from ComfyUI's sd1_tokenizer when a ComfyUI
    is around (unit tests do not need it).
    """
    from xsr_core.comfy_server import ComfyError, find_comfyui
    from xsr_core.testing.zoo import write_zoo

    try:
        tok = find_comfyui(REPO) / "comfy" / "sd1_tokenizer"
    except ComfyError:
        tok = None
    root = tmp_path_factory.mktemp("models")
    paths = write_zoo(root, seed=0, clip_tokenizer_dir=tok)
    paths["root"] = root
    return paths


# --- live ComfyUI server (shared by tests/comfy and tests/browser) --------------------------------
SUPPORT = REPO / "tests" / "comfy" / "support" / "xsr_test_support"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, comfy_dir, tiny_zoo):
    """A running ComfyUI server (session-wide); stopped by PID at the end, log shown on failure."""
    base = prepare_base_dir(tmp_path_factory.mktemp("comfy_base"), REPO, extra_nodes=[SUPPORT])
    models = base / "models"
    for entry in Path(tiny_zoo["root"]).iterdir():
        dst = models / entry.name
        if not dst.exists():
            dst.symlink_to(entry, target_is_directory=entry.is_dir())
    server = ComfyServer(comfy_dir=comfy_dir, base_dir=base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        log = server.log_text()
        if "Traceback" in log:
            (REPO / "out").mkdir(exist_ok=True)
            shutil.copy(server.log_path, REPO / "out" / server.log_path.name)


@pytest.fixture
def write_png(tmp_path):
    """write_png(array HxWxC uint8 or (w,h,mode), name) -> path of a PNG in tmp."""

    def _write(spec, name="img.png"):
        if isinstance(spec, tuple):
            w, h, mode = spec
            rng = np.random.default_rng(0)
            arr = rng.integers(0, 256, (h, w, len(mode) if mode != "L" else 1), dtype=np.uint8)
            img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
        else:
            img = Image.fromarray(spec)
        p = tmp_path / name
        img.save(p)
        return p

    return _write
