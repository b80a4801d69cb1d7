"""Canonical block ids: derived from diffusers configs, checked against real (tiny) diffusers modules."""

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from xsr_core.adapter.blocks import (
    adapter_blocks,
    block_id_from_comfy,
    comfy_block_path,
    controlnet_blocks,
    make_block_id,
    parse_block_id,
    unet_blocks,
)

from xsr_core.testing.sd15 import SD15_UNET_CONFIG  # the published SD1.5 U-Net config, literally
from xsr_core.testing.zoo import TINY_UNET_CONFIG

TINY = {**TINY_UNET_CONFIG, "sample_size": 8}  # the tiny zoo U-Net: SD1.5 structure, tiny widths

SD15_UNET_IDS = (
    [f"unet.input.{i}.0" for i in (1, 2, 4, 5, 7, 8)]
    + ["unet.middle.0.0"]
    + [f"unet.output.{i}.0" for i in range(3, 12)]
)
SD15_CONTROL_IDS = [f"control.input.{i}.0" for i in (1, 2, 4, 5, 7, 8)] + ["control.middle.0.0"]


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY)
    return unet, ControlNetModel.from_unet(unet)


def _cross_attn_blocks(model):
    return {n for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None}


def test_sd15_ids_and_comfy_keys():
    blocks = unet_blocks(SD15_UNET_CONFIG)
    assert [b.id for b in blocks] == SD15_UNET_IDS
    assert [b.id for b in controlnet_blocks(SD15_UNET_CONFIG)] == SD15_CONTROL_IDS
    assert [b.id for b in adapter_blocks(SD15_UNET_CONFIG)] == SD15_UNET_IDS + SD15_CONTROL_IDS
    assert len(adapter_blocks(SD15_UNET_CONFIG, include_controlnet=False)) == 16
    by_id = {b.id: b for b in blocks}
    b = by_id["unet.input.1.0"]
    assert (b.comfy_block, b.transformer_index, b.comfy_replace_key) == (("input", 1), 0, ("input", 1, 0))
    assert b.diffusers_path == "down_blocks.0.attentions.0.transformer_blocks.0"
    assert b.comfy_path == "input_blocks.1.1.transformer_blocks.0"
    assert (b.dim, b.inner_dim, b.context_dim, b.n_heads, b.head_dim) == (320, 320, 768, 8, 40)
    m = by_id["unet.middle.0.0"]
    assert (m.comfy_block, m.dim, m.diffusers_path, m.comfy_path) == (
        ("middle", 0),
        1280,
        "mid_block.attentions.0.transformer_blocks.0",
        "middle_block.1.transformer_blocks.0",
    )
    o = by_id["unet.output.3.0"]
    assert (o.dim, o.diffusers_path, o.comfy_path) == (
        1280,
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "output_blocks.3.1.transformer_blocks.0",
    )
    o = by_id["unet.output.11.0"]
    assert (o.dim, o.diffusers_path, o.comfy_path) == (
        320,
        "up_blocks.3.attentions.2.transformer_blocks.0",
        "output_blocks.11.1.transformer_blocks.0",
    )
    assert [b.dim for b in blocks] == [
        320,
        320,
        640,
        640,
        1280,
        1280,
        1280,
        1280,
        1280,
        1280,
        640,
        640,
        640,
        320,
        320,
        320,
    ]
    c = controlnet_blocks(SD15_UNET_CONFIG)[0]
    assert (c.diffusers_path, c.comfy_path) == (
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "input_blocks.1.1.transformer_blocks.0",
    )


def test_tiny_models_map_like_sd15(tiny_models):
    unet, controlnet = tiny_models
    ub, cb = unet_blocks(unet.config), controlnet_blocks(controlnet.config)
    assert [b.id for b in ub] == SD15_UNET_IDS and [b.id for b in cb] == SD15_CONTROL_IDS
    for model, blocks in ((unet, ub), (controlnet, cb)):
        for b in blocks:
            mod = model.get_submodule(b.diffusers_path)
            assert isinstance(mod, BasicTransformerBlock)
            assert mod.norm2.normalized_shape == (b.dim,)
            assert mod.attn2.to_q.out_features == b.inner_dim and mod.attn2.heads == b.n_heads
            assert mod.attn2.to_k.in_features == b.context_dim
        # the mapping covers every cross-attention transformer block of the model, nothing else
        assert {b.diffusers_path for b in blocks} == _cross_attn_blocks(model)


def test_sd2_style_config_and_two_transformer_layers():
    # SD2.x: context 1024, per-level head counts (diffusers' attention_head_dim), linear projections
    cfg = dict(
        TINY,
        block_out_channels=(40, 80, 160, 160),
        norm_num_groups=8,
        cross_attention_dim=48,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        transformer_layers_per_block=2,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    blocks = unet_blocks(unet.config)
    assert len(blocks) == 32  # 16 positions x 2 transformer layers
    assert {b.transformer_index for b in blocks} == {0, 1}
    assert "unet.output.11.1" in {b.id for b in blocks}
    for b in blocks:
        mod = unet.get_submodule(b.diffusers_path)
        assert isinstance(mod, BasicTransformerBlock)
        assert mod.attn2.heads == b.n_heads and b.head_dim == 8 and mod.attn2.to_k.in_features == 48
    assert {b.diffusers_path for b in blocks} == _cross_attn_blocks(unet)
    assert [b.n_heads for b in blocks[:4]] == [5, 5, 5, 5]
    assert blocks[-1].comfy_path == "output_blocks.11.1.transformer_blocks.1"


def test_block_id_helpers():
    assert make_block_id("unet", "input", 1, 0) == "unet.input.1.0"
    assert parse_block_id("control.middle.0.0") == ("control", "middle", 0, 0)
    assert block_id_from_comfy("unet", ("output", 11), 0) == "unet.output.11.0"
    # the ComfyUI binding's module paths are exactly BlockSpec.comfy_path (one derivation)
    for b in adapter_blocks(SD15_UNET_CONFIG):
        assert comfy_block_path(b.id) == b.comfy_path
    assert comfy_block_path("control.middle.0.1") == "middle_block.1.transformer_blocks.1"
    for bad in ("unet.input.1", "vae.input.1.0", "unet.side.1.0", "unet.input.x.0"):
        with pytest.raises(ValueError):
            parse_block_id(bad)
    with pytest.raises(ValueError):
        make_block_id("unet", "down", 1)
    with pytest.raises(ValueError):
        unet_blocks({"down_block_types": ["DownBlock2D"]})
