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
def tiny_zoo(tmp_path_factory, comfy_dir) -> dict[str, Path]:
    """The tiny zoo in a ComfyUI models/ layout (name -> path; 'root' is the models folder)."""
    from xsr_core.testing.zoo import write_zoo

    root = tmp_path_factory.mktemp("models")
    paths = write_zoo(root, seed=0, clip_tokenizer_dir=comfy_dir / "comfy" / "sd1_tokenizer")
    paths["root"] = root
    return paths
