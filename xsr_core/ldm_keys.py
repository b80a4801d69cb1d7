"""diffusers ↔ original LDM key layout of SD1.x U-Nets and ControlNets.

Used by ``train export`` (the trained ControlNet is written in the LDM single-file layout that
ComfyUI's ControlNetLoader and diffusers' ``from_single_file`` both read), by stage 2's check of a
user ControlNet file, by the weight fingerprints (:mod:`xsr_core.fingerprint`, computed in the LDM
layout ComfyUI holds) and by the tiny test zoo. The inverse of diffusers' ``convert_ldm_unet_checkpoint``.
"""

from __future__ import annotations

from typing import Any

import torch

_RESNET_MAP = [  # (ldm, diffusers)
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_TOP_MAP = [  # (ldm, diffusers)
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]


def _layer_prefix_map(n_levels: int, layers_per_block: int, *, with_up: bool) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) pairs for the blocks of an SD1.x-structured U-Net."""
    lpb = layers_per_block
    out: list[tuple[str, str]] = []
    for i in range(n_levels):
        for j in range(lpb):
            out.append((f"input_blocks.{i * (lpb + 1) + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            out.append((f"input_blocks.{i * (lpb + 1) + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n_levels - 1:
            out.append((f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        if with_up:
            for j in range(lpb + 1):
                out.append((f"output_blocks.{i * (lpb + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
                out.append((f"output_blocks.{i * (lpb + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}."))
            if i < n_levels - 1:
                # the upsampler follows the attention when the level has one (index 2), else index 1
                out.append((f"output_blocks.{i * (lpb + 1) + lpb}.@UP@.", f"up_blocks.{i}.upsamplers.0."))
    out.append(("middle_block.1.", "mid_block.attentions.0."))
    out.append(("middle_block.0.", "mid_block.resnets.0."))
    out.append(("middle_block.2.", "mid_block.resnets.1."))
    return out


def unet_diffusers_to_ldm(
    sd: dict[str, torch.Tensor], config: dict[str, Any], *, controlnet: bool = False
) -> dict[str, torch.Tensor]:
    """Rename a diffusers SD1.x U-Net (or ControlNet) state dict to the original LDM layout."""
    n_levels = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    up_types = config.get("up_block_types", [])
    layer_map = _layer_prefix_map(n_levels, lpb, with_up=not controlnet)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        if ".resnets." in new:  # res-block sub-layers: norm1 -> in_layers.0, ...
            for ldm, hf in _RESNET_MAP:
                new = new.replace(f".{hf}.", f".{ldm}.")
        for ldm, hf in _TOP_MAP:
            if new.startswith(hf):
                new = ldm + new[len(hf) :]
        if controlnet:
            new = _controlnet_extra(new)
        for ldm, hf in layer_map:
            if new.startswith(hf):
                if "@UP@" in ldm:
                    level = int(hf.split(".")[1])
                    ldm = ldm.replace("@UP@", "2" if up_types[level].startswith("CrossAttn") else "1")
                new = ldm + new[len(hf) :]
                break
        out[new] = value
    return out


def _controlnet_extra(key: str) -> str:
    if key.startswith("controlnet_cond_embedding.conv_in."):
        return "input_hint_block.0." + key.split("conv_in.", 1)[1]
    if key.startswith("controlnet_cond_embedding.blocks."):
        idx, rest = key[len("controlnet_cond_embedding.blocks.") :].split(".", 1)
        return f"input_hint_block.{2 * (int(idx) + 1)}.{rest}"
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return "input_hint_block.14." + key.split("conv_out.", 1)[1]
    if key.startswith("controlnet_down_blocks."):
        idx, rest = key[len("controlnet_down_blocks.") :].split(".", 1)
        return f"zero_convs.{idx}.0.{rest}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block.") :]
    return key
