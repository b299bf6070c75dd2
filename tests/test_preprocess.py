"""Foreground extraction, recentring and the ReferenceView (recon/preprocess.py, recon/background.py)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_loading import load_script

from recon import background
from recon.errors import InputError, ReconError
from recon.imageio import decode_image
from recon.preprocess import ReferenceView, foreground_bbox, load_reference


@pytest.fixture(autouse=True)
def _no_rembg(monkeypatch):
    """Tests exercise the built-in GrabCut path whatever is installed on the machine."""
    monkeypatch.setattr(background, "rembg_model_path", lambda model=background.REMBG_MODEL: None)


def _save_rgba(path, rgb, alpha):
    pixels = np.concatenate([rgb, alpha[..., None]], axis=-1)
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), "RGBA").save(path)
    return path


def _disk(height, width, cy, cx, r):
    yy, xx = np.mgrid[:height, :width]
    return ((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) < r**2


def _solid_bbox(view: ReferenceView):
    return foreground_bbox(view.mask[0].numpy(), 0.5)


@pytest.mark.parametrize("ratio", [0.85, 0.5])
def test_recentre_centres_and_scales_the_bbox(tmp_path, ratio):
    # An off-centre 120 x 60 (h x w) rectangle in a 300 x 200 image.
    height, width = 300, 200
    alpha = np.zeros((height, width), np.float32)
    alpha[20:140, 110:170] = 1.0
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[..., 0] = 0.7
    path = _save_rgba(tmp_path / "rect.png", rgb, alpha)
    size = 128
    view = load_reference(path, foreground_ratio=ratio, size=size)
    assert view.rgba.shape == (4, size, size) and view.rgba.dtype == torch.float32
    assert view.background_method == "alpha" and view.source == path
    top, left, bottom, right = _solid_bbox(view)
    assert abs((top + bottom) / 2 - size / 2) <= 1.0
    assert abs((left + right) / 2 - size / 2) <= 1.0
    assert abs((bottom - top) - ratio * size) <= 2.0
    assert abs((right - left) - ratio * size / 2) <= 2.0  # aspect ratio kept
    inside = view.mask[0] > 0.5
    torch.testing.assert_close(view.rgba[0][inside], torch.full_like(view.rgba[0][inside], 0.7), atol=2e-3, rtol=0)


def test_object_larger_than_frame_is_padded_transparent(tmp_path):
    # A wide object filling the whole width: the square canvas needs padding above and below.
    alpha = np.zeros((64, 256), np.float32)
    alpha[8:56, :] = 1.0
    path = _save_rgba(tmp_path / "wide.png", np.ones((64, 256, 3), np.float32), alpha)
    view = load_reference(path, foreground_ratio=0.85, size=64)
    _, left, _, right = _solid_bbox(view)
    assert abs((right - left) - 0.85 * 64) <= 2.0
    assert view.mask[0, :5].max() == 0.0 and view.mask[0, -5:].max() == 0.0


def test_premultiplied_resize_has_no_dark_fringe(tmp_path):
    size = 400
    alpha = _disk(size, size, 200, 200, 150).astype(np.float32)
    rgb = np.zeros((size, size, 3), np.float32)
    rgb[alpha > 0] = 1.0  # white object; transparent pixels are black, as many tools write them
    path = _save_rgba(tmp_path / "white.png", rgb, alpha)
    view = load_reference(path, size=37)  # odd, non-integer downscale: many partial-alpha edge pixels
    a = view.mask[0]
    edge = (a > 0.02) & (a < 0.98)
    assert edge.sum() > 20
    assert view.rgba[:3][:, a > 0.02].min() > 0.99
    # Composited over black, the edge is exactly alpha (no darkening beyond coverage).
    torch.testing.assert_close(view.rgb_over((0.0, 0.0, 0.0))[0], a * view.rgba[0], atol=1e-6, rtol=0)


def test_rgb_over_mask_and_save(tmp_path):
    rgba = torch.zeros(4, 32, 32)
    rgba[0] = 0.5
    rgba[3, 8:24, 8:24] = 1.0
    rgba[3, 0, 0] = 0.25
    view = ReferenceView(rgba=rgba, source=tmp_path / "x.png")
    assert view.size == 32 and view.mask.shape == (1, 32, 32)
    over = view.rgb_over((0.0, 1.0, 0.0))
    assert over.shape == (3, 32, 32)
    torch.testing.assert_close(over[:, 10, 10], torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(over[:, 30, 30], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(over[:, 0, 0], torch.tensor([0.125, 0.75, 0.0]))
    torch.testing.assert_close(view.rgb_over(1.0)[:, 30, 30], torch.ones(3))
    view.save(tmp_path / "run" / "input_rgba.png")
    saved = decode_image(tmp_path / "run" / "input_rgba.png")
    np.testing.assert_allclose(saved, rgba.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)


def _photo(shape: str, seed: int = 0):
    """An RGB 'photo': a blue object on a beige, slightly noisy plain background, and its true mask."""
    height, width = 240, 320
    if shape == "disk":
        mask = _disk(height, width, 130, 170, 70)
    else:
        mask = np.zeros((height, width), bool)
        mask[60:190, 90:210] = True
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.float32)
    rgb[:] = (0.92, 0.88, 0.80)
    shading = np.broadcast_to(np.linspace(1.0, 0.6, height, dtype=np.float32)[:, None], mask.shape)
    rgb[mask] = np.array([0.15, 0.35, 0.85], np.float32) * shading[mask][:, None]
    rgb += rng.normal(0.0, 0.015, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0.0, 1.0), mask


@pytest.mark.parametrize("shape", ["disk", "square"])
def test_grabcut_recovers_object(shape):
    rgb, truth = _photo(shape)
    result = background.remove_background(rgb)
    assert result.method == "grabcut"
    found = result.alpha > 0.5
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.9, iou


def test_rgb_photo_goes_through_background_removal(tmp_path):
    rgb, _ = _photo("disk")
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(tmp_path / "photo.jpg", quality=95)
    view = load_reference(tmp_path / "photo.jpg", size=64)
    assert view.background_method == "grabcut"
    top, left, bottom, right = _solid_bbox(view)
    # A disk: its bbox is square, so both sides are ~0.85 * 64.
    assert abs((bottom - top) - 0.85 * 64) <= 2.0 and abs((right - left) - 0.85 * 64) <= 2.0
    assert view.mask[0, 32, 32] == 1.0 and view.mask[0, 0, 0] == 0.0
    # Same input, same output.
    torch.testing.assert_close(load_reference(tmp_path / "photo.jpg", size=64).rgba, view.rgba, atol=0, rtol=0)


def test_clean_mask_keeps_largest_component_and_fills_holes():
    alpha = np.zeros((64, 64), np.float32)
    alpha[10:50, 10:50] = 1.0
    alpha[25:30, 25:30] = 0.0  # hole
    alpha[55:60, 55:60] = 1.0  # speck
    cleaned = background.clean_mask(alpha, feather_px=0.8)
    assert cleaned.dtype == np.float32
    assert cleaned[27, 27] == pytest.approx(1.0, abs=1e-3)
    assert cleaned[57, 57] < 1e-3
    assert 0.2 < cleaned[10, 30] < 0.9  # feathered edge
    assert background.clean_mask(np.zeros((16, 16), np.float32)).max() == 0.0


def test_empty_alpha_is_rejected(tmp_path):
    path = _save_rgba(tmp_path / "ghost.png", np.ones((64, 64, 3), np.float32), np.zeros((64, 64), np.float32))
    with pytest.raises(InputError, match=r"ghost\.png: empty foreground.*fully transparent"):
        load_reference(path)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_uniform_image_has_nothing_to_separate(tmp_path, with_alpha):
    mode = "RGBA" if with_alpha else "RGB"  # an all-opaque alpha channel counts as no alpha
    Image.new(mode, (96, 64), (90, 120, 200, 255)[: len(mode)]).save(tmp_path / "flat.png")
    with pytest.raises(InputError, match=r"flat\.png: background removal.*nothing to separate.*--no-remove-bg"):
        load_reference(tmp_path / "flat.png")
    # With --no-remove-bg the whole frame is the object.
    view = load_reference(tmp_path / "flat.png", remove_bg=False, size=64)
    assert view.background_method == "none"
    top, left, bottom, right = _solid_bbox(view)
    assert abs((right - left) - 0.85 * 64) <= 2.0 and abs((bottom - top) - 0.85 * 64 * 64 / 96) <= 2.0
    torch.testing.assert_close(view.rgba[:3, 32, 32], torch.tensor([90, 120, 200]) / 255.0, atol=1e-5, rtol=0)


def test_tiny_and_non_image_inputs_name_the_file(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match=r"tiny\.png: image is too small"):
        load_reference(tmp_path / "tiny.png")
    (tmp_path / "readme.jpg").write_text("not a picture")
    with pytest.raises(InputError, match=r"readme\.jpg: not an image"):
        load_reference(tmp_path / "readme.jpg")


def test_bad_arguments(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(ReconError, match="foreground-ratio"):
        load_reference(tmp_path / "a.png", foreground_ratio=1.5)


def test_rembg_model_lookup(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real lookup, not the autouse stub
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "models"))
    monkeypatch.setitem(sys.modules, "rembg", types.ModuleType("rembg"))
    assert background.rembg_model_path() is None  # importable but no model on disk: no download, GrabCut
    (tmp_path / "home" / ".u2net").mkdir(parents=True)
    (tmp_path / "home" / ".u2net" / "u2net.onnx").write_bytes(b"onnx")
    assert background.rembg_model_path() == tmp_path / "home" / ".u2net" / "u2net.onnx"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "u2net.onnx").write_bytes(b"onnx")
    assert background.rembg_model_path() == tmp_path / "models" / "u2net.onnx"
    monkeypatch.setitem(sys.modules, "rembg", None)  # not installed
    assert background.rembg_model_path() is None


def test_shipped_example_is_a_usable_rgba_reference(tmp_path):
    root = Path(__file__).resolve().parents[1] / "examples"
    image = decode_image(root / "robot.png")
    assert image.shape == (512, 512, 4)
    assert image[..., 3].min() == 0.0 and image[..., 3].max() == 1.0
    view = load_reference(root / "robot.png", size=64)
    assert view.background_method == "alpha"
    # The script that made it is deterministic (checked at a small size to stay fast).
    module = load_script("examples/make_example.py")
    first = module.make_example(tmp_path / "a.png", size=48, supersample=1)
    second = module.make_example(tmp_path / "b.png", size=48, supersample=1)
    assert first.read_bytes() == second.read_bytes()
    small = decode_image(first)
    assert small.shape == (48, 48, 4) and 0.05 < (small[..., 3] > 0.5).mean() < 0.8


def test_rembg_used_when_model_is_local_and_falls_back_on_failure(tmp_path, monkeypatch):
    rgb, truth = _photo("square")
    model = tmp_path / "u2net.onnx"
    model.write_bytes(b"onnx")
    calls = []

    def new_session(name):
        calls.append((name, os.environ.get("U2NET_HOME"), os.environ.get("MODEL_CHECKSUM_DISABLED")))
        return "session"

    def remove(image, session, only_mask):
        assert session == "session" and only_mask and image.size == (320, 240)
        return Image.fromarray((truth * 255).astype(np.uint8), "L")

    fake = types.ModuleType("rembg")
    fake.new_session, fake.remove = new_session, remove
    monkeypatch.setitem(sys.modules, "rembg", fake)
    monkeypatch.setattr(background, "rembg_model_path", lambda model_name=background.REMBG_MODEL: model)
    monkeypatch.delenv("U2NET_HOME", raising=False)
    result = background.remove_background(rgb)
    assert result.method == "rembg"
    assert ((result.alpha > 0.5) == truth).mean() > 0.999
    # rembg looked only in the folder holding the model, with its re-download check off; env restored.
    assert calls == [("u2net", str(tmp_path), "1")]
    assert "U2NET_HOME" not in os.environ
    assert background.remove_background(rgb, use_rembg=False).method == "grabcut"

    def broken(image, session, only_mask):
        raise RuntimeError("onnx model is corrupt")

    fake.remove = broken
    assert background.remove_background(rgb).method == "grabcut"
