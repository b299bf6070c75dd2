"""Posed images in the NeRF-synthetic / instant-NGP ``transforms.json`` format.

Keys read: ``camera_angle_x`` (horizontal field of view, radians) or
``camera_angle_y``, or ``fl_x``/``fl_y`` with ``w``/``h`` (pixels); and
``frames[]`` with ``file_path`` (relative to the JSON's folder; NeRF-synthetic
leaves out the ``.png``; it must lie inside that folder, symbolic links
resolved: :mod:`recon.datapaths`) and ``transform_matrix`` (4x4 camera-to-world, OpenGL
camera axes: the camera looks down -Z, +Y up, as in :mod:`recon.cameras`).
Per-frame intrinsics are not supported; the principal point is assumed centred.

NeRF-synthetic scenes sit in about [-1.5, 1.5]^3 with cameras at radius ~4;
other captures use other units. :func:`estimate_scene` finds the point the
cameras look at and the half-width they see there, so a trainer can map the
scene into its field box (:func:`scene_scale`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.cameras import Cameras, fovy_from_fovx
from recon.datapaths import outside_message, resolve_inside
from recon.errors import InputError
from recon.fileio import write_json
from recon.imageio import IMAGE_EXTENSIONS, decode_image, save_rgba_png


@dataclass
class PosedImages:
    """Images with their cameras, in the JSON's own world units.

    ``images``: (N, H, W, 4) float32 straight-alpha RGBA in [0, 1] (alpha 1 for
    RGB files); ``cameras``: N cameras of size H x W; ``paths``: the image files.
    """

    images: Tensor
    cameras: Cameras
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> PosedImages:
        """The frames at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return PosedImages(self.images[index], self.cameras[index], [self.paths[i] for i in indices])


