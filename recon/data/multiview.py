"""Multi-view object datasets on disk: recon's own layout and Zero-1-to-3's Objaverse renders.

recon layout (what ``recon data synth`` writes)::

    DATA/<object_id>/000.png   RGBA, straight alpha
    DATA/<object_id>/000.json  {"elevation_deg", "azimuth_deg", "radius", "fovy_deg",
                                "c2w": 4x4 camera-to-world}   (recon.cameras frame)

Objaverse ``views_release`` layout (Zero-1-to-3's training renders)::

    views_release/<uid>/000.png  RGBA 256 x 256
    views_release/<uid>/000.npy  3x4 world-to-camera [R | t] from Blender

Objaverse's world is Blender's: right-handed, **+Z up**, and an object's
front looks towards -Y. Blender cameras use OpenGL axes (look down -Z, +Y
up), as ours do, so only the world axes change. We map Blender world
coordinates (x_b, y_b, z_b) to ours by the rotation ``(x, y, z) = (x_b, z_b,
-y_b)`` (a -90 deg turn about X, det +1, the same map Blender's glTF exporter
applies): Blender's +Z becomes our +Y, Blender's front (-Y) becomes our front
(+Z). Zero-1-to-3 measures azimuth as atan2(y_b, x_b) about +Z; ours is
atan2(x, z) about +Y; both are right-handed turns about the up axis, and
ours = Blender's + 90 deg, so azimuth *differences* (all the model sees) are
unchanged. Elevation = 90 deg - Zero-1-to-3's polar angle; the radius is the
camera's distance. Zero-1-to-3's renders used Blender's 35 mm lens on a 32 mm
sensor, a fixed field of view of 2 atan(16 / 35) = 49.13 deg.

Both readers give the same :class:`ViewRecord` s, so training and evaluation
do not care which layout a folder uses. Object folders and view files must lie
inside the dataset root, symbolic links resolved (:mod:`recon.datapaths`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from recon.cameras import position_to_spherical, spherical_to_position
from recon.datapaths import resolve_inside
from recon.errors import InputError
from recon.fileio import read_json, write_json
from recon.imageio import decode_image, resize_rgba, save_rgba_png

Layout = Literal["auto", "recon", "objaverse"]

OBJAVERSE_FOVY_DEG = math.degrees(2 * math.atan(16.0 / 35.0))
"""Field of view of Zero-1-to-3's Objaverse renders (Blender 35 mm lens, 32 mm sensor), degrees."""

# Blender world (Z up) -> recon world (Y up): (x, y, z) = (x_b, z_b, -y_b).
BLENDER_TO_WORLD = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

_VIEW_NAME = re.compile(r"^(\d+)\.png$")


@dataclass
class ViewRecord:
    """One posed view: its image file and camera (angles in degrees, radius in the dataset's units)."""

    image_path: Path
    elevation_deg: float
    azimuth_deg: float
    radius: float
    fovy_deg: float
    c2w: Tensor
    """(4, 4) camera-to-world in the recon world frame, OpenGL camera axes."""


@dataclass
class ObjectRecord:
    """An object's folder and its views, sorted by view number."""

    object_id: str
    folder: Path
    views: list[ViewRecord]


@dataclass
class ObjectViews:
    """Loaded views of one object: ``images`` (V, 4, S, S) straight-alpha RGBA in [0, 1]; poses (V,) each."""

    object_id: str
    images: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor
    radius: Tensor
    fovy_deg: Tensor
    c2w: Tensor


# ------------------------------------------------------------------ Objaverse
def blender_w2c_to_c2w(rt: Tensor | np.ndarray) -> Tensor:
    """Objaverse's 3x4 Blender world-to-camera ``[R | t]`` -> (4, 4) camera-to-world in the recon frame."""
    rt = torch.as_tensor(np.asarray(rt), dtype=torch.float64)
    rotation, translation = rt[:, :3], rt[:, 3]
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = BLENDER_TO_WORLD.double() @ rotation.T
    c2w[:3, 3] = BLENDER_TO_WORLD.double() @ (-rotation.T @ translation)
    return c2w.float()


