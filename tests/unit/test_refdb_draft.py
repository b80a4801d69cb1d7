"""Draft-mode JPEG decoding in the reference-DB loader (xsr_core.refdb.images.decode_image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from xsr_core.refdb.build import _FileDataset
from xsr_core.refdb.images import ImageSkip, decode_image


def _jpeg(w: int, h: int, exif_orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "w, h, expect_short", [(1000, 800, 400), (512, 700, 256), (460, 600, 230), (440, 600, 440), (2000, 1792, 224)]
)
def test_draft_keeps_shortest_side_at_least_the_clip_input(w, h, expect_short):
    rgb = decode_image(_jpeg(w, h), draft_side=224)
    assert min(rgb.size) == expect_short >= 224
    assert rgb.info["xsr_source_size"] == (w, h)
    full = decode_image(_jpeg(w, h))
    assert full.size == (w, h)


def test_draft_respects_exif_rotation_and_min_side_of_the_source():
    rgb = decode_image(_jpeg(1200, 900, exif_orientation=6), draft_side=224)
    assert rgb.info["xsr_source_size"] == (900, 1200)
    assert rgb.size[0] < rgb.size[1]  # rotated like the source
    with pytest.raises(ImageSkip, match="too small"):
        decode_image(_jpeg(1200, 900), draft_side=224, min_side=1000)


def test_loader_drafts_only_when_not_packing(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg(1024, 768))
    plain = _FileDataset([(0, str(p))], min_side=1, pack=None, raw_max_pixels=10**7)[0]
    packed = _FileDataset([(0, str(p))], min_side=1, pack=(512, 92), raw_max_pixels=10**7)[0]
    assert (plain.width, plain.height) == (packed.width, packed.height) == (1024, 768)
    assert plain.raw.shape[:2] == (384, 512)  # 1/2 scale: shortest side 384 >= 224
    assert packed.raw.shape[:2] == (768, 1024)  # full decode: the packed copy is unchanged
