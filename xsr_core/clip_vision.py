"""Frozen CLIP vision encoder (DESIGN §2.1/§2.2): load one ``.safetensors`` file, encode, fingerprint.

The file uses the Hugging Face key layout that ComfyUI's ``models/clip_vision`` folder holds
(``vision_model.embeddings.patch_embedding.weight``, ``vision_model.encoder.layers.N.*``,
``vision_model.post_layernorm.*``, optional ``visual_projection.weight``); a full CLIP checkpoint
(vision + text) works too, its text tower is ignored. The transformers config comes from the file's
metadata key ``xsr.clip_vision_config`` (JSON of ``CLIPVisionConfig`` kwargs; the tiny test encoders
carry it) or is inferred from tensor shapes for the stock ViT-L/14, ViT-H/14 and ViT-bigG/14.

Features (:class:`ClipFeatures`) are exactly what ComfyUI's CLIP_VISION model returns as
``(last_hidden_state, intermediate, pooled)``: ``tokens`` = last hidden state *before* the
post-LayerNorm ``(B, 257, D)``, ``cls`` = ``post_layernorm(tokens[:, 0])`` ``(B, D)`` — the C_HR the
RFA is trained to predict and the vector stored in reference DBs.

OpenCLIP checkpoints (``open_clip_model.safetensors``: keys ``visual.conv1.weight``,
``visual.transformer.resblocks.N.*``, ``visual.proj``; e.g. ViT-H/14 laion2b, the vision tower of the
SD2.x family's CLIP) are read too: :meth:`ClipVisionEncoder.from_file` detects the layout and runs the
vision tower with ``open_clip`` itself (:class:`OpenClipVisionTower`, same features as above). Their
fingerprint is taken over the weights converted to the Hugging Face layout (:func:`open_clip_to_hf`,
the conversion ComfyUI applies when it loads such a file), so a DB built from the OpenCLIP file answers
queries made with the same weights loaded by ComfyUI's CLIPVisionLoader, and refuses other encoders.

The *encoder fingerprint* (:func:`fingerprint_state_dict`) hashes the weights canonicalised to
float16, so the same encoder loaded in fp32 or fp16, from the file or from a ComfyUI model's
``state_dict()``, gets the same fingerprint; reference DBs record it and refuse other encoders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .clip_preprocess import PREPROCESS_VERSION, normalize_u8, preprocess_hr, preprocess_lr
from .paths import existing_file

logger = logging.getLogger(__name__)

META_CLIP_CONFIG = "xsr.clip_vision_config"
VISION_PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"
# hidden size -> (attention heads, activation) of the stock encoders ComfyUI ships configs for.
_KNOWN_WIDTHS = {
    1024: (16, "quick_gelu"),  # OpenAI ViT-L/14 (clip_vision_l, SD1.x / IP-Adapter)
    1280: (16, "gelu"),  # OpenCLIP ViT-H/14 (laion2b)
    1664: (16, "gelu"),  # OpenCLIP ViT-bigG/14
}
_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


class ClipVisionError(ValueError):
    """A CLIP vision file or state dict that cannot be used as the XSR encoder."""


@dataclass
class ClipFeatures:
    """Output of :meth:`ClipVisionEncoder.encode` (float32)."""

    tokens: torch.Tensor  # (B, 1 + num_patches, D): last hidden state before post-LayerNorm
    cls: torch.Tensor  # (B, D): post_layernorm(tokens[:, 0]), the vector reference DBs index


def _is_weight_key(name: str) -> bool:
    if name.endswith("position_ids"):  # a non-persistent index buffer in some exports, not a weight
        return False
    return name.startswith(VISION_PREFIX) or name.startswith("visual_projection.")


def vision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision-encoder weights of ``state_dict`` (``vision_model.*`` and ``visual_projection.*``)."""
    return {k: v for k, v in state_dict.items() if _is_weight_key(k)}


