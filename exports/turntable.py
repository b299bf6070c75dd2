"""A turntable video of a rendered object: one full turn of cameras around +Y.

Frames are rendered many cameras per call (the renderer chunks the rays
itself, so one call over several cameras is one pass of its chunked path) and
encoded as they arrive: MP4 through ffmpeg, which encodes in its own process
while the next frames render, or, without ffmpeg, a GIF whose frames Pillow
quantises with its fast octree (about ten times faster than the median cut
that Pillow's GIF writer applies to RGB frames by itself, for ~1 dB less PSNR).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from recon.cameras import Cameras, orbit
from recon.errors import ReconError
from recon.fileio import atomic_path
from recon.progress import warn

PIXELS_PER_CALL = 1 << 20
"""Pixels rendered per ``render_fn`` call when no batch size is given: 16 frames of 256 px (four calls for the
default 60), so ffmpeg encodes one batch while the next renders and the outputs held stay small (~20 MB)."""


def ffmpeg_available() -> bool:
    """Whether imageio can write MP4 (imageio-ffmpeg installed and its ffmpeg binary found)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@torch.no_grad()
def render_turntable(
    render_fn: Callable[[Cameras], torch.Tensor],
    path: str | Path,
    frames: int = 60,
    elevation_deg: float = 15.0,
    radius: float = 3.8,
    fovy_deg: float = 20.0,
    resolution: int = 256,
    fps: int = 24,
    batch_size: int | None = None,
) -> Path:
    """Renders ``frames`` views on an orbit (recon.cameras.orbit, starting at the reference view) into a video.

    ``render_fn(cameras) -> (N, H, W, 3)`` in [0, 1]; it is called with
    ``batch_size`` cameras at a time (None: as many as hold
    :data:`PIXELS_PER_CALL` pixels, 16 frames at 256 px). Writes MP4
    (H.264) when ffmpeg is available, else a GIF next to ``path`` with a
    ``.gif`` suffix (with a warning). Returns the path written.
    """
    if frames < 1 or resolution < 1 or fps < 1:
        raise ReconError(f"turntable: frames, resolution and fps must be >= 1, got {frames}, {resolution}, {fps}")
    path = Path(path)
    cameras = orbit(frames, elevation_deg, radius, fovy_deg, resolution)
    batch = batch_size or max(1, min(frames, PIXELS_PER_CALL // (resolution * resolution)))
    images = (image for start in range(0, frames, batch) for image in _to_uint8(render_fn(cameras[start : start + batch])))
    if path.suffix.lower() == ".mp4" and ffmpeg_available():
        return _write_mp4(path, images, fps)
    if path.suffix.lower() != ".gif":
        warn(f"ffmpeg is not available; writing the turntable as GIF instead of {path.name}")
        path = path.with_suffix(".gif")
    return _write_gif(path, images, fps)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) colours in [0, 1] -> uint8 on the host (converted where they are: a quarter of the bytes to copy)."""
    rgb = torch.as_tensor(rgb).detach().float().clamp(0.0, 1.0)
    return (rgb * 255.0).round().to(torch.uint8).cpu().numpy()


def _write_mp4(path: Path, images: Iterator[np.ndarray], fps: int) -> Path:
    """H.264 MP4 through imageio's ffmpeg writer, fed frame by frame as they are rendered."""
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8, macro_block_size=2)
        try:
            for image in images:
                writer.append_data(image)
        finally:
            writer.close()
    return path


def _write_gif(path: Path, images: Iterator[np.ndarray], fps: int) -> Path:
    """Looping GIF; each frame gets its own 256-colour palette from Pillow's fast octree quantiser."""
    from PIL import Image

    frames = [Image.fromarray(image).quantize(256, method=Image.Quantize.FASTOCTREE) for image in images]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000.0 / fps, loop=0)
    return path
