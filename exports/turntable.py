"""A turntable video of a rendered object: one full turn of cameras around +Y."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recon.cameras import Cameras, orbit
from recon.fileio import atomic_path
from recon.progress import warn


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
    batch_size: int = 4,
) -> Path:
    """Renders ``frames`` views on an orbit (recon.cameras.orbit, starting at the reference view) into a video.

    ``render_fn(cameras) -> (N, H, W, 3)`` in [0, 1]; it is called with
    ``batch_size`` cameras at a time. Writes MP4 (H.264) when ffmpeg is
    available, else a GIF next to ``path`` with a ``.gif`` suffix (with a
    warning). Returns the path written.
    """
    path = Path(path)
    cameras = orbit(frames, elevation_deg, radius, fovy_deg, resolution)
    images = []
    for start in range(0, frames, batch_size):
        rgb = render_fn(cameras[start : start + batch_size])
        rgb = torch.as_tensor(rgb).detach().float().clamp(0.0, 1.0).cpu().numpy()
        images.extend(np.round(rgb * 255.0).astype(np.uint8))
    import imageio.v2 as imageio

    if path.suffix.lower() == ".mp4" and ffmpeg_available():
        with atomic_path(path) as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8, macro_block_size=2)
            try:
                for image in images:
                    writer.append_data(image)
            finally:
                writer.close()
        return path
    if path.suffix.lower() != ".gif":
        warn(f"ffmpeg is not available; writing the turntable as GIF instead of {path.name}")
        path = path.with_suffix(".gif")
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, images, format="GIF", duration=1000.0 / fps, loop=0)
    return path