def transforms_file(path: str | Path, split: str | None = None) -> Path:
    """The JSON file for ``path`` and ``split``.

    ``path`` may be a JSON file or a folder. In a folder, ``split`` picks
    ``transforms_{split}.json`` (NeRF-synthetic layout); without a split the
    folder's ``transforms.json`` is used. A JSON file with a split picks its
    sibling ``transforms_{split}.json``.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if split is not None:
        return folder / f"transforms_{split}.json"
    return folder / "transforms.json" if path.is_dir() else path


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: transforms file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the transforms file ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with 'frames'")
    return data


def _fovy(data: dict, path: Path, width: int, height: int) -> float:
    """Vertical field of view in radians from whichever intrinsics key the file has, checked to be in (0, pi)."""
    fovy = _read_fovy(data, path, width, height)
    if not 0.0 < fovy < math.pi:
        raise InputError(f"{path}: the field of view from the camera intrinsics is {math.degrees(fovy):g} degrees; expected (0, 180)")
    return fovy


def _read_fovy(data: dict, path: Path, width: int, height: int) -> float:
    try:
        if "camera_angle_y" in data:
            return float(data["camera_angle_y"])
        if "camera_angle_x" in data:
            return fovy_from_fovx(float(data["camera_angle_x"]), width, height)
        if "fl_y" in data:
            return 2.0 * math.atan(0.5 * float(data.get("h", height)) / float(data["fl_y"]))
        if "fl_x" in data:
            return fovy_from_fovx(2.0 * math.atan(0.5 * float(data.get("w", width)) / float(data["fl_x"])), width, height)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise InputError(f"{path}: camera intrinsics are not usable numbers ({exc})") from exc
    raise InputError(f"{path}: missing 'camera_angle_x' (or camera_angle_y / fl_x / fl_y)")


def _image_file(folder: Path, file_path: str, json_path: Path, index: int) -> Path:
    """The image a frame names: ``file_path`` itself or with an image extension, inside ``folder``.

    Every candidate is checked to lie inside ``folder`` (symbolic links resolved)
    before its existence is, so a path outside gets one message either way.
    """
    source = f"{json_path}: frame {index}: file_path"
    for name in (file_path, *(file_path + ext for ext in IMAGE_EXTENSIONS)):
        try:
            path = resolve_inside(folder, name, source)
        except InputError as exc:  # named as the frame wrote it, whichever extension was tried
            raise InputError(outside_message(source, file_path, folder.resolve())) from exc
        if path.is_file():
            return path
    raise InputError(f"{json_path}: frame {index}: image {file_path!r} not found in {folder} (also tried adding .png)")


def _matrix(frame: dict, index: int, path: Path) -> np.ndarray:
    if "transform_matrix" not in frame:
        raise InputError(f"{path}: frame {index} has no 'transform_matrix'")
    try:
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: frame {index}: transform_matrix is not numeric") from exc
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InputError(f"{path}: frame {index}: transform_matrix must be a finite 4x4 (or 3x4) matrix, got shape {matrix.shape}")
    rotation = matrix[:3, :3]
    if abs(np.linalg.det(rotation)) < 1e-6:
        raise InputError(f"{path}: frame {index}: transform_matrix has a singular rotation")
    return matrix


def read_transforms(path: str | Path, split: str | None = None, max_frames: int | None = None) -> PosedImages:
    """Reads a transforms.json (see :func:`transforms_file` for ``path``/``split``) and decodes its images.

    ``max_frames`` keeps the first frames only. Raises :class:`InputError`
    naming the file for a missing file or key, an unreadable image, or images
    of different sizes.
    """
    json_path = transforms_file(path, split)
    data = _load_json(json_path)
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{json_path}: no 'frames' (expected a non-empty list)")
    frames = frames[:max_frames] if max_frames else frames
    folder = json_path.parent
    images, matrices, paths = [], [], []
    for index, frame in enumerate(frames):
        if not isinstance(frame, dict) or "file_path" not in frame:
            raise InputError(f"{json_path}: frame {index} has no 'file_path'")
        image_path = _image_file(folder, str(frame["file_path"]), json_path, index)
        matrices.append(_matrix(frame, index, json_path))
        image = decode_image(image_path)
        if image.shape[2] == 3:
            image = np.concatenate([image, np.ones_like(image[..., :1])], axis=2)
        if images and image.shape != images[0].shape:
            raise InputError(
                f"{image_path}: size {image.shape[1]}x{image.shape[0]} differs from the first frame's "
                f"{images[0].shape[1]}x{images[0].shape[0]}"
            )
        images.append(image)
        paths.append(image_path)
    height, width = images[0].shape[:2]
    fovy = _fovy(data, json_path, width, height)
    c2w = torch.as_tensor(np.stack(matrices), dtype=torch.float32)
    cameras = Cameras(c2w=c2w, fovy=torch.full((len(frames),), fovy), height=height, width=width)
    return PosedImages(torch.as_tensor(np.stack(images)), cameras, paths)


def write_transforms(path: str | Path, images: Tensor, cameras: Cameras, image_folder: str = "images") -> Path:
    """Writes ``images`` (N, H, W, 4) in [0, 1] as PNGs and a transforms.json describing them.

    Images go to ``image_folder`` beside the JSON, named ``r_{i}.png``; frames
    store ``file_path`` without the extension, as NeRF-synthetic does.
    ``camera_angle_x`` comes from the cameras' (shared) vertical field of view.
    """
    path = Path(path)
    if images.ndim != 4 or images.shape[-1] != 4 or len(images) != len(cameras):
        raise ValueError(f"write_transforms: expected (N, H, W, 4) images for {len(cameras)} cameras, got {tuple(images.shape)}")
    height, width = cameras.height, cameras.width
    fovy = float(cameras.fovy[0])
    fovx = 2.0 * math.atan(math.tan(0.5 * fovy) * width / height)
    frames = []
    for i in range(len(cameras)):
        relative = f"{image_folder}/r_{i}"
        save_rgba_png(path.parent / f"{relative}.png", images[i].detach().cpu().numpy())
        frames.append({"file_path": f"./{relative}", "transform_matrix": cameras.c2w[i].detach().cpu().double().tolist()})
    write_json(path, {"camera_angle_x": fovx, "frames": frames})
    return path


def estimate_scene(cameras: Cameras) -> tuple[Tensor, float]:
    """Centre (3,) and radius of the region the cameras look at, in world units.

    The centre is the least-squares closest point to all optical axes; the
    radius is the half-width of the narrower image side at the mean distance
    from the cameras to that centre (what a centred object can fill). Cameras
    whose axes are nearly parallel (no common target) give the origin.
    """
    c2w = cameras.c2w.double().cpu()
    origins = c2w[:, :3, 3]
    forward = -c2w[:, :3, 2]
    forward = forward / forward.norm(dim=-1, keepdim=True)
    # Sum over cameras of (I - d d^T) (x - o) = 0.
    projector = torch.eye(3, dtype=torch.float64) - forward[:, :, None] * forward[:, None, :]
    lhs = projector.sum(0)
    rhs = (projector @ origins[:, :, None]).sum(0).squeeze(-1)
    eigenvalues = torch.linalg.eigvalsh(lhs)
    if eigenvalues[0] < 1e-3 * len(cameras):
        center = torch.zeros(3, dtype=torch.float64)
    else:
        center = torch.linalg.solve(lhs, rhs)
    distance = (origins - center).norm(dim=-1).mean()
    fovy = cameras.fovy.double().cpu().mean()
    fovx = 2.0 * torch.atan(torch.tan(0.5 * fovy) * cameras.width / cameras.height)
    half_angle = 0.5 * torch.minimum(fovx, fovy)
    return center.float(), float(distance * torch.tan(half_angle))


def scene_scale(radius: float, bound: float, margin: float = 1.0) -> float:
    """Scale that maps a scene of ``radius`` to fill a field box of half-size ``bound`` (times ``margin``)."""
    if radius <= 0:
        raise InputError(f"scene radius must be positive, got {radius}")
    return bound * margin / radius
