"""Canonical ids of the SD U-Net / ControlNet transformer blocks the AdaIN adapter patches (DESIGN §2.4).

One id names one ``BasicTransformerBlock`` in both bindings:

==================== ============================================ =========================================
canonical id         diffusers module path                         ComfyUI (ldm) module path / patch key
==================== ============================================ =========================================
``unet.input.1.0``   ``down_blocks.0.attentions.0.transformer_    ``input_blocks.1.1.transformer_blocks.0``
                     blocks.0``                                    / ``("input", 1)``, transformer index 0
``unet.middle.0.0``  ``mid_block.attentions.0.transformer_        ``middle_block.1.transformer_blocks.0``
                     blocks.0``                                    / ``("middle", 0)``, 0
``unet.output.3.0``  ``up_blocks.1.attentions.0.transformer_      ``output_blocks.3.1.transformer_blocks.0``
                     blocks.0``                                    / ``("output", 3)``, 0
``control.input.1.0`` ``down_blocks.0.attentions.0...`` inside     ``input_blocks.1.1.transformer_blocks.0``
                     ``ControlNetModel``                           inside ComfyUI's ``cldm.ControlNet``
==================== ============================================ =========================================

The format is ``{model}.{stage}.{index}.{transformer_index}`` where ``(stage, index)`` is ComfyUI's
``extra_options["block"]`` and ``transformer_index`` its ``extra_options["block_index"]`` (the position
inside the SpatialTransformer; always 0 for SD1.x/2.x). So a ComfyUI ``attn2_replace`` key is
``(stage, index, transformer_index)``.

Everything is *derived* from a diffusers ``UNet2DConditionModel`` config (``down_block_types``,
``up_block_types``, ``layers_per_block``, ``transformer_layers_per_block``, ``block_out_channels``,
``cross_attention_dim``, ``attention_head_dim`` / ``num_attention_heads``), replaying the ldm layout:
``input_blocks.0`` is the stem conv, each down level adds ``layers_per_block`` (ResBlock, Transformer)
entries and, except the last level, one Downsample entry; each up level adds ``layers_per_block + 1``
entries. Tiny test configs with the same structure therefore map exactly like SD1.5, and SD2.x
(context 1024, per-level head counts) is only a config change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

MODELS = ("unet", "control")
STAGES = ("input", "middle", "output")

_CROSS_DOWN = "CrossAttnDownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"
_CROSS_MID = "UNetMidBlock2DCrossAttn"


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One patched BasicTransformerBlock, as both bindings see it."""

    id: str  # canonical id, e.g. "unet.input.1.0"
    model: str  # "unet" or "control"
    stage: str  # "input" | "middle" | "output" (ComfyUI extra_options["block"][0])
    index: int  # ComfyUI extra_options["block"][1]
    transformer_index: int  # ComfyUI extra_options["block_index"]; position in the SpatialTransformer
    dim: int  # channels of the block's tokens (norm2 / norm3 width)
    inner_dim: int  # width of attn2's Q and K (n_heads * head_dim; == dim for SD1.x/2.x)
    context_dim: int  # cross-attention context width (768 SD1.x, 1024 SD2.x)
    n_heads: int  # attention heads of attn2
    diffusers_path: str  # module path of the BasicTransformerBlock inside the diffusers model
    comfy_path: str  # module path of the BasicTransformerBlock inside ComfyUI's UNetModel / cldm.ControlNet

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.n_heads

    @property
    def comfy_block(self) -> tuple[str, int]:
        """ComfyUI ``extra_options["block"]`` / the ``block_name, number`` of ``set_model_attn2_replace``."""
        return (self.stage, self.index)

    @property
    def comfy_replace_key(self) -> tuple[str, int, int]:
        """Key of ``transformer_options["patches_replace"]["attn2"]`` for exactly this block."""
        return (self.stage, self.index, self.transformer_index)

    def as_config(self) -> dict[str, Any]:
        """The minimal dict the adapter config stores per block."""
        return {"id": self.id, "dim": self.dim, "inner_dim": self.inner_dim}


