"""TEST-ONLY ComfyUI custom node pack: teaches ComfyUI's stock loaders the tiny zoo's widths.

Why this exists: ComfyUI detects a checkpoint's model class by matching its U-Net widths against a
fixed list (SD1.5 = 320 channels, context 768) and picks a CLIP-vision config by layer count (23+
layers = ViT-L/14). The tiny zoo (xsr_core/testing/zoo.py) keeps SD1.5's structure with 32..128
channels so the suite runs on 2 CPU cores; without this pack, CheckpointLoaderSimple says "Could not
detect model type" and CLIPVisionLoader returns None for it. Real SD1.5 / ViT-L/14 files need none of
this. The harness copies this folder into the test server's custom_nodes/ beside the XSR pack; it is
never shipped with the pack. Its one node, ``XSRTest_LiveObjects``, reports what the memory tests
observe: live AdaINAdapter objects (after a full garbage collection) and the server's RSS.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile

import psutil

import comfy.clip_vision
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

logger = logging.getLogger(__name__)
TEXT_PREFIX = "cond_stage_model.transformer.text_model."


def _tiny_text_config(state_dict: dict) -> dict:
    """CLIP text config of a tiny checkpoint, read from its tensor shapes."""
    hidden = state_dict[TEXT_PREFIX + "final_layer_norm.weight"].shape[0]
    layers = len({k.split(".")[5] for k in state_dict if k.startswith(TEXT_PREFIX + "encoder.layers.")})
    inter = state_dict[TEXT_PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 16),
        "projection_dim": hidden,
    }


class XSRTinySD15(comfy.supported_models.SD15):
    """SD1.x with the tiny zoo's widths (32 channels, context 32)."""

    unet_config = {
        "context_dim": 32,
        "model_channels": 32,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }

    def clip_target(self, state_dict={}):
        cfg = _tiny_text_config(state_dict) if TEXT_PREFIX + "final_layer_norm.weight" in state_dict else {}

        class TinyClip(comfy.sd1_clip.SD1ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                model_options = {**model_options, "clip_l_model_config": dict(cfg)}
                super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)

        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)


if XSRTinySD15 not in comfy.supported_models.models:
    comfy.supported_models.models.insert(0, XSRTinySD15)

_stock_clip_vision_load = comfy.clip_vision.load


def _load_clip_vision(ckpt_path):
    """Stock loader first; tiny encoders carrying an ``xsr.clip_vision_config`` get their own config."""
    clip = _stock_clip_vision_load(ckpt_path)
    if clip is not None:
        return clip
    sd, metadata = comfy.utils.load_torch_file(ckpt_path, return_metadata=True)
    raw = (metadata or {}).get("xsr.clip_vision_config")
    if raw is None:
        return None
    config = {
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "num_channels": 3,
        **json.loads(raw),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        clip = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    missing, unexpected = clip.load_sd(sd)
    if missing:
        logger.warning("tiny clip vision missing keys: %s", missing)
    return clip


comfy.clip_vision.load = _load_clip_vision
logger.info("xsr_test_support: tiny SD1.x model class and tiny CLIP-vision loading registered (TEST ONLY)")


class XSRTestLiveObjects:
    """TEST ONLY: counts live objects of the named classes after gc.collect() and reports the RSS."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"class_names": ("STRING", {"default": "AdaINAdapter"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # never cached: every prompt measures afresh

    RETURN_TYPES = ()
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = "xsr_test"

    def measure(self, class_names: str):
        names = {n.strip() for n in class_names.split(",") if n.strip()}
        gc.collect()
        counts = dict.fromkeys(sorted(names), 0)
        for obj in gc.get_objects():
            name = type(obj).__name__
            if name in counts:
                counts[name] += 1
        rss = psutil.Process().memory_info().rss
        return {"ui": {"xsr_live": [{"counts": counts, "rss": rss}]}}


NODE_CLASS_MAPPINGS: dict = {"XSRTest_LiveObjects": XSRTestLiveObjects}
