"""Decoding and writing the user's images.

:func:`decode_image` turns any PNG / JPEG / WebP / BMP / TIFF into a float32
array in [0, 1], channels-last, RGB or RGBA, upright (EXIF orientation
applied). Everything that can go wrong with a file becomes an
:class:`~recon.errors.InputError` whose one-line message names the file.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from recon.errors import InputError
from recon.fileio import atomic_path

MAX_PIXELS = 50_000_000
"""Largest image accepted (width x height); larger ones are refused as possible decompression bombs."""

MIN_SIDE = 32
"""Smallest accepted width or height, in pixels."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""File name endings that :func:`list_images` picks up from a folder (case-insensitive)."""

_EXIF_ORIENTATION = 0x0112
# Errors PIL's decoders raise on damaged data (truncated streams, bad chunks, bad headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)


def decode_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Reads an image file as float32 (H, W, 3) RGB or (H, W, 4) straight-alpha RGBA in [0, 1].

    Greyscale becomes RGB (LA becomes RGBA), palette images become RGBA when
    the palette has transparency, CMYK/YCbCr/LAB become RGB, 16-bit images
    are scaled by 1/65535, and the EXIF orientation is applied. Animated
    files give their first frame. Raises ``InputError`` naming the file for a
    missing file, a folder, something that is not an image, a truncated or
    corrupt file, more than ``max_pixels`` pixels, or a side under 32 pixels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(path, image.size, max_pixels)
                raw_mode = _raw_mode(image)  # read before load(), which clears the tile list
                image.load()  # Image.open only reads the header: force the full decode now
                array = _to_float(path, image, raw_mode)
                orientation = _orientation(image)
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image (no PNG/JPEG/WebP/BMP/TIFF decoder recognises it)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image is too large to decode safely (possible decompression bomb)") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"{path}: truncated or corrupt image file ({exc})") from exc
    array = apply_exif_orientation(array, orientation)
    height, width = array.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(f"{path}: image is too small ({width}x{height}); at least {MIN_SIDE}x{MIN_SIDE} pixels needed")
    return np.ascontiguousarray(array, dtype=np.float32)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8); 1 when absent or when the EXIF block itself is damaged."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return 1


def _check_size(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    """Refuses a header that announces more than ``max_pixels`` pixels, before anything is decoded."""
    width, height = size
    if width * height > max_pixels:
        raise InputError(
            f"{path}: image is too large ({width}x{height} = {width * height / 1e6:.1f} MP, "
            f"limit {max_pixels / 1e6:.0f} MP; possible decompression bomb): downscale it first"
        )


def _raw_mode(image: Image.Image) -> str:
    """The decoder's raw pixel layout (e.g. ``RGB;16B``), or "" when PIL does not say."""
    if not image.tile:
        return ""
    args = image.tile[0].args
    if isinstance(args, str):
        return args
    return args[0] if args and isinstance(args[0], str) else ""


def _to_float(path: Path, image: Image.Image, raw_mode: str) -> np.ndarray:
    """Converts a decoded PIL image to float32 RGB/RGBA in [0, 1] (before orientation).

    ``raw_mode`` is the decoder's pixel layout, which tells 16-bit colour files apart.
    """
    mode = image.mode
    if mode in ("RGB", "RGBA") and ";16" in raw_mode:
        # PIL keeps only 8 of the 16 bits of colour PNG/TIFF: read the full depth with OpenCV.
        return _decode_16bit_colour(path)
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image).astype(np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("1", "L"):
        return np.repeat(np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0, 3, axis=-1)
    if mode in ("LA", "La"):
        grey_alpha = np.asarray(image.convert("LA"), dtype=np.float32) / 255.0
        return np.concatenate([np.repeat(grey_alpha[..., :1], 3, axis=-1), grey_alpha[..., 1:]], axis=-1)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        target = "RGBA" if has_alpha else "RGB"
        return np.asarray(image.convert(target), dtype=np.float32) / 255.0
    if mode in ("RGBA", "RGBa"):
        return np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    if mode == "RGB":
        return np.asarray(image, dtype=np.float32) / 255.0
    # CMYK, YCbCr, LAB, HSV, RGBX: PIL knows how to get to RGB.
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _decode_16bit_colour(path: Path) -> np.ndarray:
    """Full-precision decode of a 16-bit RGB(A) file with OpenCV, as float32 RGB(A) in [0, 1]."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(f"{path}: truncated or corrupt 16-bit image file")
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    order = [2, 1, 0, 3][: array.shape[2]]  # OpenCV gives BGR(A)
    return array[..., order].astype(np.float32) / scale


def apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turns an (H, W, ...) array stored with EXIF orientation tag 1-8 into its upright view.

    Same result as ``PIL.ImageOps.exif_transpose``; unknown tags leave the array as is.
    """
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def save_rgba_png(path: str | os.PathLike[str], rgba: np.ndarray) -> None:
    """Atomically writes an (H, W, 4) straight-alpha float array in [0, 1] as an 8-bit RGBA PNG."""
    rgba = np.asarray(rgba, dtype=np.float32)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"save_rgba_png expects (H, W, 4), got {rgba.shape}")
    pixels = np.round(np.clip(rgba, 0.0, 1.0) * 255.0).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="RGBA").save(tmp, format="PNG")