def infer_config(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict[str, Any]:
    """``CLIPVisionConfig`` kwargs inferred from tensor shapes.

    Heads and activation are not visible in shapes: they are known for hidden sizes 1024 (ViT-L/14),
    1280 (ViT-H/14) and 1664 (ViT-bigG/14); any other width is an error telling to add the
    ``xsr.clip_vision_config`` metadata.
    """
    try:
        patch = state_dict["vision_model.embeddings.patch_embedding.weight"]  # (D, C, p, p)
        pos = state_dict["vision_model.embeddings.position_embedding.weight"]  # (1 + n, D)
        fc1 = state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"]  # (I, D)
    except KeyError as e:
        raise ClipVisionError(
            f"{source}: not a CLIP vision encoder in the Hugging Face layout (missing {e.args[0]!r}). "
            "Use a ComfyUI clip_vision file such as clip_vision_l.safetensors / OpenAI "
            "clip-vit-large-patch14 model.safetensors."
        ) from None
    hidden, channels, p, _ = patch.shape
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER_RE.match(k)))
    grid = round((pos.shape[0] - 1) ** 0.5)
    if grid * grid != pos.shape[0] - 1:
        raise ClipVisionError(f"{source}: {pos.shape[0]} position embeddings is not 1 + a square grid")
    if hidden not in _KNOWN_WIDTHS:
        raise ClipVisionError(
            f"{source}: hidden size {hidden} is not a stock CLIP vision width "
            f"({', '.join(map(str, _KNOWN_WIDTHS))}), so the number of attention heads is unknown. "
            f"Add the metadata key {META_CLIP_CONFIG!r} (JSON of CLIPVisionConfig kwargs) to the file."
        )
    heads, act = _KNOWN_WIDTHS[hidden]
    cfg = dict(
        hidden_size=int(hidden),
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=int(layers),
        num_attention_heads=heads,
        num_channels=int(channels),
        image_size=int(grid * p),
        patch_size=int(p),
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    if PROJECTION_KEY in state_dict:
        cfg["projection_dim"] = int(state_dict[PROJECTION_KEY].shape[0])
    return cfg


def _arch_string(state_dict: Mapping[str, torch.Tensor]) -> str:
    patch = state_dict["vision_model.embeddings.patch_embedding.weight"]
    pos = state_dict["vision_model.embeddings.position_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER_RE.match(k)))
    proj = state_dict.get(PROJECTION_KEY)
    grid = round((pos.shape[0] - 1) ** 0.5)
    return (
        f"clip-vision-vit:hidden={patch.shape[0]},layers={layers},patch={patch.shape[-1]},"
        f"image={grid * patch.shape[-1]},proj={proj.shape[0] if proj is not None else 0}"
    )


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Encoder fingerprint ``{"arch", "weights_sha256", "preprocess"}`` of a CLIP vision state dict.

    Only ``vision_model.*`` and ``visual_projection.*`` tensors count (``position_ids`` buffers and a
    text tower are ignored). Each tensor is canonicalised to contiguous float16 on CPU and hashed
    with its name and shape in sorted-name order, so fp32 and fp16 copies of the same weights, from
    a file or from a live (ComfyUI or transformers) module, give the same hash. ViT-L/14 takes a few
    seconds: compute it once per loaded model and cache it.
    """
    sd = vision_state_dict(state_dict)
    if "vision_model.embeddings.patch_embedding.weight" not in sd:
        raise ClipVisionError("fingerprint: the state dict holds no CLIP vision weights (vision_model.*)")
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to(device="cpu", dtype=torch.float16).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"arch": _arch_string(sd), "weights_sha256": h.hexdigest(), "preprocess": PREPROCESS_VERSION}


OPEN_CLIP_PREFIX = "visual."


def is_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an OpenCLIP (``visual.conv1.weight`` ...) rather than a Hugging Face CLIP layout."""
    return "visual.conv1.weight" in state_dict and "vision_model.embeddings.patch_embedding.weight" not in state_dict


def open_clip_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*`` weights of an OpenCLIP ViT in the Hugging Face ``CLIPVisionModelWithProjection``
    layout (fused ``in_proj`` split into q/k/v, ``proj`` transposed into ``visual_projection``).

    Only the plain ViT tower is supported (class token, learnable positions, token pooling): anything
    else (attentional pooler, ``ls`` layer scale, ...) raises :class:`ClipVisionError` naming the key.
    """
    sd = {k[len(OPEN_CLIP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OPEN_CLIP_PREFIX)}
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "class_embedding": "vision_model.embeddings.class_embedding",
        "positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "ln_post.weight": "vision_model.post_layernorm.weight",
        "ln_post.bias": "vision_model.post_layernorm.bias",
    }
    block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k == "proj":
            out[PROJECTION_KEY] = v.t().contiguous()  # (D, P) -> Linear weight (P, D)
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k):
            i, part, kind = m.groups()
            pre = f"vision_model.encoder.layers.{i}."
            if part not in block:
                raise ClipVisionError(
                    f"OpenCLIP key {OPEN_CLIP_PREFIX}{k}: not a plain ViT block (unsupported variant)"
                )
            out[f"{pre}{block[part]}.{kind}"] = v
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k):
            i, kind = m.groups()
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                out[f"vision_model.encoder.layers.{i}.self_attn.{name}.{kind}"] = t.contiguous()
        else:
            raise ClipVisionError(
                f"OpenCLIP key {OPEN_CLIP_PREFIX}{k}: not a plain ViT tower weight (unsupported variant)"
            )
    if "vision_model.embeddings.patch_embedding.weight" not in out:
        raise ClipVisionError("not an OpenCLIP vision tower: no visual.conv1.weight")
    return out


class OpenClipVisionTower(torch.nn.Module):
    """An ``open_clip`` ``VisionTransformer`` answering like transformers' vision model:
    ``(pixel_values=...)`` → ``.last_hidden_state`` (tokens before ``ln_post``) and ``.pooler_output``
    (``ln_post`` of the class token), the :class:`ClipFeatures` contract."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any], open_clip_state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
    ) -> "OpenClipVisionTower":
        """Build the OpenCLIP ViT for a ``CLIPVisionConfig``-style dict and load ``visual.*`` weights strictly."""
        try:
            from open_clip.transformer import QuickGELU, VisionTransformer
        except ImportError:
            raise ClipVisionError(
                f"{source}: an OpenCLIP checkpoint needs the package open_clip_torch "
                "(pip install 'comfyui-xsr[openclip]')"
            ) from None
        proj = open_clip_state_dict.get(OPEN_CLIP_PREFIX + "proj")
        visual = VisionTransformer(
            image_size=int(config.get("image_size", 224)),
            patch_size=int(config["patch_size"]),
            width=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            mlp_ratio=int(config["intermediate_size"]) / int(config["hidden_size"]),
            output_dim=int(proj.shape[1]) if proj is not None else None,
            act_layer=QuickGELU if config.get("hidden_act") == "quick_gelu" else torch.nn.GELU,
        )
        if proj is None:
            visual.proj = None
        sd = {k[len(OPEN_CLIP_PREFIX) :]: v for k, v in open_clip_state_dict.items() if k.startswith(OPEN_CLIP_PREFIX)}
        try:
            visual.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ClipVisionError(
                f"{source}: OpenCLIP weights do not match the vision config {dict(config)}: {e}"
            ) from None
        return cls(visual.eval().requires_grad_(False))

    def forward(self, pixel_values: torch.Tensor):
        from types import SimpleNamespace

        v = self.visual
        x = v.conv1(pixel_values)  # (B, D, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, D)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + g*g, D)
        x = v.transformer(v.ln_pre(x))  # batch-first blocks (open_clip >= 2.24)
        return SimpleNamespace(last_hidden_state=x, pooler_output=v.ln_post(x[:, 0]))


def read_clip_vision_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(vision state dict, metadata) of a ``.safetensors`` file; errors name the file."""
    path = existing_file(path, "CLIP vision file", ClipVisionError)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            open_clip_layout = "visual.conv1.weight" in keys
            sd = {
                k: f.get_tensor(k)
                for k in keys
                if (k.startswith(OPEN_CLIP_PREFIX) if open_clip_layout else _is_weight_key(k))
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise ClipVisionError(f"{path}: not a readable .safetensors file ({e}); re-download or re-export it") from e
    if not sd:
        raise ClipVisionError(
            f"{path}: no CLIP vision weights (keys 'vision_model.*', or OpenCLIP's 'visual.*'); "
            "is this a CLIP vision / CLIP model file?"
        )
    return sd, meta


def build_clip_vision_model(
    state_dict: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None, *, source: str = "state dict"
) -> torch.nn.Module:
    """A transformers ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel`` without projection)
    holding ``state_dict`` (HF layout), in eval mode with gradients off. Loading is strict."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cfg_kwargs = dict(config) if config is not None else infer_config(state_dict, source=source)
    has_proj = PROJECTION_KEY in state_dict
    try:
        cfg = CLIPVisionConfig(**cfg_kwargs)
    except (TypeError, ValueError) as e:
        raise ClipVisionError(f"{source}: bad CLIP vision config {cfg_kwargs}: {e}") from e
    cfg._attn_implementation = "sdpa"
    if has_proj:
        model = CLIPVisionModelWithProjection(cfg)
        sd = dict(state_dict)
    else:
        model = CLIPVisionModel(cfg)
        # transformers 5 CLIPVisionModel has no `vision_model.` level; older versions do
        own = model.state_dict()
        sd = {(k[len(VISION_PREFIX) :] if k[len(VISION_PREFIX) :] in own else k): v for k, v in state_dict.items()}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ClipVisionError(
            f"{source}: weights do not match the CLIP vision config {cfg_kwargs}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return model.eval().requires_grad_(False)


class ClipVisionEncoder(torch.nn.Module):
    """The frozen CLIP vision encoder used for DB building, training caches and queries.

    ``encode(pixel_values)`` takes :mod:`xsr_core.clip_preprocess` output; on CUDA it runs under
    fp16 (or ``autocast_dtype``) autocast. ``fingerprint`` identifies the weights + preprocessing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        fingerprint: dict[str, str],
        config: dict[str, Any],
        source: str = "",
        autocast_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.model = model
        self.fingerprint = dict(fingerprint)
        self.config = dict(config)
        self.source = source
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype = torch.float16,
    ) -> "ClipVisionEncoder":
        """Load from one ``.safetensors`` file (see module docstring). ``dtype`` is the weight dtype."""
        sd, meta = read_clip_vision_file(path)
        open_clip_sd = sd if is_open_clip_state_dict(sd) else None
        if open_clip_sd is not None:
            sd = open_clip_to_hf(open_clip_sd)  # config, fingerprint: as ComfyUI sees these weights
        config = None
        if META_CLIP_CONFIG in meta:
            try:
                config = json.loads(meta[META_CLIP_CONFIG])
            except json.JSONDecodeError as e:
                raise ClipVisionError(f"{path}: metadata {META_CLIP_CONFIG!r} is not valid JSON: {e}") from e
        config = config if config is not None else infer_config(sd, source=str(path))
        fingerprint = fingerprint_state_dict(sd)
        if open_clip_sd is not None:
            model = OpenClipVisionTower.from_hf_config(config, open_clip_sd, source=str(path))
        else:
            model = build_clip_vision_model(sd, config, source=str(path))
        enc = cls(model, fingerprint=fingerprint, config=config, source=str(path), autocast_dtype=autocast_dtype)
        logger.info(
            "CLIP vision encoder %s: %s, sha256 %s", path, fingerprint["arch"], fingerprint["weights_sha256"][:12]
        )
        return enc.to(device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size", 224))

    def _vision(self) -> torch.nn.Module:
        return getattr(self.model, "vision_model", self.model)

    def _forward(self, pixel_values: torch.Tensor):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"encode takes (B, 3, H, W) pixel values, got {tuple(pixel_values.shape)}")
        device = self.device
        param_dtype = next(self.model.parameters()).dtype
        x = pixel_values.to(device=device, dtype=param_dtype, non_blocking=True)
        use_autocast = device.type == "cuda" and param_dtype == torch.float32
        with torch.autocast(device_type=device.type, dtype=self.autocast_dtype, enabled=use_autocast):
            return self._vision()(pixel_values=x)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> ClipFeatures:
        """CLIP pixel values ``(B, 3, 224, 224)`` → :class:`ClipFeatures` (float32, encoder device)."""
        out = self._forward(pixel_values)
        return ClipFeatures(tokens=out.last_hidden_state.float(), cls=out.pooler_output.float())

    @torch.no_grad()
    def encode_cls_u8(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """CLS ``(B, D)`` float32 of uint8 ``(B,3,224,224)`` crops from :func:`resize_crop_u8`.

        Same numbers as ``encode(...).cls`` without the float32 copy of all tokens (DB building).
        """
        dtype = next(self.model.parameters()).dtype
        return self._forward(normalize_u8(pixels_u8.to(self.device, non_blocking=True), dtype)).pooler_output.float()

    def encode_images(self, images: torch.Tensor, *, lr: bool = False) -> ClipFeatures:
        """Preprocess ComfyUI-style ``[B,H,W,C]`` images (HR, or LR with ``lr=True``) and encode."""
        pre = preprocess_lr if lr else preprocess_hr
        return self.encode(pre(images.to(self.device)))
