"""Foreground masks for photos without an alpha channel.

rembg is used when it is installed *and* its model file is already on disk
(it is never allowed to download); otherwise OpenCV GrabCut, seeded with the
image border as background, which needs no model weights. Both masks are
cleaned the same way: largest connected component, holes filled, edge
feathered by about a pixel.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from recon.progress import warn

REMBG_MODEL = "u2net"
"""rembg session (and model file stem) used when rembg is available."""


class ForegroundMask(NamedTuple):
    """A soft foreground mask and the method that produced it."""

    alpha: np.ndarray
    """(H, W) float32 in [0, 1]."""
    method: str
    """"rembg" or "grabcut"."""


def rembg_model_path(model: str = REMBG_MODEL) -> Path | None:
    """The local rembg model file for ``model`` if rembg is importable and the file exists, else None.

    Looks where rembg looks: ``$U2NET_HOME``, ``$XDG_DATA_HOME/.u2net``, ``~/.u2net``.
    """
    try:
        import rembg  # noqa: F401
    except ImportError:
        return None
    homes = []
    if os.getenv("U2NET_HOME"):
        homes.append(os.environ["U2NET_HOME"])
    if os.getenv("XDG_DATA_HOME"):
        homes.append(os.path.join(os.environ["XDG_DATA_HOME"], ".u2net"))
    homes.append(os.path.join("~", ".u2net"))
    for home in homes:
        candidate = Path(home).expanduser() / f"{model}.onnx"
        if candidate.is_file():
            return candidate
    return None


def remove_background(rgb: np.ndarray, use_rembg: bool = True) -> ForegroundMask:
    """Estimates the foreground of an (H, W, 3) float RGB image in [0, 1].

    Returns a cleaned (H, W) alpha in [0, 1] and the method used ("rembg" or
    "grabcut"). A (near-)uniform image has nothing to separate: the whole
    frame comes back as foreground, which the caller reports.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"remove_background expects (H, W, 3), got {rgb.shape}")
    if float(rgb.reshape(-1, 3).std(axis=0).max()) < 2.0 / 255.0:
        return ForegroundMask(np.ones(rgb.shape[:2], np.float32), "grabcut")
    model_path = rembg_model_path() if use_rembg else None
    if model_path is not None:
        alpha = _rembg_alpha(rgb, model_path)
        if alpha is not None:
            return ForegroundMask(clean_mask(alpha), "rembg")
    return ForegroundMask(clean_mask(grabcut_alpha(rgb)), "grabcut")


def _rembg_alpha(rgb: np.ndarray, model_path: Path) -> np.ndarray | None:
    """rembg's mask from the model file at ``model_path``; None (GrabCut is used) if rembg fails."""
    from PIL import Image
    from rembg import new_session, remove

    pixels = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8), mode="RGB")
    # The file is already there: with checksums off, rembg's loader never re-fetches it.
    with _environ(U2NET_HOME=str(model_path.parent), MODEL_CHECKSUM_DISABLED="1"):
        try:
            session = new_session(model_path.stem)
            mask = remove(pixels, session=session, only_mask=True)
        except (OSError, RuntimeError, ValueError) as exc:
            warn(f"rembg failed ({exc}); using GrabCut instead")
            return None
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


@contextlib.contextmanager
def _environ(**values: str):
    """Temporarily sets environment variables."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def grabcut_alpha(rgb: np.ndarray, margin: float = 0.03, iterations: int = 5, max_side: int = 512) -> np.ndarray:
    """Binary GrabCut foreground (H, W) float32 of an RGB image, no model weights needed.

    A band ``margin`` (fraction of each side, at least 2 px) along the border
    is fixed as background and everything inside is "probably foreground";
    the colour models are then refined for ``iterations`` rounds. Runs at
    most ``max_side`` pixels per side and upsamples the mask, for speed.
    """
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small_size = (max(8, round(width * scale)), max(8, round(height * scale)))
    pixels = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    small = cv2.resize(pixels, small_size, interpolation=cv2.INTER_AREA) if scale < 1.0 else pixels
    small = np.ascontiguousarray(small[..., ::-1])  # OpenCV colour order (BGR)
    h, w = small.shape[:2]
    band_y, band_x = max(2, round(margin * h)), max(2, round(margin * w))
    seeds = np.full((h, w), cv2.GC_BGD, np.uint8)
    seeds[band_y : h - band_y, band_x : w - band_x] = cv2.GC_PR_FGD
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation uses k-means: keep it deterministic
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(small, seeds, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
    mask = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.float32)
    if scale < 1.0:
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    return (mask > 0.5).astype(np.float32)


def clean_mask(alpha: np.ndarray, feather_px: float = 0.8) -> np.ndarray:
    """Keeps the largest connected foreground component, fills its holes and feathers the edge.

    ``alpha`` is (H, W) in [0, 1]; soft values of the input are kept inside
    the cleaned region (rembg's edges), the rest is set to 0. Returns float32.
    """
    import cv2
    from scipy import ndimage

    binary = (alpha > 0.5).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return np.zeros_like(alpha, dtype=np.float32)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = ndimage.binary_fill_holes(labels == largest)
    # Soft edges: dilate by a pixel so rembg's partial alpha survives, then blur lightly.
    support = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    cleaned = np.where(region, 1.0, np.where(support, alpha, 0.0)).astype(np.float32)
    if feather_px > 0:
        cleaned = cv2.GaussianBlur(cleaned, (0, 0), sigmaX=feather_px)
    return np.clip(cleaned, 0.0, 1.0).astype(np.float32)
