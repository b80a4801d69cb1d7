"""Tile geometry and blending weights of the tiled x16 path (xsr_core.tiling)."""

from __future__ import annotations

import itertools

import pytest
import torch

from xsr_core.tiling import (
    LATENT_PER_LR,
    MAX_TILED_LR_SIDE,
    SCALE,
    TILE,
    Tiling,
    TilingError,
    axis_starts,
    blend,
    crop_tiles,
    tile_weights,
)


@pytest.mark.parametrize(
    "length,overlap", [(32, 8), (33, 8), (48, 8), (64, 0), (100, 12), (256, 8), (256, 16), (20, 4)]
)
def test_axis_starts_cover_the_axis_with_at_least_the_overlap(length, overlap):
    starts = axis_starts(length, TILE, overlap)
    tile = min(TILE, length)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert starts == sorted(set(starts))
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap  # at least the requested overlap
        assert b > a


def test_axis_starts_rejects_bad_parameters():
    with pytest.raises(TilingError, match="overlap"):
        axis_starts(64, 32, 32)
    with pytest.raises(TilingError, match="positive"):
        axis_starts(0, 32, 8)


def test_single_tile_for_the_paper_size_and_small_images():
    t = Tiling.make(32, 32)
    assert len(t) == 1 and t.boxes[0] == (0, 0, 32, 32)
    s = Tiling.make(8, 20)
    assert len(s) == 1 and s.boxes[0] == (0, 0, 8, 20) and s.tile_hw == (8, 20)


def test_grid_of_a_64x48_lr_and_the_largest_size():
    t = Tiling.make(48, 64, overlap=8)
    assert (t.rows, t.cols) == (2, 3) and len(t) == 6 and t.tile_hw == (32, 32)
    assert t.latent_hw == (96, 128)
    big = Tiling.make(MAX_TILED_LR_SIDE, MAX_TILED_LR_SIDE, overlap=8)
    assert big.rows == big.cols == 11  # ceil((256 - 32) / 24) + 1
    with pytest.raises(TilingError, match="256"):
        Tiling.make(257, 32)


@pytest.mark.parametrize("weighting", ["cosine", "gaussian", "constant"])
@pytest.mark.parametrize("hw", [(48, 64), (32, 32), (100, 37), (256, 256)])
def test_weights_are_a_partition_of_unity(weighting, hw):
    t = Tiling.make(*hw, overlap=8)
    w = tile_weights(t, LATENT_PER_LR, weighting)
    assert w.shape == (len(t), *(s * LATENT_PER_LR for s in t.tile_hw))
    assert bool((w > 0).all())
    total = blend(w[:, None], torch.ones(len(t), *w.shape[1:]), t, LATENT_PER_LR)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_cosine_weights_are_exactly_one_where_one_tile_covers():
    t = Tiling.make(48, 64, overlap=8)
    w = tile_weights(t, LATENT_PER_LR, "cosine")
    # tile 0's top-left corner lies in no other tile
    assert float(w[0, 0, 0]) == 1.0 and float(w[0, 5, 5]) == 1.0
    # and it ramps down toward its right neighbour
    assert float(w[0, 10, -1]) < 0.1


def test_blend_of_one_tile_is_bit_identical_and_constant_field_is_kept():
    t = Tiling.make(32, 32)
    w = tile_weights(t)
    x = torch.randn(1, 4, 64, 64)
    assert torch.equal(blend(x, w, t), x)
    t2 = Tiling.make(48, 64)
    w2 = tile_weights(t2)
    field = torch.randn(2, 4, 96, 128)
    crops = crop_tiles(field, t2, list(range(len(t2))), LATENT_PER_LR, batch=2)
    assert crops.shape == (len(t2) * 2, 4, 64, 64)
    back = blend(crops, w2, t2, batch=2)
    assert torch.allclose(back, field, atol=1e-6)


def test_crop_lr_and_scaled_boxes_agree():
    t = Tiling.make(48, 64)
    lr = torch.rand(1, 48, 64, 3)
    tiles = t.crop_lr(lr)
    assert tiles.shape == (6, 32, 32, 3)
    y, x, h, w = t.boxes[4]
    assert torch.equal(tiles[4], lr[0, y : y + h, x : x + w])
    assert t.scaled_boxes(SCALE)[4] == (y * 16, x * 16, 512, 512)
    d = t.as_dict()
    assert d["rows"] == 2 and d["cols"] == 3 and d["boxes"][4] == [x, y, w, h]


def _border_energy_ratio(x: torch.Tensor, tiling: Tiling) -> float:
    """Mean |horizontal step| at tile start/end columns over the mean elsewhere (latent grid)."""
    gx = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,)
    edges = set()
    for _, x0, _, w in tiling.scaled_boxes(LATENT_PER_LR):
        edges |= {x0 - 1, x0 + w - 1}
    mask = torch.zeros_like(gx, dtype=torch.bool)
    mask[[e for e in edges if 0 <= e < gx.numel()]] = True
    return float(gx[mask].mean() / gx[~mask].mean())


@pytest.mark.parametrize("weighting", ["cosine", "gaussian"])
def test_blending_leaves_no_seam_where_hard_tiles_do(weighting):
    """A deterministic denoising loop on a smooth field whose per-tile model has its own bias per tile.

    Each tile's "prediction" is its crop plus a tile-specific offset (the systematic per-tile difference
    that makes seams: every tile has its own conditioning). Blended with overlap, the field stays
    smooth at the tile borders; tiles without overlap (tile-by-tile upscaling) leave a step there.
    """

    def run(tiling, weighting):
        w = tile_weights(tiling, LATENT_PER_LR, weighting)
        lh, lw = tiling.latent_hw
        ramp = torch.linspace(0, 1, lw)[None, None, None, :].expand(1, 4, lh, lw).clone()
        x = ramp.clone()
        offsets = torch.tensor([0.0, 0.6, -0.4, 0.3])[: len(tiling)]
        for _ in range(10):
            crops = crop_tiles(x, tiling, list(range(len(tiling))), LATENT_PER_LR)
            pred = crops + offsets.view(-1, 1, 1, 1)
            x = x + 0.3 * (blend(pred, w, tiling) - x)
        return x

    smooth = run(Tiling.make(8, 64, overlap=16), weighting)
    hard = run(Tiling.make(8, 64, overlap=0), "constant")
    ratio, hard_ratio = (
        _border_energy_ratio(smooth, Tiling.make(8, 64, overlap=16)),
        _border_energy_ratio(hard, Tiling.make(8, 64, overlap=0)),
    )
    assert hard_ratio > 10, hard_ratio
    assert ratio < 1.0, ratio  # smoother at the borders than the ramp is anywhere
