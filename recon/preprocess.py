"""From the user's photo to the reference view the model sees.

Decode -> foreground alpha (the image's own alpha channel, else background
removal, else the whole frame with ``remove_bg=False``) -> recentre so the
foreground's bounding box is centred and its longer side is
``foreground_ratio * size`` -> square RGBA of ``size`` pixels, resized with
premultiplied alpha so that edges keep their colour.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.errors import InputError, ReconError
from recon.imageio import composite, decode_image, resize_premultiplied, save_rgba_png, unpremultiply

DEFAULT_FOREGROUND_RATIO = 0.85
"""Object size after recentring (longer side of its bounding box / image side) for guidance weights that record no
framing of their own, such as real Zero-1-to-3 checkpoints (guidance.checkpoints.recorded_foreground_ratio)."""

MIN_FOREGROUND = 0.001
"""Smallest accepted foreground, as a fraction of the image's pixels."""

MAX_DETECTED_FOREGROUND = 0.98
"""Largest foreground fraction that background removal may return before the input is refused."""


@dataclass
class ReferenceView:
    """The input image as the model sees it, and the camera it was taken from (recon/cameras.py frame)."""

    rgba: Tensor
    """(4, S, S) float32 in [0, 1], straight (not premultiplied) alpha."""
    source: Path
    """The file it came from."""
    elevation_deg: float = 0.0
    """Elevation of the reference camera, degrees."""
    azimuth_deg: float = 0.0
    """Azimuth of the reference camera, degrees (0 = the +Z front)."""
    radius: float = 3.8
    """Distance of the reference camera from the origin, scene units."""
    fovy_deg: float = 20.0
    """Vertical field of view of the reference camera, degrees."""
    background_method: str = "alpha"
    """Where the alpha came from: "alpha" (the file's own), "rembg", "grabcut" or "none" (whole frame)."""

    @property
    def size(self) -> int:
        """Side S of the square image, pixels."""
        return int(self.rgba.shape[-1])

    @property
    def mask(self) -> Tensor:
        """(1, S, S) alpha in [0, 1]."""
        return self.rgba[3:4]

    def rgb_over(self, color: tuple[float, float, float] | float = (1.0, 1.0, 1.0)) -> Tensor:
        """(3, S, S) colour composited over a solid background ``color`` (RGB in [0, 1])."""
        return composite(self.rgba, color)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically writes the RGBA image as an 8-bit PNG (the run folder's input_rgba.png)."""
        save_rgba_png(path, self.rgba.detach().cpu().permute(1, 2, 0).numpy())


def load_reference(
    path: str | os.PathLike[str],
    foreground_ratio: float = DEFAULT_FOREGROUND_RATIO,
    remove_bg: bool = True,
    size: int = 256,
    min_foreground: float = MIN_FOREGROUND,
) -> ReferenceView:
    """Reads the image at ``path`` and returns its recentred square :class:`ReferenceView`.

    The foreground is the image's alpha channel when any pixel is not opaque;
    otherwise :func:`recon.background.remove_background` when ``remove_bg``,
    else the whole frame. Raises ``InputError`` naming the file when the
    foreground is empty (under ``min_foreground`` of the pixels) or when
    background removal finds no background to remove.
    """
    if not 0.0 < foreground_ratio <= 1.0:
        raise ReconError(f"--foreground-ratio must be in (0, 1], got {foreground_ratio}")
    if size < 8:
        raise ReconError(f"reference image size must be at least 8 pixels, got {size}")
    path = Path(path)
    image = decode_image(path)
    rgb = image[..., :3]
    if image.shape[2] == 4 and float(image[..., 3].min()) < 1.0 - 0.5 / 255.0:
        alpha, method = image[..., 3], "alpha"
    elif remove_bg:
        from recon.background import remove_background

        alpha, method = remove_background(rgb)
    else:
        alpha, method = np.ones(rgb.shape[:2], np.float32), "none"

    solid = alpha > 0.5
    fraction = float(solid.mean())
    if fraction < min_foreground:
        if method == "alpha":  # --no-remove-bg would not help: the file's own alpha is used either way
            raise InputError(
                f"{path}: empty foreground ({fraction:.2%} of the pixels): its alpha channel is (almost) fully "
                "transparent; give an image whose object is opaque (alpha above 50%)"
            )
        raise InputError(
            f"{path}: empty foreground ({fraction:.2%} of the pixels): background removal ({method}) found no object; "
            "give an RGBA image with the object opaque, or use --no-remove-bg to use the whole frame"
        )
    if method == "alpha" and fraction > MAX_DETECTED_FOREGROUND:
        raise InputError(
            f"{path}: its alpha channel marks {fraction:.0%} of the frame as the object (no transparent background "
            "to separate it from); give an RGBA image with a transparent background, or an opaque RGB photo "
            "for background removal"
        )
    if method in ("rembg", "grabcut") and fraction > MAX_DETECTED_FOREGROUND:
        raise InputError(
            f"{path}: background removal ({method}) found nothing to separate from the background "
            f"(foreground fills {fraction:.0%} of the frame); give an RGBA image with a transparent "
            "background, or use --no-remove-bg to use the whole frame"
        )
    rgba = recentre(rgb, alpha, foreground_ratio, size)
    return ReferenceView(rgba=rgba, source=path, background_method=method)


def foreground_bbox(alpha: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel bounds, bottom/right exclusive, of ``alpha > threshold``."""
    rows = np.flatnonzero((alpha > threshold).any(axis=1))
    cols = np.flatnonzero((alpha > threshold).any(axis=0))
    if rows.size == 0:
        raise ValueError("foreground_bbox: the mask is empty")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def recentre_window(alpha: np.ndarray, foreground_ratio: float) -> tuple[int, int, int]:
    """The square window :func:`recentre` crops from ``alpha`` (H, W): (side, top, left) in source pixels.

    An integer side x side window centred on the bounding box of ``alpha > 0.5``
    (the centre is a pixel edge or middle), sized so the box's longer side is
    ``foreground_ratio`` of it; it may reach outside the image.
    """
    top, left, bottom, right = foreground_bbox(alpha)
    side = max(1, round(max(bottom - top, right - left) / foreground_ratio))
    return side, math.floor((top + bottom - side) / 2), math.floor((left + right - side) / 2)


def recentre(rgb: np.ndarray, alpha: np.ndarray, foreground_ratio: float, size: int) -> Tensor:
    """Square (4, size, size) straight-alpha tensor with the foreground centred and scaled.

    ``rgb`` (H, W, 3) and ``alpha`` (H, W) in [0, 1]. The bounding box of
    ``alpha > 0.5`` is centred and its longer side becomes
    ``foreground_ratio * size`` pixels; outside the source is transparent.
    Resampling (antialiased bilinear) runs on premultiplied colour, so
    transparent pixels do not darken the edges.
    """
    side, crop_top, crop_left = recentre_window(alpha, foreground_ratio)
    src_top, src_left = max(crop_top, 0), max(crop_left, 0)
    src_bottom = min(crop_top + side, alpha.shape[0])
    src_right = min(crop_left + side, alpha.shape[1])
    window_alpha = alpha[src_top:src_bottom, src_left:src_right, None]
    window = np.concatenate([rgb[src_top:src_bottom, src_left:src_right] * window_alpha, window_alpha], axis=-1)
    crop = np.zeros((side, side, 4), np.float32)
    crop[src_top - crop_top : src_bottom - crop_top, src_left - crop_left : src_right - crop_left] = window
    tensor = torch.from_numpy(crop).permute(2, 0, 1)[None]
    if side != size:
        tensor = resize_premultiplied(tensor, size)
    return unpremultiply(tensor.clamp(0.0, 1.0))[0].contiguous()
