"""RFA — the Reference-Finding Aligner (DESIGN §2.1, Stage 1a).

A 32x32 image's own CLIP embedding is far from its HR counterpart, so retrieval on it would match
blur rather than content. RFA reads the frozen CLIP ViT-L/14 patch tokens of the (bicubic-upsampled)
LR image and predicts the HR image's CLIP CLS vector:

    F_LR (B, 1+256, 1024) ──drop encoder CLS──► 256 patch tokens ──Linear + pos──► memory (B, 256, W)
    learnable CLS query (1, W) ──depth × [cross-attend to (query ⊕ memory), MLP]──► LN ──Linear──► Ĉ_LR

The encoder's own CLS is dropped and replaced by a learned query, as in the paper. The patch tokens
are LayerNorm-ed before the input projection because CLIP's pre-LN hidden states carry a few
large-magnitude channels. The target C_HR is
the HR image's CLS *after* the encoder's final LayerNorm and before the 768-d projection, and the loss
is the paper's L_align = ‖Ĉ_LR − C_HR‖² (:func:`align_loss`). At inference Ĉ_LR is L2-normalised
(:meth:`RFA.query_embedding`) and used for cosine top-K search in the reference database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import register
from .layers import CrossAttentionBlock, init_transformer_weights


@dataclass
class RFAConfig:
    clip_dim: int = 1024  # width of the CLIP vision tokens fed in (ViT-L/14: 1024)
    width: int = 1024  # inner width of the aligner transformer
    depth: int = 4  # number of cross-attention blocks
    heads: int = 16  # attention heads per block (width must be divisible by it)
    mlp_ratio: float = 4.0  # MLP hidden width = width * mlp_ratio
    num_patches: int = 256  # patch tokens per image (224 px / 14 px patches = 16x16)
    out_dim: int = 1024  # width of the predicted CLS Ĉ_LR (= CLIP hidden width, pre-projection)
    dropout: float = 0.0  # dropout in attention and MLPs (training only)

    def __post_init__(self) -> None:
        for name in ("clip_dim", "width", "depth", "heads", "num_patches", "out_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"RFAConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"RFAConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"RFAConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RFAConfig.dropout must be in [0, 1), got {self.dropout!r}")


def align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_align: mean over the batch of the squared L2 distance ‖pred − target‖² (B, D) → scalar."""
    if pred.shape != target.shape:
        raise ValueError(f"align_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (pred.float() - target.float()).pow(2).sum(dim=-1).mean()


@register
class RFA(nn.Module):
    """Predicts the HR CLIP CLS (B, out_dim) from LR CLIP vision tokens."""

    config_class = RFAConfig

    def __init__(self, config: RFAConfig):
        super().__init__()
        if isinstance(config, dict):
            config = RFAConfig(**config)
        self.config = config
        c = config
        self.in_norm = nn.LayerNorm(c.clip_dim)
        self.in_proj = nn.Linear(c.clip_dim, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.width))
        self.cls_query = nn.Parameter(torch.zeros(1, 1, c.width))
        self.blocks = nn.ModuleList(CrossAttentionBlock(c.width, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.head_norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.out_dim)
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_query, std=0.02)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Accept (B, 1+P, C) (drop the encoder CLS at index 0) or (B, P, C); return (B, P, C)."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[-1] != c.clip_dim:
            raise ValueError(
                f"RFA expects CLIP vision tokens of shape (B, {c.num_patches + 1} or {c.num_patches}, {c.clip_dim}), "
                f"got {tuple(tokens.shape)}; check that the CLIP vision model matches this RFA file"
            )
        n = tokens.shape[1]
        if n == c.num_patches + 1:
            return tokens[:, 1:]
        if n == c.num_patches:
            return tokens
        raise ValueError(
            f"RFA was built for {c.num_patches} patch tokens (+1 CLS), got {n} tokens; the CLIP vision model or its "
            "input resolution differs from the one this RFA was trained with"
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: CLIP vision last_hidden_state of the LR image → Ĉ_LR (B, out_dim), unnormalised."""
        patches = self.patch_tokens(tokens).to(self.in_proj.weight.dtype)
        memory = self.in_proj(self.in_norm(patches)) + self.pos_embed  # (B, P, W)
        x = self.cls_query.expand(patches.shape[0], -1, -1)  # (B, 1, W)
        for block in self.blocks:
            x = block(x, memory)
        return self.head(self.head_norm(x[:, 0]))  # (B, out_dim)

    @torch.no_grad()
    def query_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised Ĉ_LR in float32, ready for cosine search in the reference database."""
        return F.normalize(self.forward(tokens).float(), dim=-1)

    align_loss = staticmethod(align_loss)

