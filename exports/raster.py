"""A small triangle rasteriser in torch (no OpenGL): which face each pixel sees, where, and how far.

Used for visibility (depth maps) by the projection bake and to render
exported meshes in tests and benchmarks. Cameras follow recon.cameras:
OpenGL axes (camera looks down -Z), pixel (row, col) centred at
(row + 0.5, col + 0.5) from the top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.cameras import Cameras, look_at


@dataclass
class Raster:
    """One view's rasterisation: ``face`` (H, W) int64 (-1 = background), ``barycentric`` (H, W, 3)
    perspective-correct, ``depth`` (H, W) camera-space depth along -Z in world units (inf = background)."""

    face: Tensor
    barycentric: Tensor
    depth: Tensor


def project(camera: Cameras, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """World points (P, 3) -> (col (P,), row (P,), depth (P,)) in one camera's image; pixel centres are integers.

    ``depth`` is the distance along the viewing axis (-Z of the camera); points
    behind the camera get depth <= 0.
    """
    c2w = camera.c2w[0].to(points)
    local = (points - c2w[:3, 3]) @ c2w[:3, :3]
    depth = -local[:, 2]
    focal = float(camera.focal[0])
    safe = torch.where(depth.abs() > 1e-9, depth, torch.full_like(depth, 1e-9))
    col = local[:, 0] / safe * focal + 0.5 * camera.width - 0.5
    row = -local[:, 1] / safe * focal + 0.5 * camera.height - 0.5
    return col, row, depth


@torch.no_grad()
def rasterize(camera: Cameras, vertices: Tensor | np.ndarray, faces: Tensor | np.ndarray, max_candidates: int = 4_000_000) -> Raster:
    """Rasterises a triangle mesh (``vertices`` (V, 3) world, ``faces`` (F, 3)) in the first camera of ``camera``.

    Nearest surface wins (z-buffer); both sides of a triangle are drawn.
    Triangles with a corner behind the camera are skipped.
    """
    device = camera.device
    vertices = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device)
    faces = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
    h, w = camera.height, camera.width
    col, row, depth = project(camera, vertices)
    corners = torch.stack([col, row], dim=-1)[faces]  # (F, 3, 2)
    z = depth[faces]
    x0 = corners[..., 0].min(dim=1).values.ceil().clamp(0, w - 1).long()
    x1 = corners[..., 0].max(dim=1).values.floor().clamp(-1, w - 1).long()
    y0 = corners[..., 1].min(dim=1).values.ceil().clamp(0, h - 1).long()
    y1 = corners[..., 1].max(dim=1).values.floor().clamp(-1, h - 1).long()
    width, height = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    denominator = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    keep = (z.min(dim=1).values > 1e-6) & (denominator.abs() > 1e-12) & (width * height > 0)
    order = torch.nonzero(keep).reshape(-1)
    area = (width * height)[order]
    cumulative = torch.cumsum(area, 0)
    zbuffer = torch.full((h * w,), float("inf"), dtype=torch.float32, device=device)
    face_index = torch.full((h * w,), -1, dtype=torch.int64, device=device)
    barycentric = torch.zeros((h * w, 3), dtype=torch.float32, device=device)

    def candidates(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tri = order[start:stop]
        counts = width[tri] * height[tri]
        owner = torch.repeat_interleave(tri, counts)
        offset = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        px = x0[owner] + offset % width[owner]
        py = y0[owner] + offset // width[owner]
        ca, cb, cc, d = a[owner], b[owner], c[owner], denominator[owner]
        w0 = ((cb[:, 1] - cc[:, 1]) * (px - cc[:, 0]) + (cc[:, 0] - cb[:, 0]) * (py - cc[:, 1])) / d
        w1 = ((cc[:, 1] - ca[:, 1]) * (px - cc[:, 0]) + (ca[:, 0] - cc[:, 0]) * (py - cc[:, 1])) / d
        screen = torch.stack([w0, w1, 1.0 - w0 - w1], dim=-1)
        inside = (screen >= -1e-6).all(dim=-1)
        owner, screen, pixel = owner[inside], screen[inside], (py * w + px)[inside]
        perspective = screen / z[owner]
        inverse_depth = perspective.sum(dim=-1)
        return owner, perspective / inverse_depth[:, None], 1.0 / inverse_depth, pixel

    batches = []
    start = 0
    while start < len(order):
        base = int(cumulative[start - 1]) if start > 0 else 0
        stop = max(start + 1, int(torch.searchsorted(cumulative, base + max_candidates, right=True)))
        batches.append((start, stop))
        start = stop
    for start, stop in batches:
        _, _, pixel_depth, pixel = candidates(start, stop)
        zbuffer.scatter_reduce_(0, pixel, pixel_depth, reduce="amin")
    for start, stop in batches:
        owner, bary, pixel_depth, pixel = candidates(start, stop)
        front = pixel_depth <= zbuffer[pixel]
        face_index[pixel[front]] = owner[front]
        barycentric[pixel[front]] = bary[front]
    return Raster(face_index.view(h, w), barycentric.view(h, w, 3), zbuffer.view(h, w))


@torch.no_grad()
def mesh_depth_maps(cameras: Cameras, vertices: Tensor | np.ndarray, faces: Tensor | np.ndarray) -> Tensor:
    """The mesh's z-buffer in each of ``cameras``: (N, H, W) float32 :attr:`Raster.depth` (inf = background)."""
    return torch.stack([rasterize(cameras[k], vertices, faces).depth.float() for k in range(len(cameras))])


