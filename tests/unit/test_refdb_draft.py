"""Draft-mode JPEG decoding in the reference-DB loader (xsr_core.refdb.images.decode_image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
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


def _jpeg_folder(folder, n: int, *, seed: int, max_side: int, bad_at: int) -> list[str]:
    """``n`` random JPEGs (sides 230..max_side) in ``folder`` and an undecodable bad.jpg at position ``bad_at``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(230, max_side)), int(rng.integers(230, max_side))
        p = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    paths.insert(bad_at, str(folder / "bad.jpg"))
    return paths


def test_worker_sub_batches_regroup_to_the_callers_batches_in_order(tmp_path):
    """With workers, each batch is decoded as parallel sub-batches and handed back whole, in file order:
    same samples, same CLIP crops (raw on the 'device' path too) as the single-process loader."""
    from xsr_core.refdb.loader import BatchGroup, batch_pixels, make_loader, worker_batch_size

    items = list(enumerate(_jpeg_folder(tmp_path, 45, seed=0, max_side=400, bad_at=7)))
    batches = [list(range(s, min(s + 20, len(items)))) for s in range(0, len(items), 20)]
    assert worker_batch_size(20, 2) == 10 and worker_batch_size(256, 15) == 18 and worker_batch_size(4, 8) == 8
    for raw in (None, 2_100_000):
        ref = list(make_loader(items, batches, workers=0, min_side=1, pack=None, raw_max_pixels=raw))
        got = list(make_loader(items, batches, workers=2, min_side=1, pack=None, raw_max_pixels=raw))
        assert len(got) == len(ref) == len(batches)
        for g, r, b in zip(got, ref, batches):
            assert isinstance(g, BatchGroup) and len(g.parts) == -(-len(b) // 10)
            assert [s.seq for s in g.samples] == [s.seq for s in r.samples] == b
            assert g.n_ok == r.n_ok == sum(s.ok for s in r.samples)
            assert torch.equal(batch_pixels(g, torch.device("cpu")), batch_pixels(r, torch.device("cpu")))
        assert sum(not s.ok for g in got for s in g.samples) == 1
    # an empty caller batch comes back as an empty group, in its place
    got = list(make_loader(items, [[0, 1], [], [2]], workers=2, min_side=1, pack=None))
    assert [[s.seq for s in g.samples] for g in got] == [[0, 1], [], [2]] and got[1].n_ok == 0


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_encode_batches_gives_each_batch_its_own_vectors_in_order(tmp_path, device):
    """The build's encode loop keeps batches in flight on the device: each batch still comes back with
    exactly the vectors `_encode` gives it alone (bit for bit), in loader order, for any depth."""
    from xsr_core.clip_vision import ClipVisionEncoder
    from xsr_core.refdb.encode import _encode, encode_batches
    from xsr_core.refdb.loader import batch_pixels, make_loader
    from xsr_core.testing.tiny_clip import make_tiny_clip_vision

    items = list(enumerate(_jpeg_folder(tmp_path, 23, seed=1, max_side=330, bad_at=5)))
    batches = [list(range(s, min(s + 5, len(items)))) for s in range(0, len(items), 5)] + [[5]]  # last: no ok file
    enc = ClipVisionEncoder.from_file(make_tiny_clip_vision(tmp_path / "clip.safetensors"), device=torch.device(device))
    raw = 2_100_000 if device == "cuda" else None

    def loader():
        return make_loader(items, batches, workers=0, min_side=1, pack=None, raw_max_pixels=raw)

    ref = [(b, _encode(enc, batch_pixels(b, enc.device)) if b.n_ok else None) for b in loader()]
    assert ref[-1][1] is None and ref[1][1].shape == (4, enc.dim)  # the bad file is skipped
    for depth in (0, 1, 3):
        got = list(encode_batches(loader(), enc, in_flight=depth))
        assert [[s.seq for s in b.samples] for b, _ in got] == batches
        for (_, g), (_, r) in zip(got, ref):
            assert (g is None and r is None) or np.array_equal(g, r)
