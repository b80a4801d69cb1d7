"""Image files → RGB: the one decoder, extension list and folder lister of every XSR loader.

Used by the ComfyUI folder loader, the reference DB (build and query), training and evaluation,
so one image file gives the same pixels wherever XSR reads it. Every mode PIL opens becomes RGB:

- 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I``) is scaled by 65535 (``I`` by 255 when its values
  fit in 8 bits), 32-bit float ``F`` is taken as 0..1 (or 0..255 when larger), so high bit depths
  are never clipped to white;
- palette (``P``, ``PA``) with transparency, ``LA``, ``La``, ``RGBA``, ``RGBa``: alpha is
  composited **over black** (``rgb * alpha``), as :func:`xsr_core.imaging.ensure_rgb` does for
  ComfyUI IMAGE tensors and as XSR_PrepareLR's tooltip says;
- CMYK, YCbCr, LAB, HSV, ``1``, ``L``: PIL's conversion to RGB;
- EXIF orientation is applied; animated files give their first frame;
- images above :func:`max_image_pixels` are refused from the header, before pixels are decoded.

Extensions: :data:`IMAGE_EXTENSIONS` (GIF included: its first frame, like any animated file).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .paths import PathConfinementError, confine

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: every camera JPEG, ~200 MB decoded as 8-bit RGB
ENV_MAX_PIXELS = "XSR_MAX_IMAGE_PIXELS"

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; ``str(e)`` says why (names the file when known)."""


def max_image_pixels() -> int:
    """The pixel cap for decoded images (``XSR_MAX_IMAGE_PIXELS``, default 64 Mpx)."""
    raw = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ImageDecodeError(f"{ENV_MAX_PIXELS}={raw!r} is not a number of pixels") from None
    if value < 1:
        raise ImageDecodeError(f"{ENV_MAX_PIXELS} must be >= 1, got {value}")
    return value


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode → float32 (H, W, 3) RGB in 0..1 (full precision for 16-bit/float)."""
    mode = img.mode
    if mode in _INT_MODES:
        a = np.asarray(img).astype(np.float32)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(a / hi, 0.0, 1.0)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        g = np.clip(a / hi, 0.0, 1.0)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        if mode == "La":  # premultiplied grayscale: PIL converts it only to LA
            img = img.convert("LA")
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:4]  # alpha over black
    if mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX
    return np.asarray(img, dtype=np.float32) / 255.0


def to_rgb8(img: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode → 8-bit RGB PIL image (the rules of :func:`to_rgb_array`)."""
    if img.mode == "RGB":
        return img
    plain_p = img.mode == "P" and "transparency" not in img.info
    if img.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX") or plain_p:
        return img.convert("RGB")
    a = to_rgb_array(img)
    return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _draft(img: Image.Image, side: int) -> None:
    """JPEG only: let libjpeg decode at the smallest 1/2, 1/4 or 1/8 scale whose shortest side is >= ``side``.

    DCT-domain downscaling skips most of the decode work for large photos; ``draft`` never goes below
    the requested size, so a later CLIP crop still downsamples (never upsamples) what it gets.
    """
    if img.format != "JPEG":
        return
    w, h = img.size
    short = min(w, h)
    if short < 2 * side:
        return
    img.draft("RGB", (-(-w * side // short), -(-h * side // short)))


def open_image(
    source: str | os.PathLike | bytes,
    *,
    what: str | None = None,
    max_pixels: int | None = None,
    draft_side: int | None = None,
) -> Image.Image:
    """Open + fully load an image (path or bytes) with EXIF orientation applied, in its own mode.

    ``draft_side``: decode JPEGs at a reduced libjpeg scale whose shortest side stays >= this;
    ``img.info["xsr_source_size"]`` is always the file's full (W, H) after EXIF rotation.
    Raises :class:`ImageDecodeError` for unreadable, truncated or too large files.
    """
    what = what or (f"image {os.fspath(source)}" if not isinstance(source, bytes) else "image")
    cap = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
            w, h = img.size
            if w * h > cap:  # from the header, before decoding
                raise ImageDecodeError(
                    f"{what} is {w}x{h} = {w * h} pixels, above the limit of {cap} "
                    f"({ENV_MAX_PIXELS}); downscale it first"
                )
            source = (w, h)
            if draft_side:
                _draft(img, draft_side)
            img.load()  # truncated files fail here (LOAD_TRUNCATED_IMAGES stays False)
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap W and H
                source = (h, w)
            img = ImageOps.exif_transpose(img) or img
            img.info["xsr_source_size"] = source
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{what}: too many pixels ({e})") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"{what} does not exist") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as e:
        raise ImageDecodeError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    return img


def _open_as(source: str | os.PathLike | bytes, what: str | None, convert: Callable, open_kw: dict) -> Any:
    """``convert(open_image(source))``, a conversion failure raised as :class:`ImageDecodeError`."""
    img = open_image(source, what=what, **open_kw)
    try:
        return convert(img)
    except (OSError, ValueError, TypeError) as e:
        raise ImageDecodeError(f"{what or 'image'} cannot be converted to RGB ({type(e).__name__}: {e})") from None


def _loaded_rgb8(img: Image.Image) -> Image.Image:
    rgb = to_rgb8(img)
    rgb.load()
    rgb.info["xsr_source_size"] = img.info["xsr_source_size"]
    return rgb


def load_rgb8(source: str | os.PathLike | bytes, *, what: str | None = None, **open_kw: Any) -> Image.Image:
    """Image file (path or bytes) → loaded 8-bit RGB PIL image (see module docstring); ``open_kw``:
    :func:`open_image`'s ``max_pixels`` and ``draft_side``."""
    return _open_as(source, what, _loaded_rgb8, open_kw)


def load_rgb_float(
    source: str | os.PathLike | bytes, *, what: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Image file (path or bytes) → float32 (H, W, 3) RGB in 0..1 (16-bit precision kept)."""
    return _open_as(source, what, to_rgb_array, {"max_pixels": max_pixels})


def list_images(
    folder: str | os.PathLike, *, recursive: bool = False, roots: Iterable[str | os.PathLike] | None = None
) -> list[str]:
    """Image files (by :data:`IMAGE_EXTENSIONS`) in ``folder``, as absolute paths sorted by their path
    relative to ``folder`` (ids and batch order never depend on file-system order).

    Every file must resolve (symlinks followed) inside ``folder`` or one of ``roots``: a symlink
    pointing elsewhere raises :class:`~xsr_core.paths.PathConfinementError` naming it.
    Symlinked sub-folders are not descended into.
    """
    root = Path(os.path.realpath(os.fspath(folder)))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    allowed = [root, *(roots or ())]
    found = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                if is_image_name(name):
                    found.append(Path(dirpath, name).relative_to(root).as_posix())
    else:
        found = [e.name for e in os.scandir(root) if is_image_name(e.name) and e.is_file()]
    found.sort()
    out = []
    for rel in found:
        p = (root / rel).as_posix()
        confine(p, allowed, what=f"image '{rel}' in {root}")
        out.append(p)
    return out


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ENV_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "PathConfinementError",
    "is_image_name",
    "list_images",
    "load_rgb8",
    "load_rgb_float",
    "max_image_pixels",
    "open_image",
    "to_rgb8",
    "to_rgb_array",
]