def make_block_id(model: str, stage: str, index: int, transformer_index: int = 0) -> str:
    """Canonical id from its parts: ``make_block_id("unet", "input", 1, 0) == "unet.input.1.0"``."""
    if model not in MODELS:
        raise ValueError(f"block model must be one of {MODELS}, got {model!r}")
    if stage not in STAGES:
        raise ValueError(f"block stage must be one of {STAGES}, got {stage!r}")
    return f"{model}.{stage}.{int(index)}.{int(transformer_index)}"


def parse_block_id(block_id: str) -> tuple[str, str, int, int]:
    """``"unet.output.11.0" -> ("unet", "output", 11, 0)``; raises ValueError on a malformed id."""
    parts = block_id.split(".")
    if (
        len(parts) != 4
        or parts[0] not in MODELS
        or parts[1] not in STAGES
        or not (parts[2].isdigit() and parts[3].isdigit())
    ):
        raise ValueError(
            f"malformed block id {block_id!r}: "
            "expected '<unet|control>.<input|middle|output>.<index>.<transformer_index>'"
        )
    return parts[0], parts[1], int(parts[2]), int(parts[3])


def block_id_from_comfy(model: str, block: Sequence[Any], transformer_index: int = 0) -> str:
    """Canonical id from ComfyUI's ``extra_options["block"]`` (e.g. ``("input", 1)``) and ``["block_index"]``."""
    return make_block_id(model, str(block[0]), int(block[1]), int(transformer_index))


def comfy_block_path(block_id: str) -> str:
    """Module path of a block's ``BasicTransformerBlock`` inside ComfyUI's ``UNetModel`` / ``cldm.ControlNet``.

    ``comfy_block_path("unet.input.1.0") == "input_blocks.1.1.transformer_blocks.0"``; this is the one
    derivation behind :attr:`BlockSpec.comfy_path` (ComfyUI's ldm layout: entry ``.1`` of an input/output
    block is its SpatialTransformer, and the middle block is ``[ResBlock, SpatialTransformer, ResBlock]``).
    """
    _, stage, index, t = parse_block_id(block_id)
    if stage == "middle":
        return f"middle_block.1.transformer_blocks.{t}"
    return f"{stage}_blocks.{index}.1.transformer_blocks.{t}"


def _per_level(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (int, type(None))):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"U-Net config field {name!r} has {len(value)} entries but there are {n} down blocks")
    return value


def _per_layer(value: Any, layer: int) -> int:
    # transformer_layers_per_block entries are an int per level or (SDXL-style) a list per layer
    return int(value) if isinstance(value, int) else int(value[layer])


