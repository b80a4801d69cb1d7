"""Small layers shared by the Stage-1 models (RFA and the I2T embedding enhancer).

Both are pre-LN cross-attention transformers: a stream of query tokens ``x`` attends to
``x ⊕ memory`` (the query tokens themselves plus a memory of context tokens), then goes through an
MLP. Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`, so CUDA picks
the flash / memory-efficient kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear → GELU → Linear, with optional dropout after each projection."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs (SDPA fast path)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Nq, C) queries; kv: (B, Nk, C); attn_mask: None or bool (B, 1, 1|Nq, Nk), True = attend."""
        B, Nq, C = x.shape
        Nk = kv.shape[1]
        h = self.heads
        q = self.q(x).view(B, Nq, h, C // h).transpose(1, 2)  # (B, h, Nq, d)
        k, v = self.kv(kv).view(B, Nk, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nk, d)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, h, Nq, d)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class CrossAttentionBlock(nn.Module):
    """Pre-LN block: ``x = x + Attn(LN(x), LN(x) ⊕ LN_mem(memory)); x = x + MLP(LN(x))``.

    Including the (normalised) query stream in the keys/values lets a block fall back to
    self-attention when the memory is empty (I2T with no references) and lets the RFA CLS query
    keep its own state.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_mem = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, Nq, C); memory: None or (B, Nm, C); memory_mask: None or bool (B, Nm), True = valid."""
        nx = self.norm_q(x)
        mask = None
        if memory is not None and memory.shape[1] > 0:
            kv = torch.cat([nx, self.norm_mem(memory)], dim=1)  # (B, Nq + Nm, C)
            if memory_mask is not None:
                keep_self = memory_mask.new_ones(x.shape[0], x.shape[1])
                mask = torch.cat([keep_self, memory_mask], dim=1)[:, None, None, :]  # (B, 1, 1, Nq + Nm)
        else:
            kv = nx
        x = x + self.attn(nx, kv, mask)
        return x + self.mlp(self.norm_mlp(x))


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """ViT-style init: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
