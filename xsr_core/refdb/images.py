"""Image discovery and robust decoding for reference DBs.

Every odd file is either converted to 8-bit RGB or rejected with a reason (never an exception
escaping to the build loop): truncated / corrupt files, CMYK, 16-bit, palette (with transparency),
alpha (composited over black, like :func:`xsr_core.imaging.ensure_rgb`), EXIF-rotated photos,
animated files (first frame), decompression bombs and images below the minimum side.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MIN_SIDE = 64  # smaller files cannot serve as x16 HR references
PACK_SIDE = 512  # packed references: shortest side resized down to this (the x16 output size)
PACK_QUALITY = 92


class ImageSkip(Exception):
    """An image that cannot be used; ``str(e)`` is the reason stored in the build report."""


def discover_images(root: str | os.PathLike) -> list[str]:
    """All image files under ``root`` (recursive, by extension), as absolute paths sorted by their
    path relative to ``root`` (so ids do not depend on file-system order)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    found.sort()
    return [(root / rel).as_posix() for rel in found]


def read_list_file(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Lines ``PATH`` or ``PATH<TAB>CAPTION`` (relative paths are relative to the list file; ``#``
    comments and blank lines ignored) → [(absolute path, caption or None)] in file order."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        p, _, caption = line.partition("\t")
        p = Path(p.strip())
        out.append(((p if p.is_absolute() else path.parent / p).resolve().as_posix(), caption.strip() or None))
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (alpha composited over black)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, 16-bit RGB (already 8-bit in PIL)
    return img


def _draft(img: Image.Image, side: int) -> None:
    """JPEG only: let libjpeg decode at the smallest 1/2, 1/4 or 1/8 scale whose shortest side is >= ``side``.

    DCT-domain downscaling skips most of the decode work for large photos; ``draft`` never goes below
    the requested size, so the CLIP crop still downsamples (never upsamples) what it gets.
    """
    if img.format != "JPEG":
        return
    w, h = img.size
    short = min(w, h)
    if short < 2 * side:
        return
    img.draft("RGB", (-(-w * side // short), -(-h * side // short)))


def decode_image(data: bytes, *, min_side: int = DEFAULT_MIN_SIDE, what: str = "image",
                 draft_side: int | None = None) -> Image.Image:
    """Bytes of an image file → loaded 8-bit RGB PIL image (EXIF orientation applied).

    ``draft_side``: decode JPEGs at a reduced scale whose shortest side stays >= this (see
    :func:`_draft`); the minimum-side check and ``img.info["xsr_source_size"]`` (W, H after EXIF
    rotation) still refer to the file's full size. Raises :class:`ImageSkip` for anything unusable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            source = img.size
            if draft_side:
                _draft(img, draft_side)
            img.load()  # truncated files fail here (LOAD_TRUNCATED_IMAGES stays False)
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap W and H
                source = (source[1], source[0])
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb8(img)
            rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip(f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, Image.UnidentifiedImageError) as e:
        raise ImageSkip(f"cannot decode ({type(e).__name__}: {e})") from None
    w, h = source
    if min(w, h) < min_side:
        raise ImageSkip(f"too small ({w}x{h}; the minimum side is {min_side} px)")
    rgb.info["xsr_source_size"] = source
    return rgb


def pack_image(rgb: Image.Image, *, side: int = PACK_SIDE, quality: int = PACK_QUALITY) -> bytes:
    """JPEG bytes of ``rgb`` with its shortest side reduced to ``side`` (never enlarged)."""
    w, h = rgb.size
    if min(w, h) > side:
        s = side / min(w, h)
        rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


@dataclass
class DecodedSample:
    """What a build worker returns for one file."""

    seq: int  # manifest sequence number
    ok: bool
    reason: str | None  # why it was skipped (ok == False)
    sha256: str | None  # content hash of the file bytes
    width: int
    height: int
    pixels: "np.ndarray | None"  # uint8 (3, 224, 224) CLIP crop (see clip_preprocess.resize_crop_u8)
    packed: bytes | None  # packed-mode JPEG
    raw: "np.ndarray | None" = None  # uint8 (H, W, 3) decoded image, when the crop is made on the device
