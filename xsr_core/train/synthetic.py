"""A small synthetic HR image set (coloured shapes over gradients) for tests, demos and ``bench --tiny``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("fine stripes", "checks", "coarse stripes", "dots")


def _texture(kind: int, size: int) -> np.ndarray:
    """A zero-mean high-frequency pattern (size, size): invisible after the /16 downscale."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == 0:
        t = np.sign(np.sin(2 * np.pi * xx / 8.0))
    elif kind == 1:
        t = np.sign(np.sin(2 * np.pi * xx / 10.0) * np.sin(2 * np.pi * yy / 10.0))
    elif kind == 2:
        t = np.sign(np.sin(2 * np.pi * yy / 14.0))
    else:
        t = np.sign(np.sin(2 * np.pi * (xx + yy) / 9.0))
    return t - t.mean()


def make_image(seed: int, size: int = 512, texture: int | None = None) -> tuple[Image.Image, str]:
    """One seeded image and its caption.

    A coloured shape over a gradient, overlaid with a zero-mean fine texture. The texture is a
    function of the shape's colour (``texture=None``): HR detail that the 32x32 LR does not show but
    that is *predictable* from what it shows, which is exactly what the RFA can learn and the raw
    LR CLIP embedding cannot see. ``texture=k`` forces another texture (a retrieval distractor with
    the same LR).
    """
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    g = (g - g.min()) / max(1e-6, np.ptp(g))
    img = Image.fromarray((c0 * (1 - g) + c1 * g).astype(np.uint8))
    d = ImageDraw.Draw(img)
    names = list(COLOURS)
    ci = int(rng.integers(len(names)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    fill = COLOURS[names[ci]]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    kind = ci % len(TEXTURES) if texture is None else texture
    arr = np.asarray(img, dtype=np.float32) + 40.0 * _texture(kind, size)[..., None]
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