def _natural_key(path: Path) -> list[object]:
    """Sort key that orders ``img2`` before ``img10`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)] + [str(path)]


def is_image_name(path: Path) -> bool:
    """True for a non-hidden file name with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to their images.

    Folders are not searched recursively; hidden files and other extensions
    in them are skipped. The result has no duplicates and is sorted
    naturally by file name (``2.png`` before ``10.png``). Raises
    ``InputError`` for a path that does not exist or a folder without images.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = [child for child in path.iterdir() if child.is_file() and is_image_name(child)]
            if not images:
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.update(dict.fromkeys(images))
        elif path.exists():
            found[path] = None
        else:
            raise InputError(f"{path}: no such file or folder")
    return sorted(found, key=_natural_key)


def premultiply(rgba: Tensor) -> Tensor:
    """Straight-alpha RGBA (..., 4, H, W) -> premultiplied (colour times alpha)."""
    return torch.cat([rgba[..., :3, :, :] * rgba[..., 3:, :, :], rgba[..., 3:, :, :]], dim=-3)


def unpremultiply(premultiplied: Tensor) -> Tensor:
    """Premultiplied RGBA (..., 4, H, W) -> straight alpha in [0, 1]; colour is 0 where alpha is ~0."""
    alpha = premultiplied[..., 3:, :, :].clamp(0.0, 1.0)
    rgb = torch.where(alpha > 1e-6, premultiplied[..., :3, :, :] / alpha.clamp_min(1e-6), torch.zeros_like(premultiplied[..., :3, :, :]))
    return torch.cat([rgb.clamp(0.0, 1.0), alpha], dim=-3)


def resize_premultiplied(premultiplied: Tensor, size: int) -> Tensor:
    """Premultiplied RGBA (N, 4, H, W) -> (N, 4, size, size), antialiased bilinear (transparent pixels never darken edges)."""
    return F.interpolate(premultiplied, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_rgba(rgba: Tensor, size: int) -> Tensor:
    """Straight-alpha RGBA (4, H, W) or (N, 4, H, W) -> the same at (size, size), resampled on premultiplied colour."""
    batch = rgba if rgba.dim() == 4 else rgba[None]
    out = unpremultiply(resize_premultiplied(premultiply(batch), size))
    return out if rgba.dim() == 4 else out[0]


def composite(rgba: Tensor, background: Tensor | float | tuple[float, float, float] = 1.0, dim: int = -3) -> Tensor:
    """Straight-alpha RGBA over a background -> RGB; the one alpha-compositing rule of the code base.

    ``dim`` is the channel axis: -3 for (..., 4, H, W), -1 for (..., 4).
    ``background``: a grey level, an RGB triple, or a tensor that broadcasts
    against the RGB result (e.g. per-pixel backgrounds).
    """
    rgb, alpha = rgba.split([3, 1], dim=dim)
    bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
    if bg.dim() <= 1:
        bg = bg.reshape((-1,) + (1,) * (-dim - 1))
    return rgb * alpha + bg * (1.0 - alpha)

