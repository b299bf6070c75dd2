"""Image decoding, error messages, PNG writing and folder listing (recon/imageio.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from recon.errors import InputError
from recon.imageio import (
    apply_exif_orientation,
    decode_image,
    list_images,
    save_rgba_png,
)


def _pattern(height: int = 48, width: int = 64, channels: int = 3) -> np.ndarray:
    """A deterministic uint8 image with distinct values per pixel and channel."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def test_png_rgba_exact(tmp_path):
    pixels = _pattern(channels=4)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (48, 64, 4)
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


def test_jpeg_rgb_close(tmp_path):
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :32] = (200, 30, 60)
    pixels[:, 32:] = (20, 180, 240)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=98)
    out = decode_image(tmp_path / "a.jpg")
    assert out.shape == (48, 64, 3)
    # Away from the colour edge JPEG is nearly lossless at quality 98.
    np.testing.assert_allclose(out[:, :24], pixels[:, :24] / 255.0, atol=4 / 255)
    np.testing.assert_allclose(out[:, 40:], pixels[:, 40:] / 255.0, atol=4 / 255)


def test_webp_lossless_rgba(tmp_path):
    pixels = _pattern(channels=4)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.webp", lossless=True, exact=True)
    out = decode_image(tmp_path / "a.webp")
    assert out.shape == (48, 64, 4)
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


def test_greyscale_and_grey_alpha(tmp_path):
    grey = _pattern(channels=1)[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    out = decode_image(tmp_path / "l.png")
    assert out.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], grey / 255.0, atol=1e-6)
    la = _pattern(channels=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = decode_image(tmp_path / "la.png")
    assert out.shape == (48, 64, 4)
    np.testing.assert_allclose(out[..., 0], la[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 3], la[..., 1] / 255.0, atol=1e-6)


def test_palette_with_transparency_becomes_rgba(tmp_path):
    index = np.zeros((40, 40), np.uint8)
    index[10:30, 10:30] = 1
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=0)
    out = decode_image(tmp_path / "p.png")
    assert out.shape == (40, 40, 4)
    assert out[20, 20].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out[0, 0, 3] == 0.0
    # Without transparency the palette image is plain RGB.
    image.save(tmp_path / "q.png")
    assert decode_image(tmp_path / "q.png").shape == (40, 40, 3)


def test_16bit_grey_png(tmp_path):
    grey = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = decode_image(tmp_path / "g16.png")
    assert out.shape == (48, 64, 3)
    np.testing.assert_allclose(out[..., 1], grey / 65535.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_keeps_precision(tmp_path, suffix):
    colour = np.zeros((40, 40, 4), np.uint16)
    colour[..., 0], colour[..., 1], colour[..., 2], colour[..., 3] = 1000, 40000, 65535, 30000
    cv2.imwrite(str(tmp_path / f"c16{suffix}"), colour[..., [2, 1, 0, 3]])  # OpenCV writes BGRA
    out = decode_image(tmp_path / f"c16{suffix}")
    assert out.shape == (40, 40, 4)
    # Full 16-bit precision: 1000/65535 is not a multiple of 1/255.
    np.testing.assert_allclose(out[0, 0], np.array([1000, 40000, 65535, 30000]) / 65535.0, atol=1e-6)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=98)
    out = decode_image(tmp_path / "c.jpg")
    assert out.shape == (40, 40, 3)
    np.testing.assert_allclose(out[20, 20], [1.0, 0.0, 0.0], atol=6 / 255)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:5, :5] = 255  # white square in the stored top-left corner
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "o.jpg", exif=exif, quality=98)
    out = decode_image(tmp_path / "o.jpg")
    # Orientation 6 means "rotate 90 degrees clockwise to display": stored top-left -> top-right.
    assert out.shape == (64, 40, 3)
    assert out[1:4, -4:-1].mean() > 0.9 and out[1:4, 1:4].mean() < 0.1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation):
    pixels = _pattern(height=5, width=7)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(apply_exif_orientation(pixels, orientation), expected)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match=r"nope\.png: no such file"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a folder"):
        decode_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, this is text\n")
    with pytest.raises(InputError, match=r"notes\.png: not an image"):
        decode_image(path)


def test_truncated_png(tmp_path):
    Image.fromarray(_pattern(height=64, width=64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png: truncated or corrupt"):
        decode_image(tmp_path / "cut.png")


def test_too_small(tmp_path):
    Image.fromarray(_pattern(height=20, width=64)).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match=r"tiny\.png: image is too small \(64x20\)"):
        decode_image(tmp_path / "tiny.png")


def test_decompression_bomb_own_limit(tmp_path):
    Image.new("L", (1000, 1000)).save(tmp_path / "bomb.png")
    with pytest.raises(InputError, match=r"bomb\.png: image is too large \(1000x1000.*decompression bomb"):
        decode_image(tmp_path / "bomb.png", max_pixels=500_000)
    assert decode_image(tmp_path / "bomb.png", max_pixels=2_000_000).shape == (1000, 1000, 3)


@pytest.mark.parametrize("pil_limit", [300_000, 600_000])  # error (> 2x limit) and warning (> limit)
def test_decompression_bomb_pil_limit(tmp_path, monkeypatch, pil_limit):
    Image.new("L", (1000, 1000)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(InputError, match=r"bomb\.png: .*decompression bomb"):
        decode_image(tmp_path / "bomb.png", max_pixels=10**9)


def test_save_rgba_png_round_trip(tmp_path):
    rgba = _pattern(channels=4) / 255.0
    save_rgba_png(tmp_path / "out" / "x.png", rgba)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]  # no temporary file left
    np.testing.assert_allclose(decode_image(tmp_path / "out" / "x.png"), rgba, atol=1e-6)
    with pytest.raises(ValueError):
        save_rgba_png(tmp_path / "bad.png", rgba[..., :3])


def test_list_images_sorts_and_filters(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ["img10.PNG", "img2.jpg", "img1.webp", ".hidden.png", "notes.txt", "b.TIFF", "a.jpeg"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub.png").mkdir()  # a folder with an image-like name is not an image
    extra = tmp_path / "zz.bmp"
    extra.write_bytes(b"x")
    found = list_images([extra, folder, folder / "img2.jpg"])
    assert [p.name for p in found] == ["a.jpeg", "b.TIFF", "img1.webp", "img2.jpg", "img10.PNG", "zz.bmp"]
    with pytest.raises(InputError, match=r"missing: no such file or folder"):
        list_images([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: folder holds no images"):
        list_images([empty])
