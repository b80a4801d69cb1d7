"""The one image → CLIP-input preprocessing used everywhere (DB build, training caches, ComfyUI queries).

Geometry follows ComfyUI's ``comfy.clip_vision.clip_preprocess(crop=True)`` exactly, so an image
encoded through ComfyUI's CLIP_VISION object and through :mod:`xsr_core.clip_vision` sees the same
pixels:

1. resize the shortest side to 224 with PyTorch bicubic + antialias (PIL-like kernel; for an
   upscale, e.g. a 32x32 LR, this is a plain bicubic upsample straight to 224x224),
2. centre crop 224x224 (a no-op for square inputs),
3. round to 8 bits (``round(255 x) / 255``): what a uint8 image file would hold, so references
   decoded from files and tensors coming from ComfyUI agree,
4. normalise with the OpenAI CLIP mean / std.

Everything is pure torch and works on CUDA tensors. Inputs are ComfyUI-style ``[B, H, W, C]`` floats
in 0..1 (C = 1, 3 or 4; see :func:`xsr_core.imaging.ensure_rgb`); outputs are ``(B, 3, 224, 224)``
float32 on the input's device. The build data loader runs steps 1-3 in its workers
(:func:`resize_crop_u8`) and step 4 on the GPU (:func:`normalize_u8`); the result is identical.
"""

from __future__ import annotations

import functools

import torch

from .imaging import ensure_rgb, resize_center_crop_chw

# Changing anything in this module's math must change this string: it is part of every encoder
# fingerprint, so reference DBs built with the old preprocessing are refused instead of silently
# mismatching.
PREPROCESS_VERSION = "xsr-clip224-v1:bicubic-aa-shortest-side+center-crop+u8-round+openai-meanstd"

CLIP_SIZE = 224
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize_crop(bchw: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side → ``size`` (bicubic, antialias), centre crop; float (B,C,size,size), unclamped."""
    return resize_center_crop_chw(bchw, size)


def resize_crop_u8(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """Steps 1-3: ``[B,H,W,C]`` floats 0..1 (or uint8) → uint8 ``(B, 3, size, size)``.

    uint8 inputs are converted to 0..1 floats first. This is the part the build workers run.
    """
    if images.dtype == torch.uint8:
        # decoded files (the build workers): resample on the 0..255 scale, channels-first and
        # contiguous — the same linear math as the 0..1 path, without two extra full-size passes
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.shape[-1] != 3:
            images = ensure_rgb(images.float() / 255.0, what="CLIP input") * 255.0
        x = images.permute(0, 3, 1, 2).contiguous().float()  # (B, 3, H, W) in 0..255
        return _resize_crop(x, size).clamp(0.0, 255.0).round().to(torch.uint8)
    rgb = ensure_rgb(images, what="CLIP input").float()
    x = _resize_crop(rgb.movedim(-1, 1).contiguous(), size)  # (B, 3, size, size)
    return (x * 255.0).clamp(0.0, 255.0).round().to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The OpenAI mean / std as float32 ``(1, 3, 1, 1)`` tensors on ``device``, made once per device.

    Building them at every call copied two pageable host buffers to the GPU, and PyTorch waits for
    such a copy (a stream sync per call: the DB build's encoder could not run ahead of the host).
    Made outside inference mode so training code can use them too.
    """
    with torch.inference_mode(False), torch.no_grad():
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def normalize_u8(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Step 4: uint8 ``(B,3,H,W)`` → CLIP-normalised floats of ``dtype`` on the same device."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"normalize_u8 takes uint8 (B,3,H,W) pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    mean, std = _mean_std(pixels.device)
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


def preprocess_hr(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """HR image(s) ``[B,H,W,C]`` 0..1 → CLIP pixel values ``(B, 3, 224, 224)`` float32.

    Shortest side resized to 224 (bicubic, antialiased downscale), centre crop, 8-bit rounding,
    OpenAI CLIP normalisation.
    """
    return normalize_u8(resize_crop_u8(images, size))


def preprocess_lr(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """LR image(s) ``[B,h,w,C]`` 0..1 → CLIP pixel values ``(B, 3, 224, 224)`` float32.

    A square LR (e.g. 32x32) is bicubic-upsampled straight to 224x224; a non-square one has its
    shortest side upsampled to 224 and is centre-cropped. This is the same function as
    :func:`preprocess_hr` (the geometry is identical); it is kept separate so call sites say which
    side of the pipeline they feed and so the LR path can diverge later under a new
    :data:`PREPROCESS_VERSION`.
    """
    return normalize_u8(resize_crop_u8(images, size))
