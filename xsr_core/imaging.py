"""Image-side helpers shared by the nodes, the reference DB, training and evaluation.

The one definition of the x16 geometry, used by ``train prepare``, the training data loader,
``eval run``, ``eval metrics`` and the nodes:

- **HR → 512 crop** (:func:`crop_hr`): shortest side resized to 512 (PyTorch bicubic, antialiased),
  centre crop, 8-bit rounding (what the stored PNG holds). :func:`resize_center_crop` is the same
  shortest-side + centre-crop geometry at any side, also used for CLIP's 224 input and thumbnails.
- **512 → 32 LR** (:func:`make_lr`): antialiased PyTorch bicubic downscale by 16 (the training
  degradation). :func:`hr_lr_pair` applies both.
- **structure hint** (:func:`structure_hint`): bicubic upscale of the LR.

Tensors are ComfyUI-style ``[B, H, W, C]`` floats in 0..1 unless a function says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import MAX_LR_SIDE, SCALE

HR_SIDE = 512  # the paper's HR crop (32 x 16)
MIN_LR_SIDE = 4  # below this, the x16 structure hint carries no usable layout


class LRImageError(ValueError):
    """An LR image the pipeline cannot take (size, channels, values)."""


def ensure_rgb(image: torch.Tensor, *, what: str = "image") -> torch.Tensor:
    """Return ``image`` ([B,H,W,C], C in 1/3/4) as RGB [B,H,W,3].

    Grayscale is repeated to three channels; RGBA is composited over black, which is what ComfyUI's
    own LoadImage does with the alpha it splits into a mask.
    """
    if image.ndim == 3:  # a single [H, W, C] image
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise LRImageError(f"{what}: expected an IMAGE tensor [B, H, W, C], got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 3:
        return image
    if c == 1:
        return image.expand(*image.shape[:-1], 3)
    if c == 4:
        rgb, alpha = image[..., :3], image[..., 3:4]
        return rgb * alpha
    raise LRImageError(f"{what}: {c} channels; only grayscale (1), RGB (3) or RGBA (4) are supported")


def validate_lr(image: torch.Tensor, *, max_side: int = MAX_LR_SIDE, what: str = "image") -> torch.Tensor:
    """Check an LR IMAGE and return it as RGB float32 [B,H,W,3].

    Raises :class:`LRImageError` naming ``what`` and the fix when the image is too large, too small,
    not an image tensor, or holds NaN/Inf values.
    """
    rgb = ensure_rgb(image, what=what)
    _, h, w, _ = rgb.shape
    if max(h, w) > max_side:
        raise LRImageError(
            f"{what} is {w}x{h} px; XSR takes LR images up to {max_side} px per side "
            f"(x{SCALE} gives up to {max_side * SCALE} px). Downscale it first (e.g. the ImageScale "
            f"node to 32x32, the paper's setting) or crop it."
        )
    if min(h, w) < MIN_LR_SIDE:
        raise LRImageError(f"{what} is {w}x{h} px; the smallest LR side XSR accepts is {MIN_LR_SIDE} px.")
    if not torch.isfinite(rgb).all():
        raise LRImageError(f"{what} contains NaN or Inf values; check the node that produced it.")
    return rgb.float().clamp(0.0, 1.0)


def bicubic_resize(bhwc: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of a [B,H,W,C] tensor to ``size`` = (H, W), clamped to 0..1.

    PyTorch's bicubic (a = -0.75, as OpenCV) with antialiasing on downscale (as PIL's BICUBIC).
    """
    x = bhwc.movedim(-1, 1)  # (B, C, H, W)
    y = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=antialias)
    return y.clamp(0.0, 1.0).movedim(1, -1)


def structure_hint(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The ControlNet structure hint: the LR bicubic-upscaled by ``scale`` ([B,H,W,3] → [B,sH,sW,3])."""
    _, h, w, _ = lr.shape
    return bicubic_resize(lr, (h * scale, w * scale), antialias=False)


def make_lr(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The training/evaluation degradation: antialiased bicubic downscale by ``scale``."""
    _, h, w, _ = hr.shape
    if h % scale or w % scale:
        raise LRImageError(f"HR size {w}x{h} is not a multiple of the scale {scale}")
    return bicubic_resize(hr, (h // scale, w // scale), antialias=True)


def crop_geometry(h: int, w: int, side: int) -> tuple[int, int, int, int]:
    """(resized H, resized W, top, left) of the shortest-side → ``side`` resize + centre crop of an HxW image."""
    s = side / min(h, w)
    nh, nw = max(side, round(h * s)), max(side, round(w * s))
    return nh, nw, (nh - side) // 2, (nw - side) // 2


def resize_center_crop_chw(bchw: torch.Tensor, side: int) -> torch.Tensor:
    """Shortest side → ``side`` (bicubic, antialiased), centre crop: (B,C,H,W) → (B,C,side,side), unclamped.

    Works on any value scale (0..1 or 0..255). An image whose shortest side already is ``side`` is
    only cropped (PyTorch's same-size bicubic is the identity, so this changes no pixel).
    """
    h, w = bchw.shape[-2:]
    nh, nw, top, left = crop_geometry(h, w, side)
    if (nh, nw) != (h, w):
        bchw = F.interpolate(bchw, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return bchw[..., top : top + side, left : left + side]


def resize_center_crop(bhwc: torch.Tensor, side: int) -> torch.Tensor:
    """:func:`resize_center_crop_chw` on ``[B,H,W,C]`` floats 0..1, clamped to 0..1."""
    x = resize_center_crop_chw(bhwc.float().movedim(-1, 1), side)
    return x.clamp(0.0, 1.0).movedim(1, -1)


def round_u8(x: torch.Tensor) -> torch.Tensor:
    """0..1 floats rounded to the 256 levels an 8-bit image file holds."""
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


def crop_hr(hr: torch.Tensor, side: int = HR_SIDE) -> torch.Tensor:
    """HR → ``side`` crop: ``[B,H,W,C]`` (any size, C = 1/3/4) → RGB ``[B,side,side,3]``, 8-bit rounded.

    Shortest side resized to ``side`` (PyTorch bicubic, antialiased; an upscale for small images),
    centre crop, rounded to 8 bits so the crop equals the PNG that stores it and the LR is made from
    exactly the stored HR.
    """
    return round_u8(resize_center_crop(ensure_rgb(hr, what="HR image"), side))


def hr_lr_pair(
    hr: torch.Tensor, side: int = HR_SIDE, scale: int = SCALE, degradation=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR crop, LR) of ``[B,H,W,C]`` HR images: :func:`crop_hr`, then ``degradation`` (default
    :func:`make_lr`) of the crop, 8-bit rounded like the LR PNG."""
    crop = crop_hr(hr, side)
    lr = (degradation or make_lr)(crop, scale)
    return crop, round_u8(lr)
