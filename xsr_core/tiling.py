"""Tile geometry and blending weights of the tiled x16 path (LR up to 256 px -> up to 4096 px).

The model is made for one 32x32 LR -> 512x512 output (64x64 latent). A larger LR is cut into
overlapping LR tiles of ``tile`` px; every tile is retrieved, enhanced and denoised as its own
32x32 problem, and the per-tile model predictions are blended back into one full-size latent at
every sampling step (MultiDiffusion, Bar-Tal et al. 2023; Mixture of Diffusers, Jiménez 2023), so
all tiles share one noise field and one trajectory and no seams appear.

Geometry is held in LR pixels and mapped exactly to the latent (LR px x ``SCALE`` / 8) and to the
output pixels (LR px x ``SCALE``); the last tile of each axis is aligned to the image border, so
every tile has the same size (batchable) and the LR needs no padding.

Pure PyTorch, no ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import SCALE

MAX_TILED_LR_SIDE = 256  # x16 -> 4096 px; the largest LR the tiled path accepts
TILE = 32  # LR tile side: the paper's (and the trained models') 32x32 -> 512x512 problem
VAE_FACTOR = 8  # SD latent downsampling
LATENT_PER_LR = SCALE // VAE_FACTOR  # latent px per LR px (2)
WEIGHTINGS = ("cosine", "gaussian", "constant")


class TilingError(ValueError):
    """A tiling request that cannot be satisfied (names the parameter and the fix)."""


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px along an axis of ``length`` px with at least ``overlap`` px overlap.

    Tiles are spread evenly (integer starts, first at 0, last ending at ``length``), so every overlap
    is ``overlap`` px or a little more. An axis shorter than the tile gets one tile of its own length.
    """
    if length <= 0:
        raise TilingError(f"axis length must be positive, got {length}")
    if tile <= 0:
        raise TilingError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise TilingError(f"overlap {overlap} px must be in [0, tile size {tile})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    span = length - tile
    return [round(i * span / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Tiling:
    """Overlapping tiles of one LR image (all coordinates in LR pixels)."""

    lr_height: int
    lr_width: int
    tile: int = TILE  # nominal tile side; an LR side shorter than it gives tiles of that side
    overlap: int = 8  # minimum overlap between neighbouring tiles
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=(), compare=False)  # (y, x, h, w), row-major
    rows: int = 0
    cols: int = 0

    @staticmethod
    def make(lr_height: int, lr_width: int, tile: int = TILE, overlap: int = 8) -> "Tiling":
        if max(lr_height, lr_width) > MAX_TILED_LR_SIDE:
            raise TilingError(
                f"LR is {lr_width}x{lr_height} px; the tiled path takes up to {MAX_TILED_LR_SIDE} px per side"
            )
        ys = axis_starts(lr_height, tile, overlap)
        xs = axis_starts(lr_width, tile, overlap)
        th, tw = min(tile, lr_height), min(tile, lr_width)
        boxes = tuple((y, x, th, tw) for y in ys for x in xs)
        return Tiling(lr_height, lr_width, tile, overlap, boxes, len(ys), len(xs))

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def tile_hw(self) -> tuple[int, int]:
        return self.boxes[0][2], self.boxes[0][3]

    def scaled_boxes(self, factor: int) -> list[tuple[int, int, int, int]]:
        """Boxes in another grid: ``factor`` = LATENT_PER_LR for the latent, SCALE for output pixels."""
        return [(y * factor, x * factor, h * factor, w * factor) for y, x, h, w in self.boxes]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.lr_height * LATENT_PER_LR, self.lr_width * LATENT_PER_LR

    def crop_lr(self, lr_bhwc: torch.Tensor) -> torch.Tensor:
        """The LR tiles of a [1,H,W,C] image as a [T,th,tw,C] batch (row-major tile order)."""
        if lr_bhwc.shape[0] != 1 or tuple(lr_bhwc.shape[1:3]) != (self.lr_height, self.lr_width):
            raise TilingError(
                f"crop_lr: expected one {self.lr_width}x{self.lr_height} image, got {tuple(lr_bhwc.shape)}"
            )
        return torch.cat([lr_bhwc[:, y : y + h, x : x + w] for y, x, h, w in self.boxes])

    def as_dict(self) -> dict:
        """JSON form (for the UI): LR size, grid and boxes as [x, y, w, h]."""
        return {
            "lr_width": self.lr_width,
            "lr_height": self.lr_height,
            "tile": self.tile,
            "overlap": self.overlap,
            "rows": self.rows,
            "cols": self.cols,
            "boxes": [[x, y, w, h] for y, x, h, w in self.boxes],
        }


def _ramp_1d(n: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """Per-pixel weight along one tile axis: raised-cosine ramps of ``overlap`` px at interior edges, 1 elsewhere."""
    w = torch.ones(n, dtype=torch.float64)
    o = min(overlap, n // 2)
    if o > 0:
        r = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(o, dtype=torch.float64) + 0.5) / o)  # (0, 1), never 0
        if lead:
            w[:o] = r
        if trail:
            w[n - o :] = torch.minimum(w[n - o :], r.flip(0))
    return w


def _gaussian_1d(n: int, var: float = 0.01) -> torch.Tensor:
    """Mixture of Diffusers' tile weight: a Gaussian over the tile (variance ``var`` of the tile side)."""
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5
    return torch.exp(-(x * x) / (2 * var))


def tile_weights(tiling: Tiling, factor: int = LATENT_PER_LR, weighting: str = "cosine") -> torch.Tensor:
    """Normalised blending weights (T, h, w) in the grid ``factor`` x LR px; they sum to 1 at every pixel.

    - ``cosine`` (default): 1 inside the tile, a raised-cosine ramp across each overlap with a
      neighbour, no ramp at the image border; a pixel covered by one tile gets weight exactly 1.0, so
      the interior of every tile is that tile's prediction unchanged.
    - ``gaussian``: Mixture of Diffusers' Gaussian weights (every tile contributes wherever it covers).
    - ``constant``: MultiDiffusion's plain average of the overlapping predictions.
    Computed in float64 and normalised by their sum (x / x is exactly 1), returned as float32.
    """
    if weighting not in WEIGHTINGS:
        raise TilingError(f"weighting '{weighting}' is not one of {', '.join(WEIGHTINGS)}")
    H, W = tiling.lr_height * factor, tiling.lr_width * factor
    boxes = tiling.scaled_boxes(factor)
    ov = tiling.overlap * factor
    raw = []
    for y, x, h, w in boxes:
        if weighting == "cosine":
            wy = _ramp_1d(h, ov, lead=y > 0, trail=y + h < H)
            wx = _ramp_1d(w, ov, lead=x > 0, trail=x + w < W)
        elif weighting == "gaussian":
            wy, wx = _gaussian_1d(h), _gaussian_1d(w)
        else:
            wy, wx = torch.ones(h, dtype=torch.float64), torch.ones(w, dtype=torch.float64)
        raw.append(wy[:, None] * wx[None, :])
    total = torch.zeros(H, W, dtype=torch.float64)
    for (y, x, h, w), r in zip(boxes, raw):
        total[y : y + h, x : x + w] += r
    if not bool((total > 0).all()):
        raise TilingError("tiles do not cover the whole image (internal error)")
    out = torch.stack([r / total[y : y + h, x : x + w] for (y, x, h, w), r in zip(boxes, raw)])
    return out.float()


def blend(
    tiles: torch.Tensor,
    weights: torch.Tensor,
    tiling: Tiling,
    factor: int = LATENT_PER_LR,
    out: torch.Tensor | None = None,
    index: list[int] | None = None,
    batch: int = 1,
) -> torch.Tensor:
    """Accumulate per-tile predictions into a full-size canvas: ``out[:, :, box] += tiles * weight``.

    ``tiles``: (len(index) * batch, C, h, w), tile-major (rows of tile ``index[j]`` at j*batch ...
    (j+1)*batch); ``weights`` from :func:`tile_weights` (same ``factor``); ``out``: (batch, C, H, W)
    canvas to add into (zeros when None). Returns ``out``.
    """
    index = list(range(len(tiling))) if index is None else index
    boxes = tiling.scaled_boxes(factor)
    if out is None:
        H, W = tiling.lr_height * factor, tiling.lr_width * factor
        out = tiles.new_zeros(batch, tiles.shape[1], H, W)
    w = weights.to(device=tiles.device, dtype=tiles.dtype)
    for j, t in enumerate(index):
        y, x, h, ww = boxes[t]
        out[:, :, y : y + h, x : x + ww] += tiles[j * batch : (j + 1) * batch] * w[t]
    return out


def crop_tiles(full: torch.Tensor, tiling: Tiling, index: list[int], factor: int, batch: int = 1) -> torch.Tensor:
    """Crops of a (B, C, H, W) tensor at tiles ``index`` (grid ``factor``), tile-major: (len(index) * B, C, h, w)."""
    boxes = tiling.scaled_boxes(factor)
    if full.shape[0] != batch:
        raise TilingError(f"crop_tiles: tensor batch {full.shape[0]} != {batch}")
    return torch.cat([full[:, :, y : y + h, x : x + w] for y, x, h, w in (boxes[t] for t in index)])
