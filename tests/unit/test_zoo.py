"""The tiny zoo's files are real formats: diffusers' own single-file loaders read back the exact weights."""

from __future__ import annotations

import hashlib

import torch

from xsr_core.testing.zoo import build_tiny_sd, unet_diffusers_to_ldm, write_controlnet


def test_ldm_checkpoint_round_trips_through_diffusers_single_file_loader(tiny_zoo):
    from diffusers import ControlNetModel, UNet2DConditionModel

    folder = tiny_zoo["diffusers"]
    ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    loaded = UNet2DConditionModel.from_single_file(
        str(tiny_zoo["checkpoint"]), config=str(folder), subfolder="unet", local_files_only=True
    )
    a, b = ref.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    ref_cn = ControlNetModel.from_pretrained(folder, subfolder="controlnet")
    cn = ControlNetModel.from_single_file(
        str(tiny_zoo["controlnet"]), config=str(folder / "controlnet"), local_files_only=True
    )
    a, b = ref_cn.state_dict(), cn.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ldm_layout_has_sd15_structure():
    unet, _, _, controlnet = build_tiny_sd(seed=0)
    keys = unet_diffusers_to_ldm(unet.state_dict(), dict(unet.config)).keys()
    attn = {k.split(".transformer_blocks.")[0] for k in keys if ".transformer_blocks.0.attn2.to_q" in k}
    assert len(attn) == 16  # SD1.x: 6 input + 1 middle + 9 output transformer blocks
    assert "output_blocks.2.1.conv.weight" in keys and "output_blocks.5.2.conv.weight" in keys
    assert "input_blocks.3.0.op.weight" in keys
    cn_keys = unet_diffusers_to_ldm(controlnet.state_dict(), dict(controlnet.config), controlnet=True).keys()
    assert "input_hint_block.14.weight" in cn_keys and "middle_block_out.0.weight" in cn_keys
    assert "zero_convs.11.0.weight" in cn_keys


def test_zoo_is_seeded_and_deterministic(tmp_path):
    _, _, _, cn1 = build_tiny_sd(seed=3)
    _, _, _, cn2 = build_tiny_sd(seed=3)
    p1 = write_controlnet(cn1, tmp_path / "a.safetensors")
    p2 = write_controlnet(cn2, tmp_path / "b.safetensors")
    assert hashlib.sha256(p1.read_bytes()).digest() == hashlib.sha256(p2.read_bytes()).digest()