class _Geometry:
    """Per-level widths / heads / context dims read from a diffusers U-Net or ControlNet config."""

    def __init__(self, config: Mapping[str, Any]):
        try:
            self.down_types = list(config["down_block_types"])
            self.channels = [int(c) for c in config["block_out_channels"]]
        except KeyError as e:
            raise ValueError(f"not a diffusers UNet2DConditionModel/ControlNetModel config: missing {e}") from e
        n = len(self.down_types)
        if len(self.channels) != n:
            raise ValueError(f"block_out_channels has {len(self.channels)} entries for {n} down blocks")
        self.n = n
        self.layers = [int(x) for x in _per_level(config.get("layers_per_block", 2), n, "layers_per_block")]
        self.tlayers = _per_level(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
        rev = config.get("reverse_transformer_layers_per_block")
        self.tlayers_up = list(rev) if rev is not None else list(reversed(self.tlayers))
        heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
        self.heads = [int(h) for h in _per_level(heads, n, "attention_head_dim")]
        ctx = config.get("cross_attention_dim", 1280)
        self.context = [int(c) for c in _per_level(ctx, n, "cross_attention_dim")]
        self.mid_type = config.get("mid_block_type", _CROSS_MID)

    def spec(self, model, stage, index, t, level, heads, context, dpath) -> BlockSpec:
        dim = self.channels[level]
        head_dim = dim // heads
        return BlockSpec(
            id=make_block_id(model, stage, index, t),
            model=model,
            stage=stage,
            index=index,
            transformer_index=t,
            dim=dim,
            inner_dim=heads * head_dim,
            context_dim=context,
            n_heads=heads,
            diffusers_path=dpath,
            comfy_path=comfy_block_path(make_block_id(model, stage, index, t)),
        )


def _down_and_mid(g: _Geometry, model: str) -> list[BlockSpec]:
    out: list[BlockSpec] = []
    idx = 1  # input_blocks.0 is the stem conv
    for level, btype in enumerate(g.down_types):
        for j in range(g.layers[level]):
            if _CROSS_DOWN in btype:
                for t in range(_per_layer(g.tlayers[level], j)):
                    out.append(
                        g.spec(
                            model,
                            "input",
                            idx,
                            t,
                            level,
                            g.heads[level],
                            g.context[level],
                            f"down_blocks.{level}.attentions.{j}.transformer_blocks.{t}",
                        )
                    )
            idx += 1
        if level != g.n - 1:
            idx += 1  # Downsample entry
    if g.mid_type == _CROSS_MID:
        # diffusers builds the mid block from the last level's settings
        last = g.tlayers[-1]
        n_t = last if isinstance(last, int) else int(last[-1])
        for t in range(n_t):
            out.append(
                g.spec(
                    model,
                    "middle",
                    0,
                    t,
                    g.n - 1,
                    g.heads[-1],
                    g.context[-1],
                    f"mid_block.attentions.0.transformer_blocks.{t}",
                )
            )
    return out


def unet_blocks(config: Mapping[str, Any]) -> list[BlockSpec]:
    """Transformer blocks of a diffusers ``UNet2DConditionModel`` config, in forward order.

    ``config`` is a dict or ``unet.config``. SD1.5 gives 16 blocks: input 1,2,4,5,7,8, middle 0,
    output 3..11.
    """
    g = _Geometry(config)
    out = _down_and_mid(g, "unet")
    try:
        up_types = list(config["up_block_types"])
    except KeyError as e:
        raise ValueError("not a diffusers UNet2DConditionModel config: missing 'up_block_types'") from e
    if len(up_types) != g.n:
        raise ValueError(f"up_block_types has {len(up_types)} entries for {g.n} down blocks")
    layers_up = list(reversed(g.layers))
    heads_up = list(reversed(g.heads))
    ctx_up = list(reversed(g.context))
    idx = 0
    for i, btype in enumerate(up_types):
        level = g.n - 1 - i
        for j in range(layers_up[i] + 1):
            if _CROSS_UP in btype:
                for t in range(_per_layer(g.tlayers_up[i], j)):
                    out.append(
                        g.spec(
                            "unet",
                            "output",
                            idx,
                            t,
                            level,
                            heads_up[i],
                            ctx_up[i],
                            f"up_blocks.{i}.attentions.{j}.transformer_blocks.{t}",
                        )
                    )
            idx += 1
    return out


def controlnet_blocks(config: Mapping[str, Any]) -> list[BlockSpec]:
    """Transformer blocks of a diffusers ``ControlNetModel`` (or the U-Net config it is built from).

    SD1.5 gives 7 blocks: input 1,2,4,5,7,8 and middle 0. The diffusers and ComfyUI (``cldm``)
    module paths use the same naming as in the U-Net encoder.
    """
    return _down_and_mid(_Geometry(config), "control")


def adapter_blocks(config: Mapping[str, Any], include_controlnet: bool = True) -> list[BlockSpec]:
    """All blocks the adapter covers: the U-Net's, then (optionally) the ControlNet's."""
    blocks = unet_blocks(config)
    if include_controlnet:
        blocks += controlnet_blocks(config)
    return blocks
