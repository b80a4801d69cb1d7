"""Colour correction of an SR result against its LR input (as StableSR / CCSR users expect).

Both methods take the LR bicubic-upscaled to the SR size as the colour reference, so they only move
colours toward what the LR says and keep the generated detail:

- ``wavelet``: StableSR's wavelet colour fix: the SR's high-frequency layers (differences of a
  5-level dilated à-trous blur pyramid) plus the reference's lowest-frequency layer.
- ``adain``: per-channel mean/std of the SR matched to the reference's.

Tensors are ComfyUI-style [B, H, W, C] floats in 0..1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .imaging import bicubic_resize, ensure_rgb

METHODS = ("wavelet", "adain")


def _reference(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """The LR bicubic-upscaled to the SR size: (1 or B, H, W, 3), one per distinct LR (broadcast over the SR)."""
    lr = ensure_rgb(lr, what="lr")
    if lr.shape[0] not in (1, sr.shape[0]):
        raise ValueError(f"colour fix: {lr.shape[0]} LR images for {sr.shape[0]} SR images")
    return bicubic_resize(lr.to(sr.device), tuple(sr.shape[1:3]), antialias=False)


_KERNEL = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))


def _wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The lowest-frequency layer of StableSR's à-trous pyramid of ``x`` (B, C, H, W): ``levels`` 3x3 binomial
    blurs with dilation 1, 2, 4, ... (replicate padding). The high-frequency layers sum to ``x`` minus it."""
    c = x.shape[1]
    k = torch.tensor(_KERNEL, dtype=x.dtype).to(x.device)[None, None].repeat(c, 1, 1, 1)  # built once per call
    for i in range(levels):
        r = 2**i
        x = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, groups=c, dilation=r)
    return x


def wavelet_color_fix(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """SR high frequencies + LR (upscaled) low frequencies, on the device of ``sr``.

    The SR's high-frequency layers telescope to ``sr - low(sr)``, so the result is
    ``sr - low(sr) + low(ref)``; both pyramids run as one batched pass.
    """
    sr = ensure_rgb(sr, what="image").float()
    ref = _reference(sr, lr).float()
    b = sr.shape[0]
    low = _wavelet_low(torch.cat([sr, ref]).movedim(-1, 1))  # (B + 1 or 2B, 3, H, W)
    out = sr.movedim(-1, 1) - low[:b] + low[b:]  # low(ref) broadcasts when one LR serves every SR image
    return out.clamp(0, 1).movedim(1, -1)


def adain_color_fix(sr: torch.Tensor, lr: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of the SR matched to the (upscaled) LR."""
    sr = ensure_rgb(sr, what="image").float()
    ref = _reference(sr, lr).float().expand(sr.shape[0], -1, -1, -1)
    s_var, s_mean = torch.var_mean(sr, dim=(1, 2), keepdim=True, correction=0)
    r_var, r_mean = torch.var_mean(ref, dim=(1, 2), keepdim=True, correction=0)
    return ((sr - s_mean) / (s_var + eps).sqrt() * (r_var + eps).sqrt() + r_mean).clamp(0, 1)


def color_fix(sr: torch.Tensor, lr: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    if method == "wavelet":
        return wavelet_color_fix(sr, lr)
    if method == "adain":
        return adain_color_fix(sr, lr)
    raise ValueError(f"colour fix method must be one of {METHODS}, got {method!r}")
