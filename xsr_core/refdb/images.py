"""Image discovery and robust decoding for reference DBs.

Decoding is :mod:`xsr_core.image_io`'s (the one decoder of every XSR loader); here every odd file
is either converted to 8-bit RGB or rejected with a reason (never an exception escaping to the
build loop): truncated / corrupt files, too many pixels and images below the minimum side.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_io import IMAGE_EXTENSIONS, ImageDecodeError, is_image_name, load_rgb8  # noqa: F401 - IMAGE_EXTENSIONS re-exported
from ..paths import existing_file

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
            if is_image_name(name):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    found.sort()
    return [(root / rel).as_posix() for rel in found]


def read_list_file(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Lines ``PATH`` or ``PATH<TAB>CAPTION`` (relative paths are relative to the list file; ``#``
    comments and blank lines ignored) → [(absolute path, caption or None)] in file order."""
    path = existing_file(Path(path).resolve(), "image list")
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


def decode_image(
    data: bytes, *, min_side: int = DEFAULT_MIN_SIDE, what: str = "image", draft_side: int | None = None
) -> Image.Image:
    """Bytes of an image file → loaded 8-bit RGB PIL image (:func:`xsr_core.image_io.load_rgb8`).

    ``draft_side``: decode JPEGs at a reduced scale whose shortest side stays >= this; the
    minimum-side check and ``img.info["xsr_source_size"]`` (W, H after EXIF rotation) still refer to
    the file's full size. Raises :class:`ImageSkip` with a reason for anything unusable.
    """
    try:
        rgb = load_rgb8(data, what=what, draft_side=draft_side)
    except ImageDecodeError as e:
        raise ImageSkip(str(e).removeprefix(f"{what} ").removeprefix(f"{what}: ")) from None
    w, h = rgb.info["xsr_source_size"]
    if min(w, h) < min_side:
        raise ImageSkip(f"too small ({w}x{h}; the minimum side is {min_side} px)")
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