def c2w_to_blender_w2c(c2w: Tensor) -> Tensor:
    """Inverse of :func:`blender_w2c_to_c2w`: recon (4, 4) camera-to-world -> Blender 3x4 world-to-camera."""
    c2w = torch.as_tensor(c2w, dtype=torch.float64)
    to_blender = BLENDER_TO_WORLD.double().T
    rotation_c2w = to_blender @ c2w[:3, :3]
    center = to_blender @ c2w[:3, 3]
    rotation = rotation_c2w.T
    return torch.cat([rotation, (-rotation @ center)[:, None]], dim=1).float()


def read_objaverse_view(npy_path: Path, fovy_deg: float = OBJAVERSE_FOVY_DEG) -> ViewRecord:
    """Reads one ``NNN.npy`` (and pairs it with ``NNN.png``) of the Objaverse ``views_release`` layout."""
    try:
        rt = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{npy_path}: not a readable .npy camera matrix ({exc})") from exc
    if rt.shape != (3, 4) or not np.all(np.isfinite(rt)):
        raise InputError(f"{npy_path}: expected a finite 3x4 world-to-camera matrix, got shape {rt.shape}")
    c2w = blender_w2c_to_c2w(rt)
    elevation, azimuth, radius = (float(v) for v in position_to_spherical(c2w[:3, 3]))
    return ViewRecord(npy_path.with_suffix(".png"), elevation, azimuth, radius, float(fovy_deg), c2w)


