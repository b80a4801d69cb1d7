"""A tiny random-weight CLIP vision encoder file for tests and demos (no downloads).

Same key layout and token count (224 px, patch 14 → 257 tokens) as the real ViT-L/14 ComfyUI
``clip_vision`` file, with the transformers config in the ``xsr.clip_vision_config`` metadata so
:class:`xsr_core.clip_vision.ClipVisionEncoder` can rebuild it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..clip_vision import META_CLIP_CONFIG


def tiny_clip_config(hidden: int = 32, layers: int = 2, heads: int = 2) -> dict:
    """``CLIPVisionConfig`` kwargs of the tiny encoder."""
    return dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=3,
        image_size=224,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # larger than CLIP's 0.02 so that a 2-layer random net still tells images apart
        initializer_range=0.2,
    )


def make_tiny_clip_vision(
    path: str | os.PathLike, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2
) -> Path:
    """Write a seeded tiny ``CLIPVisionModelWithProjection`` to ``path`` (.safetensors); return the path.

    The file is byte-identical for equal arguments (seeded init, sorted safetensors header).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = tiny_clip_config(hidden, layers, heads)
    devices = []  # fork_rng needs an explicit (empty) device list to stay CPU-only
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
        # random (not 1/0) LayerNorm affine and biases: more realistic and distinguishes images
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={META_CLIP_CONFIG: json.dumps(cfg, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