def view_weight(
    camera: Cameras, zbuffer: Tensor, points: Tensor, normals: Tensor, tolerance: float, min_cos: float, power: float
) -> tuple[Tensor, Tensor, Tensor]:
    """How much one view (``camera``, one camera, and its mesh z-buffer (H, W)) counts for surface ``points``
    (P, 3) with unit outward ``normals`` (P, 3): cos^``power`` of the angle between the normal and the direction
    to the camera where the camera sees the point, else 0. Seen: in frame, in front of the camera, ``cos`` above
    ``min_cos``, and at most ``tolerance`` (world units) plus two pixel footprints along the slope behind the
    z-buffer (depth rises across a pixel on a slanted surface). Returns the weights (P,) and the points' pixel
    coordinates ``col``, ``row`` (P,) (:func:`project`)."""
    col, row, depth = project(camera, points)
    ic, ir = col.round().long(), row.round().long()
    inside = (depth > 0) & (ic >= 0) & (ic < camera.width) & (ir >= 0) & (ir < camera.height)
    cos = (normals * torch.nn.functional.normalize(camera.centers[0].to(points) - points, dim=-1)).sum(-1)
    slope = 2.0 * depth / float(camera.focal[0]) / cos.clamp_min(0.1)
    surface = zbuffer[ir.clamp(0, camera.height - 1), ic.clamp(0, camera.width - 1)]
    seen = inside & (depth <= surface + tolerance + slope) & (cos > min_cos)
    return torch.where(seen, cos.clamp_min(0.0) ** power, torch.zeros_like(cos)), col, row


def look_at_box(aabb: np.ndarray, origins: np.ndarray, resolution: int) -> Cameras:
    """Cameras at ``origins`` (K, 3) looking at the centre of ``aabb`` (2, 3), each seeing the whole box."""
    centre = (aabb[0] + aabb[1]) / 2.0
    radius = float(np.linalg.norm(aabb[1] - aabb[0])) / 2.0
    eye = torch.as_tensor(origins, dtype=torch.float32)
    distance = (eye - torch.as_tensor(centre, dtype=torch.float32)).norm(dim=-1)
    fovy = 2.0 * torch.asin((radius / distance).clamp(max=0.99)) * 1.05
    c2w = look_at(eye, torch.as_tensor(centre, dtype=torch.float32).expand_as(eye))
    return Cameras(c2w, fovy, resolution, resolution)
