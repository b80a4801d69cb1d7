"""xsr_core.image_io: every PIL mode decodes to the right RGB (16-bit, float, palette + transparency,
CMYK, L/LA/RGBA over black, EXIF orientation), pixel cap from the header, confined folder listing."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from xsr_core.image_io import IMAGE_EXTENSIONS, ImageDecodeError, list_images, load_rgb8, load_rgb_float, to_rgb_array
from xsr_core.paths import PathConfinementError


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16bit_grayscale_keeps_its_range_instead_of_saturating():
    a = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    data = _png(Image.fromarray(a))  # PNG 16-bit gray, opened as I;16
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    f = load_rgb_float(data)
    np.testing.assert_allclose(f[0, :, 0], a[0] / 65535.0, atol=1e-6)
    assert np.all(f[..., 0] == f[..., 2])
    rgb = np.asarray(load_rgb8(data))
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 64, 128, 255])


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16bit_byte_orders(mode):
    a = np.array([[1000, 30000]], dtype=np.uint16)
    img = Image.frombytes(mode, (2, 1), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    np.testing.assert_allclose(to_rgb_array(img)[0, :, 0], a[0] / 65535.0, atol=1e-6)


def test_32bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.int32), "I")
    np.testing.assert_allclose(to_rgb_array(i32)[0, :, 0], [0, 40000 / 65535, 1.0], atol=1e-6)
    i8 = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), "I")  # 8-bit values stored as I
    np.testing.assert_allclose(to_rgb_array(i8)[0, :, 0], [0, 128 / 255, 1.0], atol=1e-6)
    f = Image.fromarray(np.array([[0.0, 0.25, 1.0, np.nan]], dtype=np.float32), "F")
    np.testing.assert_allclose(to_rgb_array(f)[0, :, 0], [0, 0.25, 1.0, 0.0], atol=1e-6)


def test_rgba_and_la_are_composited_over_black():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [255, 255, 255, 0], [0, 200, 0, 128]]], np.uint8), "RGBA")
    out = np.asarray(load_rgb8(_png(rgba)))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])  # fully transparent white → black
    np.testing.assert_array_equal(out[0, 2], [0, 100, 0])
    la = Image.fromarray(np.array([[[200, 0], [200, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(load_rgb8(_png(la)))[0], [[0, 0, 0], [200, 200, 200]])


def test_palette_with_transparency_and_pa():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # red is transparent
    out = np.asarray(load_rgb8(_png(p, transparency=0)))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [0, 0, 255]])
    plain = Image.new("P", (1, 1))
    plain.putpalette([10, 20, 30] + [0] * 765)
    np.testing.assert_array_equal(np.asarray(load_rgb8(_png(plain)))[0, 0], [10, 20, 30])
    pa = Image.new("PA", (1, 1))
    pa.putpalette([10, 20, 30] + [0] * 765)
    pa.putpixel((0, 0), (0, 0))
    np.testing.assert_array_equal(to_rgb_array(pa)[0, 0], [0, 0, 0])


def test_cmyk_l_and_one_bit():
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    np.testing.assert_array_equal(np.asarray(load_rgb8(_png(cmyk, "JPEG", quality=100)))[0, 0] > 250, [True] * 3)
    assert tuple(np.asarray(load_rgb8(_png(Image.new("CMYK", (1, 1), (255, 0, 0, 0)), "TIFF")))[0, 0]) == (0, 255, 255)
    assert tuple(np.asarray(load_rgb8(_png(Image.new("L", (1, 1), 77))))[0, 0]) == (77, 77, 77)
    assert tuple(np.asarray(load_rgb8(_png(Image.new("1", (1, 1), 1))))[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rgb = load_rgb8(_png(img, "JPEG", exif=exif.tobytes()))
    assert rgb.size == (2, 4)


def test_gif_first_frame_and_the_one_extension_list():
    frames = [Image.new("P", (3, 3), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_rgb8(buf.getvalue()))[0, 0]) == (255, 0, 0)
    assert ".gif" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_pixel_cap_is_checked_from_the_header(monkeypatch):
    data = _png(Image.new("L", (300, 200)))
    monkeypatch.setenv("XSR_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(ImageDecodeError, match=r"300x200.*XSR_MAX_IMAGE_PIXELS"):
        load_rgb8(data, what="image big.png")
    monkeypatch.setenv("XSR_MAX_IMAGE_PIXELS", "60000")
    assert load_rgb8(data).size == (300, 200)


def test_truncated_and_garbage_files_raise_decode_errors():
    good = _png(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot be decoded"):
        load_rgb8(good[: len(good) // 2], what="image half.jpg")
    with pytest.raises(ImageDecodeError, match="cannot be decoded"):
        load_rgb8(b"not an image")


def test_list_images_sorted_and_refuses_symlinks_leaving_the_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.png", "a.PNG", "c.gif", "notes.txt"):
        (d / name).write_bytes(b"x")
    assert [os.path.basename(p) for p in list_images(d)] == ["a.PNG", "b.png", "c.gif"]
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (d / "z.png").symlink_to(outside)
    with pytest.raises(PathConfinementError, match=r"z\.png.*outside"):
        list_images(d)
    (d / "z.png").unlink()
    (d / "z.png").symlink_to(d / "a.PNG")  # a symlink that stays inside is fine
    assert len(list_images(d)) == 4
