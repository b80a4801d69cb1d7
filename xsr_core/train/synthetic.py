"""A small synthetic HR image set (coloured shapes over gradients) for tests, demos and ``bench --tiny``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("fine stripes", "checks", "coarse stripes", "dots")


def _texture(kind: int, size: int | tuple[int, int]) -> np.ndarray:
    """A zero-mean high-frequency pattern (size, size) or (h, w): invisible after the /16 downscale."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        t = np.sign(np.sin(2 * np.pi * xx / 8.0))
    elif kind == 1:
        t = np.sign(np.sin(2 * np.pi * xx / 10.0) * np.sin(2 * np.pi * yy / 10.0))
    elif kind == 2:
        t = np.sign(np.sin(2 * np.pi * yy / 14.0))
    else:
        t = np.sign(np.sin(2 * np.pi * (xx + yy) / 9.0))
    return t - t.mean()


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_image(
    seed: int, size: int = 512, texture: int | None = None, colour: int | None = None, wh: tuple[int, int] | None = None
) -> tuple[Image.Image, str]:
    """One seeded image and its caption.

    A coloured shape over a gradient, overlaid with a zero-mean fine texture. The texture is a
    function of the shape's colour (``texture=None``): HR detail that the 32x32 LR does not show but
    that is *predictable* from what it shows, which is exactly what the RFA can learn and the raw
    LR CLIP embedding cannot see. ``texture=k`` forces another texture (a retrieval distractor with
    the same LR); ``colour=c`` forces the class (colour index; default drawn from ``seed``);
    ``wh=(w, h)`` makes a non-square image (default ``size`` x ``size``).
    """
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    w, h = wh or (size, size)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    g = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    g = (g - g.min()) / max(1e-6, np.ptp(g))
    img = Image.fromarray((c0 * (1 - g) + c1 * g).astype(np.uint8))
    d = ImageDraw.Draw(img)
    names = list(COLOURS)
    ci = int(rng.integers(len(names)))
    ci = ci if colour is None else colour
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = min(w, h)
    r = int(rng.integers(side // 6, side // 3))
    if w == h:  # the original draw (keeps square images byte-identical to earlier versions)
        cx, cy = (int(v) for v in rng.integers(r, w - r, 2))
    else:
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    fill = COLOURS[names[ci]]
    _draw_shape(d, shape, cx, cy, r, fill)
    kind = ci % len(TEXTURES) if texture is None else texture
    arr = np.asarray(img, dtype=np.float32) + 40.0 * _texture(kind, (h, w))[..., None]
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr), f"a {names[ci]} {shape} with {TEXTURES[kind]} on a gradient background"


def write_image_set(out: str | os.PathLike, n: int = 40, size: int = 512, seed: int = 0) -> Path:
    """Write ``n`` PNGs and ``captions.jsonl`` into ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            img, caption = make_image(seed * 100_003 + i, size)
            img.save(out / f"img_{i:04d}.png")
            f.write(json.dumps({"image": f"img_{i:04d}.png", "caption": caption}) + "\n")
    return out


N_CLASSES = 4


def _gradient(rng: np.random.Generator, w: int, h: int, lo: float, hi: float) -> Image.Image:
    """A linear gradient between two random colours (channels uniform in [lo, hi)) at a random angle."""
    c0, c1 = rng.uniform(lo, hi, 3), rng.uniform(lo, hi, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    g = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    g = (g - g.min()) / max(1e-6, np.ptp(g))
    return Image.fromarray(np.clip(c0 * (1 - g) + c1 * g, 0, 255).astype(np.uint8))


def class_of(path: str | os.PathLike) -> int:
    """The class of an image written by :func:`write_class_set` (``c<class>_<i>.png``), from its path."""
    return int(Path(path).name.split("_")[0][1:])


TEXTURE_AMPLITUDE = 70.0  # strong enough to dominate the HR image's CLIP embedding, still gone at 32x32


def make_class_image(cls: int, seed: int, wh: tuple[int, int] = (640, 512)) -> tuple[Image.Image, str]:
    """One image of class ``cls`` (0..3): the class fixes the shape's colour (visible at 32x32) and a strong
    texture over the whole image (destroyed by the /16 LR); the gradient background (random colours: what
    dominates the raw 32x32 image), the shape's kind, size and position vary per image."""
    rng = np.random.default_rng(seed)
    w, h = wh
    names = list(COLOURS)
    img = _gradient(rng, w, h, 70, 185)  # class-independent background: a confounder at 32x32
    d = ImageDraw.Draw(img)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = min(w, h)
    r = int(rng.integers(side // 5, side // 3))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    fill = COLOURS[names[cls]]
    _draw_shape(d, shape, cx, cy, r, fill)
    arr = np.asarray(img, dtype=np.float32) + TEXTURE_AMPLITUDE * _texture(cls % len(TEXTURES), (h, w))[..., None]
    caption = f"a {names[cls]} {shape} with {TEXTURES[cls % len(TEXTURES)]}"
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), caption


DETAIL_PERIOD = 32  # px at the 512 crop: 4 px at a 64 px stage-2 resolution, 2 px (the Nyquist limit) at the 32x32 LR
DETAIL_AMPLITUDE = 70.0
DETAIL_COLOURS = ((190, 80, 80), (80, 170, 90), (80, 100, 190), (190, 180, 80))  # mid-range: texture never clips


def _detail_texture(cls: int, h: int, w: int, top: int, left: int, period: int = DETAIL_PERIOD) -> np.ndarray:
    """Class ``cls``'s ±1 square-wave texture (vertical / horizontal stripes, checks, diagonal) on an ``h`` x ``w``
    image whose 512 crop starts at (``top``, ``left``).

    Its phase is fixed in crop coordinates: the zero crossings lie on the centres of the 16x16 blocks the LR pixels
    sample, so the pattern is point-odd about every LR sample and the symmetric antialiased /16 downscale averages it
    away, while a 64 px training crop keeps it (a 4 px period)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    half = 16 / 2 - 0.5  # the centre of a 16 px LR block, in pixel-index coordinates
    x, y = 2 * np.pi * (xx - left - half) / period, 2 * np.pi * (yy - top - half) / period
    kind = cls % 4
    if kind == 0:
        t = np.sin(x)
    elif kind == 1:
        t = np.sin(y)
    elif kind == 2:
        t = np.sin(x) * np.sin(y)
    else:
        t = np.sin(x + y)  # exactly 0 on the crossings through the LR sample centres (rounded: sin(k*pi) is ~1e-16)
    return np.sign(np.round(t, 9))


def make_detail_class_image(cls: int, seed: int, wh: tuple[int, int] = (640, 512)) -> tuple[Image.Image, str]:
    """One image of class ``cls`` (0..3) for the stage-2 proof that the adapter uses E (:func:`write_class_set`).

    The class decides two things: a strong texture over the whole image (:func:`_detail_texture`: most of the pixel
    variance of a 64 px training crop, gone from the 32x32 LR) and the colour of a shape (a weak cue in the LR,
    which is what lets the RFA retrieve same-class references). The background gradient, the shape's kind, size and
    position vary per image; the caption names the shape only (no class word), so neither the LR hint nor the text
    tells the texture: only the references (through E) do. The texture is in phase with the crop grid because the
    tiny random CLIP and VAE of the tests respond to fine patterns nearly linearly (a random phase per image would
    cancel in their features); a trained encoder sees such a texture at any phase. The shortest side must be 512
    (prepare then only crops, keeping the phase).
    """
    w, h = wh
    if min(w, h) != 512:
        raise ValueError(f"make_detail_class_image needs a shortest side of 512, got {w}x{h}")
    rng = np.random.default_rng(seed)
    img = _gradient(rng, w, h, 100, 155)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(512 // 6, 512 // 4))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    _draw_shape(d, shape, cx, cy, r, DETAIL_COLOURS[cls % len(DETAIL_COLOURS)])
    top, left = (h - 512) // 2, (w - 512) // 2  # prepare's centre crop
    tex = _detail_texture(cls, h, w, top, left)
    arr = np.asarray(img, dtype=np.float32) + DETAIL_AMPLITUDE * tex[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), f"a {shape} on a gradient background"


def write_class_set(
    out: str | os.PathLike,
    n: int = 48,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((640, 512), (512, 576), (576, 512)),
    make: Callable[[int, int, tuple[int, int]], tuple[Image.Image, str]] = make_class_image,
) -> Path:
    """``n`` non-square images ``c<class>_<i>.png`` of ``make(cls, seed, wh)`` in N_CLASSES balanced classes +
    ``captions.jsonl``. ``make``: :func:`make_class_image` (the HR detail, a class texture, is only recoverable from
    images of its class; tests/comfy/test_train_roundtrip.py) or :func:`make_detail_class_image` (class-free
    captions; tests/unit/test_stage2_uses_e.py).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            cls = i % N_CLASSES
            img, caption = make(cls, seed * 100_003 + i, sizes[i % len(sizes)])
            name = f"c{cls}_{i:04d}.png"
            img.save(out / name)
            f.write(json.dumps({"image": name, "caption": caption}) + "\n")
    return out
