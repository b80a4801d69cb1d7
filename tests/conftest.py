"""Shared test fixtures: the tiny model zoo (generated once per session, never committed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
