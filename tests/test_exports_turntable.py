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


def counting(calls):
    """fake_render that appends the number of cameras of each call to ``calls``."""

    def render(cameras):
        calls.append(len(cameras))
        return fake_render(cameras)

    return render


def test_default_settings_render_in_batches_and_keep_frame_count_and_size(tmp_path, monkeypatch):
    """60 frames at 256 px (export.turntable_* defaults): render calls of 16 cameras, 60 frames of 256 x 256."""
    monkeypatch.setattr(turntable, "ffmpeg_available", lambda: False)
    calls = []
    path = render_turntable(counting(calls), tmp_path / "turn.mp4")
    assert calls == [16, 16, 16, 12]
    frames = np.stack([frame[..., :3] for frame in iio.imiter(path)])
    assert frames.shape == (60, 256, 256, 3)
    brightness = frames.reshape(60, -1).mean(axis=1) / 255.0
    assert brightness[15] > brightness[0] > brightness[45]  # the orbit's order is kept
    # GIF frames last 1/fps s (Pillow stores centiseconds: 1000/24 ms -> 40 ms)
    assert iio.immeta(path, index=1)["duration"] == 40


def test_explicit_batch_size_and_large_frames_split_the_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(turntable, "ffmpeg_available", lambda: False)
    calls = []
    render_turntable(counting(calls), tmp_path / "a.gif", frames=8, resolution=16, batch_size=3)
    assert calls == [3, 3, 2]
    calls.clear()
    render_turntable(counting(calls), tmp_path / "b.gif", frames=3, resolution=1024)  # PIXELS_PER_CALL: 1 frame
    assert calls == [1, 1, 1]


def test_gif_colours_match_the_rendered_frames(tmp_path, monkeypatch):
    """Each GIF frame's own palette keeps a smooth gradient within a few levels of the rendered values.

    (Pillow merges identical consecutive frames into one longer frame, so the frames here all differ.)
    """
    monkeypatch.setattr(turntable, "ffmpeg_available", lambda: False)
    torch = pytest.importorskip("torch")

    def gradient_render(cameras):
        n, h, w = len(cameras), cameras.height, cameras.width
        ramp = torch.linspace(0.0, 1.0, w)[None, None, :, None].expand(n, h, w, 1)
        unit = cameras.centers / cameras.centers.norm(dim=-1, keepdim=True)
        shade = (0.5 + 0.25 * unit[:, 0] + 0.1 * unit[:, 2])[:, None, None, None]  # differs from frame to frame
        return torch.cat([ramp, ramp.flip(2), shade.expand(n, h, w, 1)], dim=-1)

    path = render_turntable(gradient_render, tmp_path / "turn.gif", frames=6, resolution=64)
    expected = np.round(gradient_render(turntable.orbit(6, 15.0, 3.8, 20.0, 64)).numpy() * 255.0)
    got = np.stack([frame[..., :3] for frame in iio.imiter(path)]).astype(float)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 4.0 and np.abs(got - expected).max() <= 16


def test_bad_settings_are_one_line_errors(tmp_path):
    from recon.errors import ReconError

    with pytest.raises(ReconError, match="frames, resolution and fps must be >= 1"):
        render_turntable(fake_render, tmp_path / "turn.mp4", frames=0)
    assert not list(tmp_path.iterdir())
