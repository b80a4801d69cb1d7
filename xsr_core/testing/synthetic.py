"""Procedural images (ours to ship and test with): seeded scenes of gradients, discs and stripes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(seed: int, size: int = 256) -> Image.Image:
    """A seeded RGB scene: a two-colour gradient sky, a few discs and a striped band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    c0, c1 = rng.random(3), rng.random(3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(rng.integers(1, 4)):
        cx, cy, r = rng.random(), rng.random(), rng.uniform(0.08, 0.3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.random(3)
    if rng.random() < 0.6:
        band = (y > rng.uniform(0.5, 0.8)) & (np.sin(x * rng.uniform(20, 60)) > 0)
        img[band] = rng.random(3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def write_synthetic_images(
    folder: str | Path, n: int, *, size: int = 256, seed: int = 0, ext: str = "png"
) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"synthetic_{i:04d}.{ext}"
        synthetic_image(seed * 100003 + i, size).save(p)
        paths.append(p)
    return paths
