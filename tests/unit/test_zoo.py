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


def test_tiny_vae_latents_are_unit_variance_and_framework_consistent(tiny_zoo):
    """The U-Net sees unit-variance latents (as SD's 0.18215 gives for its VAE), the same in diffusers (the
    trainer: ``encode(x).latents * scaling_factor``) and in ComfyUI (TAESD ``encoder(x) / vae_scale``, then the
    SD1.x latent format's x 0.18215)."""
    import numpy as np
    from diffusers import AutoencoderTiny
    from safetensors import safe_open

    from xsr_core.imaging import crop_hr
    from xsr_core.testing.zoo import SD15_SCALING_FACTOR
    from xsr_core.train.synthetic import make_class_image, make_image

    vae = AutoencoderTiny.from_pretrained(str(tiny_zoo["diffusers"] / "vae")).eval()
    imgs = [make_image(i, 128)[0] for i in range(3)] + [make_class_image(c, c, (160, 128))[0] for c in range(3)]
    x = torch.cat([crop_hr(torch.from_numpy(np.array(im)).float()[None] / 255, 128) for im in imgs])
    with torch.no_grad():
        enc = vae.encode(x.permute(0, 3, 1, 2) * 2 - 1).latents
    z = enc * vae.config.scaling_factor
    assert 0.6 < z.std().item() < 1.6, z.std().item()
    with safe_open(str(tiny_zoo["checkpoint"]), framework="pt") as f:
        scale = next(f.get_tensor(k) for k in f.keys() if k.endswith("vae_scale")).item()
        shift = next(f.get_tensor(k) for k in f.keys() if k.endswith("vae_shift")).item()
    comfy_z = (enc / scale + shift) * SD15_SCALING_FACTOR  # comfy.taesd.taesd.TAESD.encode + latent_formats.SD15
    assert torch.allclose(comfy_z, z, rtol=1e-5, atol=1e-6)
