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
    lr = ensure_rgb(lr, what="lr")
    if lr.shape[0] not in (1, sr.shape[0]):
        raise ValueError(f"colour fix: {lr.shape[0]} LR images for {sr.shape[0]} SR images")
    ref = bicubic_resize(lr, tuple(sr.shape[1:3]), antialias=False)
    return ref.expand(sr.shape[0], *ref.shape[1:])


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor(
        [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]], dtype=x.dtype, device=x.device
    )
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k, groups=x.shape[1], dilation=radius)


def _wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """SR high frequencies + LR (upscaled) low frequencies."""
    sr = ensure_rgb(sr, what="image").float()
    ref = _reference(sr, lr).float()
    sr_high, _ = _wavelet_decompose(sr.movedim(-1, 1))
    _, ref_low = _wavelet_decompose(ref.movedim(-1, 1))
    return (sr_high + ref_low).clamp(0, 1).movedim(1, -1)


def adain_color_fix(sr: torch.Tensor, lr: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of the SR matched to the (upscaled) LR."""
    sr = ensure_rgb(sr, what="image").float()
    ref = _reference(sr, lr).float()
    s_var, s_mean = torch.var_mean(sr, dim=(1, 2), keepdim=True, correction=0)
    r_var, r_mean = torch.var_mean(ref, dim=(1, 2), keepdim=True, correction=0)
    return ((sr - s_mean) / (s_var + eps).sqrt() * (r_var + eps).sqrt() + r_mean).clamp(0, 1)


def color_fix(sr: torch.Tensor, lr: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    if method == "wavelet":
        return wavelet_color_fix(sr, lr)
    if method == "adain":
        return adain_color_fix(sr, lr)
    raise ValueError(f"colour fix method must be one of {METHODS}, got {method!r}")
