"""The one module that owns recon's camera conventions.

World frame: right-handed, +Y up. The reference (input) camera sits on +Z and
looks at the origin, so the photographed side of the object faces +Z, which
is also glTF's "front". Spherical camera coordinates:

* elevation (degrees): angle above the XZ plane, positive = camera higher;
* azimuth (degrees): rotation about +Y from +Z towards +X, so azimuth 0 is
  the reference camera and azimuth +90 looks at the object from +X (the
  camera moved to its own right);
* radius: distance to the origin, in scene units (object in a unit sphere).

Camera-to-world matrices use the OpenGL camera convention of NeRF-synthetic
``transforms.json``: the camera looks down its local -Z, +Y is up, +X right.

Zero-1-to-3 relative pose of a target camera with respect to the
conditioning camera: ``[delta_polar (rad), sin(delta_azimuth),
cos(delta_azimuth), delta_radius]`` with polar = 90 deg - elevation.
Stable-Zero123 replaces the last element with the conditioning camera's
absolute polar angle (rad). This azimuth sense is the one threestudio's
Zero123 guidance uses (a right-handed turn about the up axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from recon.runtime import to_device

PoseEncoding = Literal["zero123", "stable-zero123"]


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, radius: Tensor) -> Tensor:
    """Camera centres (..., 3) in world units from elevation/azimuth (degrees) and radius."""
    elevation = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32))
    azimuth = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32))
    radius = torch.as_tensor(radius, dtype=torch.float32)
    elevation, azimuth, radius = torch.broadcast_tensors(elevation, azimuth, radius)
    horizontal = radius * torch.cos(elevation)
    return torch.stack(
        [horizontal * torch.sin(azimuth), radius * torch.sin(elevation), horizontal * torch.cos(azimuth)],
        dim=-1,
    )


def position_to_spherical(position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`spherical_to_position`: (elevation deg, azimuth deg in (-180, 180], radius)."""
    x, y, z = position.unbind(-1)
    radius = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((y / radius.clamp_min(1e-12)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(x, z))
    return elevation, azimuth, radius


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices (..., 4, 4), OpenGL camera axes, for cameras at ``eye`` (..., 3).

    The camera looks at ``target`` (default the origin) with ``up`` (default +Y)
    as close to its +Y as possible. A camera straight above or below the
    target keeps the orientation it has just off the pole at azimuth 0
    (image-up towards -Z above, +Z below), so the matrix stays defined.
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    up = eye.new_tensor([0.0, 1.0, 0.0]) if up is None else torch.as_tensor(up, dtype=eye.dtype)
    up = up.expand_as(eye)
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    right = torch.linalg.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback_up = torch.zeros_like(eye)
    fallback_up[..., 2] = torch.sign(forward[..., 1])
    right = torch.where(degenerate, torch.linalg.cross(forward, fallback_up, dim=-1), right)
    right = right / right.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    camera_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = camera_up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def focal_from_fovy(fovy_rad: Tensor | float, height: int) -> Tensor:
    """Focal length in pixels for a vertical field of view (radians) and image height (pixels)."""
    return 0.5 * height / torch.tan(0.5 * torch.as_tensor(fovy_rad, dtype=torch.float32))


def fovy_from_fovx(fovx_rad: float, width: int, height: int) -> float:
    """Vertical field of view (radians) for a horizontal one, square pixels."""
    return 2.0 * math.atan(math.tan(0.5 * fovx_rad) * height / width)


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    ``c2w``: (N, 4, 4) camera-to-world, OpenGL camera axes; ``fovy``: (N,)
    vertical field of view in radians; ``height``/``width`` in pixels.
    """

    c2w: Tensor
    fovy: Tensor
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.c2w.ndim != 3 or self.c2w.shape[-2:] != (4, 4):
            raise ValueError(f"c2w must be (N, 4, 4), got {tuple(self.c2w.shape)}")
        self.fovy = torch.as_tensor(self.fovy, dtype=self.c2w.dtype, device=self.c2w.device).expand(len(self.c2w))

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Cameras:
        c2w = self.c2w[index]
        fovy = self.fovy[index]
        if c2w.ndim == 2:
            c2w, fovy = c2w[None], fovy[None]
        return Cameras(c2w=c2w, fovy=fovy, height=self.height, width=self.width)

    def to(self, device: torch.device | str) -> Cameras:
        """The same cameras on ``device`` (from the host to a GPU without waiting for the GPU)."""
        return Cameras(to_device(self.c2w, device), to_device(self.fovy, device), self.height, self.width)

    def resized(self, height: int, width: int) -> Cameras:
        """The same poses and field of view rendered at another resolution."""
        return Cameras(self.c2w, self.fovy, height, width)

    @property
    def device(self) -> torch.device:
        """Device of the camera matrices."""
        return self.c2w.device

    @property
    def focal(self) -> Tensor:
        """(N,) focal length in pixels."""
        return focal_from_fovy(self.fovy, self.height).to(self.c2w.device)

    @property
    def centers(self) -> Tensor:
        """(N, 3) camera centres in world units."""
        return self.c2w[:, :3, 3]

    @staticmethod
    def from_spherical(
        elevation_deg: Tensor,
        azimuth_deg: Tensor,
        radius: Tensor,
        fovy_deg: float | Tensor,
        height: int,
        width: int | None = None,
    ) -> Cameras:
        """Cameras on a sphere looking at the origin (angles in degrees; see module docs)."""
        eye = spherical_to_position(elevation_deg, azimuth_deg, radius).reshape(-1, 3)
        fovy = torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32))
        return Cameras(look_at(eye), fovy, height, height if width is None else width)


def pixel_rays(c2w: Tensor, focal: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World-space rays through the centres of pixels (``rows``, ``cols``) of ``height`` x ``width`` images.

    ``c2w`` (..., 4, 4) camera-to-world matrices, ``focal`` (...) focal lengths
    in pixels, ``rows``/``cols`` (...) integer pixel indices (row from the top,
    column from the left); all broadcast against each other. Returns origins
    and unit directions, each (..., 3).
    """
    dtype = c2w.dtype
    x = (cols.to(dtype) + 0.5 - 0.5 * width) / focal
    y = -(rows.to(dtype) + 0.5 - 0.5 * height) / focal
    x, y = torch.broadcast_tensors(x, y)
    local = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
    directions = torch.einsum("...ij,...j->...i", c2w[..., :3, :3], local)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return c2w[..., :3, 3].expand_as(directions), directions


def generate_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through pixel centres.

    Returns origins and unit directions, each (N, H, W, 3). Pixel (i, j) is
    row i from the top, column j from the left.
    """
    device = cameras.c2w.device
    rows = torch.arange(cameras.height, device=device)[:, None]
    cols = torch.arange(cameras.width, device=device)[None, :]
    focal = cameras.focal.to(cameras.c2w.dtype)[:, None, None]
    return pixel_rays(cameras.c2w[:, None, None], focal, rows, cols, cameras.height, cameras.width)


@dataclass
class ViewSampler:
    """Draws random cameras on a sphere for score distillation.

    Elevation and azimuth are drawn uniformly in the given ranges (degrees);
    the radius and field of view are fixed, as Zero-1-to-3 was trained with
    a fixed field of view.
    """

    elevation_range: tuple[float, float] = (-10.0, 80.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    radius: float = 3.8
    fovy_deg: float = 20.0

    def sample(self, count: int, height: int, generator: torch.Generator | None = None) -> tuple[Cameras, Tensor, Tensor]:
        """``count`` random cameras; also returns their elevation and azimuth (degrees), each (count,).

        Elevation is uniform in the *sine* of the angle, so views are uniform
        over the band of the sphere rather than bunched at the pole.
        """
        low, high = (math.sin(math.radians(a)) for a in self.elevation_range)
        sin_elevation = low + (high - low) * torch.rand(count, generator=generator)
        elevation = torch.rad2deg(torch.asin(sin_elevation))
        a0, a1 = self.azimuth_range
        azimuth = a0 + (a1 - a0) * torch.rand(count, generator=generator)
        radius = torch.full((count,), self.radius)
        return Cameras.from_spherical(elevation, azimuth, radius, self.fovy_deg, height), elevation, azimuth


def orbit(count: int, elevation_deg: float, radius: float, fovy_deg: float, height: int) -> Cameras:
    """``count`` cameras evenly spaced in azimuth at one elevation, starting at the reference view."""
    azimuth = torch.arange(count, dtype=torch.float32) * (360.0 / count)
    elevation = torch.full((count,), float(elevation_deg))
    return Cameras.from_spherical(elevation, azimuth, torch.full((count,), float(radius)), fovy_deg, height)


def relative_pose(
    target_elevation_deg: Tensor,
    target_azimuth_deg: Tensor,
    target_radius: Tensor,
    cond_elevation_deg: Tensor | float,
    cond_azimuth_deg: Tensor | float,
    cond_radius: Tensor | float,
    encoding: PoseEncoding = "zero123",
) -> Tensor:
    """Zero-1-to-3 pose of target cameras relative to a conditioning camera, (..., 4).

    ``zero123``: [delta_polar (rad), sin(delta_az), cos(delta_az), delta_radius];
    ``stable-zero123``: the last element is the conditioning camera's absolute
    polar angle (rad). Polar = 90 deg - elevation; deltas are target minus
    conditioning. Inputs broadcast against each other.
    """
    t_el, t_az, t_r, c_el, c_az, c_r = (
        torch.as_tensor(v, dtype=torch.float32)
        for v in (target_elevation_deg, target_azimuth_deg, target_radius, cond_elevation_deg, cond_azimuth_deg, cond_radius)
    )
    t_el, t_az, t_r, c_el, c_az, c_r = torch.broadcast_tensors(t_el, t_az, t_r, c_el, c_az, c_r)
    delta_polar = torch.deg2rad((90.0 - t_el) - (90.0 - c_el))
    delta_azimuth = torch.deg2rad(t_az - c_az)
    if encoding == "zero123":
        last = t_r - c_r
    elif encoding == "stable-zero123":
        last = torch.deg2rad(90.0 - c_el)
    else:
        raise ValueError(f"unknown pose encoding {encoding!r}; expected 'zero123' or 'stable-zero123'")
    return torch.stack([delta_polar, torch.sin(delta_azimuth), torch.cos(delta_azimuth), last], dim=-1)