# ------------------------------------------------------------------ recon layout
def read_recon_view(json_path: Path) -> ViewRecord:
    """Reads one ``NNN.json`` of the recon layout; the c2w must agree with the spherical pose."""
    try:
        data = read_json(json_path)
        values = [float(data[k]) for k in ("elevation_deg", "azimuth_deg", "radius", "fovy_deg")]
        c2w = torch.tensor(data["c2w"], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{json_path}: not a recon view file (need elevation_deg, azimuth_deg, radius, fovy_deg, c2w): {exc}") from exc
    if c2w.shape != (4, 4) or not all(math.isfinite(v) for v in values) or not torch.isfinite(c2w).all():
        raise InputError(f"{json_path}: c2w must be a finite 4x4 matrix and the angles finite numbers")
    center = spherical_to_position(torch.tensor(values[0]), torch.tensor(values[1]), torch.tensor(values[2]))
    if (center - c2w[:3, 3]).norm() > 1e-3 * max(1.0, values[2]):
        raise InputError(f"{json_path}: the c2w camera centre does not match elevation/azimuth/radius")
    return ViewRecord(json_path.with_suffix(".png"), *values, c2w)


def write_recon_view(
    folder: Path, index: int, rgba: Tensor | np.ndarray, elevation_deg: float, azimuth_deg: float,
    radius: float, fovy_deg: float, c2w: Tensor,
) -> tuple[Path, Path]:
    """Writes view ``index`` of an object as ``NNN.png`` (RGBA (H, W, 4) in [0, 1]) and ``NNN.json``, atomically.

    The PNG is written first, so a ``.json`` on disk always has its image.
    """
    png, meta = folder / f"{index:03d}.png", folder / f"{index:03d}.json"
    array = rgba.detach().cpu().numpy() if isinstance(rgba, Tensor) else np.asarray(rgba)
    save_rgba_png(png, array)
    write_json(meta, {
        "elevation_deg": float(elevation_deg), "azimuth_deg": float(azimuth_deg), "radius": float(radius),
        "fovy_deg": float(fovy_deg), "c2w": [[float(v) for v in row] for row in torch.as_tensor(c2w).tolist()],
    })
    return png, meta


# ------------------------------------------------------------------ scanning
def detect_layout(folder: Path) -> Literal["recon", "objaverse"] | None:
    """``recon`` if an object folder holds ``NNN.json`` views, ``objaverse`` for ``NNN.npy``, else None."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    pngs = [n for n in names if _VIEW_NAME.match(n)]
    if any(n[:-4] + ".json" in names for n in pngs):
        return "recon"
    if any(n[:-4] + ".npy" in names for n in pngs):
        return "objaverse"
    return None


def read_object(
    folder: Path, layout: Layout = "auto", fovy_deg: float = OBJAVERSE_FOVY_DEG, root: Path | None = None
) -> ObjectRecord:
    """The views of one object folder (PNGs without their pose file are skipped).

    Every view file must lie inside ``root`` (default ``folder``), symbolic links resolved.
    """
    root = folder if root is None else root
    kind = detect_layout(folder) if layout == "auto" else layout
    if kind is None:
        raise InputError(f"{folder}: no views (expected NNN.png with NNN.json, or NNN.png with NNN.npy)")
    views = []
    for png in sorted(folder.iterdir(), key=lambda p: p.name):
        if not _VIEW_NAME.match(png.name):
            continue
        for path in (png, png.with_suffix(".json" if kind == "recon" else ".npy")):
            resolve_inside(root, path.relative_to(root) if path.is_relative_to(root) else path, folder)
        if kind == "recon" and png.with_suffix(".json").is_file():
            views.append(read_recon_view(png.with_suffix(".json")))
        elif kind == "objaverse" and png.with_suffix(".npy").is_file():
            views.append(read_objaverse_view(png.with_suffix(".npy"), fovy_deg))
    return ObjectRecord(folder.name, folder, views)


def scan_objects(root: Path, layout: Layout = "auto", min_views: int = 1, fovy_deg: float = OBJAVERSE_FOVY_DEG) -> list[ObjectRecord]:
    """Every object folder under ``root`` with at least ``min_views`` views, sorted by id.

    Sub-folders that hold no views (or are hidden) are skipped; a root without
    any object raises :class:`InputError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    objects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        resolve_inside(root, folder.name, root)
        if (layout == "auto" and detect_layout(folder) is None):
            continue
        record = read_object(folder, layout, fovy_deg, root)
        if len(record.views) >= min_views:
            objects.append(record)
    if not objects:
        raise InputError(f"{root}: no object folders with at least {min_views} posed views ({layout} layout)")
    return objects


def load_rgba(path: Path, size: int | None = None) -> Tensor:
    """A view image as (4, S, S) straight-alpha RGBA in [0, 1]; resized (premultiplied, antialiased) to ``size``."""
    array = decode_image(path)
    if array.shape[2] == 3:
        array = np.concatenate([array, np.ones_like(array[..., :1])], axis=-1)
    image = torch.from_numpy(array).permute(2, 0, 1)
    if size is not None and tuple(image.shape[1:]) != (size, size):
        image = resize_rgba(image, size)
    return image


class MultiViewDataset(torch.utils.data.Dataset):
    """Objects of a multi-view folder (either layout); item ``i`` is :class:`ObjectViews` of object ``i``.

    ``image_size`` resizes every view to a square side (None keeps the files'
    size, which must then be equal across views).
    """

    def __init__(
        self, root: str | Path, layout: Layout = "auto", image_size: int | None = None,
        min_views: int = 2, fovy_deg: float = OBJAVERSE_FOVY_DEG,
    ) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.objects = scan_objects(self.root, layout, min_views, fovy_deg)

    def __len__(self) -> int:
        return len(self.objects)

    def view_image(self, index: int, view: int) -> Tensor:
        """(4, S, S) RGBA of one view of object ``index``."""
        return load_rgba(self.objects[index].views[view].image_path, self.image_size)

    def __getitem__(self, index: int) -> ObjectViews:
        record = self.objects[index]
        views = record.views

        def column(name: str) -> Tensor:
            return torch.tensor([getattr(v, name) for v in views], dtype=torch.float32)

        return ObjectViews(
            object_id=record.object_id,
            images=torch.stack([load_rgba(v.image_path, self.image_size) for v in views]),
            elevation_deg=column("elevation_deg"),
            azimuth_deg=column("azimuth_deg"),
            radius=column("radius"),
            fovy_deg=column("fovy_deg"),
            c2w=torch.stack([v.c2w for v in views]),
        )
