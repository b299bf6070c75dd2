"""Turntable video: MP4 through ffmpeg, GIF fallback, frames follow the orbit."""

import imageio.v3 as iio
import numpy as np
import pytest

from recon.exports import turntable
from recon.exports.turntable import render_turntable


def fake_render(cameras):
    """Frame brightness encodes the camera's x position, so the frame order is checkable."""
    x = cameras.centers[:, 0] / cameras.centers.norm(dim=-1)
    value = (0.5 + 0.5 * x)[:, None, None, None]
    return value.expand(len(cameras), cameras.height, cameras.width, 3)


def test_mp4_written_and_readable(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    path = render_turntable(fake_render, tmp_path / "turn.mp4", frames=8, resolution=32, fps=8, batch_size=3)
    assert path == tmp_path / "turn.mp4"
    frames = np.stack(list(iio.imiter(path)))
    assert frames.shape[0] == 8 and frames.shape[1:3] == (32, 32)
    brightness = frames.reshape(8, -1).mean(axis=1) / 255.0
    # Azimuth 0 (x = 0), then 45 degrees towards +X: brighter; azimuth 270 (-X) darkest.
    assert brightness[0] == pytest.approx(0.5, abs=0.05)
    assert brightness[2] > brightness[0] > brightness[6]
    assert not list(tmp_path.glob(".tmp-*"))


def test_gif_fallback_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(turntable, "ffmpeg_available", lambda: False)
    path = render_turntable(fake_render, tmp_path / "turn.mp4", frames=4, resolution=16)
    assert path == tmp_path / "turn.gif"
    frames = np.stack(list(iio.imiter(path)))
    assert frames.shape[0] == 4 and frames.shape[1:3] == (16, 16)
    assert not (tmp_path / "turn.mp4").exists()
