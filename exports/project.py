"""Surface colour by projection: what the field renders at a surface point, seen from many views.

For every query point on the exported mesh (a texel or a vertex) the views
that see it (a z-buffer of the mesh per view, :mod:`exports.raster`) are
weighted by how squarely they face it (cos^4 of the angle to the normal);
for the best few, the field is volume-rendered along a short ray from the
view towards the point, through a band of ``2 * band`` around it, and the
composited colour is the colour at the expected ray termination, i.e. on
the surface the field actually renders rather than at the mesh point (which
marching cubes puts up to a voxel inside or outside it, where the field's
colour was never learned). Points that no view sees use the ray along their
normal; where even that finds no opaque surface, the albedo at the point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.exports.raster import look_at_box, project, rasterize
from recon.render.compositing import compositing_weights

FieldFn = Callable[[Tensor], Tensor]


def sphere_viewpoints(aabb: np.ndarray, count: int, distance: float = 2.0) -> np.ndarray:
    """``count`` camera centres (count, 3) evenly over a sphere (Fibonacci) about the box centre,
    ``distance`` box half-diagonals away."""
    centre = (aabb[0] + aabb[1]) / 2.0
    radius = distance * float(np.linalg.norm(aabb[1] - aabb[0])) / 2.0
    i = np.arange(count) + 0.5
    y = 1.0 - 2.0 * i / count
    ring = np.sqrt(1.0 - y * y)
    angle = i * math.pi * (3.0 - math.sqrt(5.0))
    return centre + radius * np.stack([ring * np.sin(angle), y, ring * np.cos(angle)], axis=1)


@dataclass
class ProjectionSettings:
    """How :func:`surface_colours` renders (see :class:`exports.config.ExportConfig` bake_* fields)."""

    views_per_point: int = 3
    samples: int = 16
    view_resolution: int = 512
    band: float = 0.02
    min_cos: float = 0.15


@torch.no_grad()
def _render_segments(
    density_fn: FieldFn, albedo_fn: FieldFn, starts: Tensor, directions: Tensor, length: float, samples: int
) -> tuple[Tensor, Tensor]:
    """Volume-renders segments ``starts + t * directions``, t in [0, length]: colour (R, 3) (not
    premultiplied) and opacity (R,). Albedo is evaluated only where a sample carries weight."""
    rays = len(starts)
    t = (torch.arange(samples, device=starts.device, dtype=starts.dtype) + 0.5) * (length / samples)
    points = (starts[:, None] + directions[:, None] * t[None, :, None]).reshape(-1, 3)
    sigma = density_fn(points).reshape(rays, samples).to(starts.dtype).nan_to_num(0.0).clamp_min(0.0)
    weights, _, _ = compositing_weights(sigma, torch.full_like(sigma, length / samples))
    opacity = weights.sum(dim=1)
    used = (weights > 1e-4 * opacity.clamp_min(1e-12)[:, None]).reshape(-1)
    albedo = torch.zeros(rays * samples, 3, device=starts.device, dtype=starts.dtype)
    if used.any():
        albedo[used] = albedo_fn(points[used]).reshape(-1, 3).to(starts.dtype).nan_to_num(0.0)
    colour = (weights[..., None] * albedo.view(rays, samples, 3)).sum(dim=1) / opacity.clamp_min(1e-8)[:, None]
    return colour.clamp(0.0, 1.0), opacity


class Projector:
    """Visibility of a mesh from ``view_origins`` (K, 3): one z-buffer per view, computed once.

    ``vertices``/``faces``: the exported mesh; ``aabb`` (2, 3): the box all
    views frame; depth maps are ``settings.view_resolution`` pixels square.
    """

    def __init__(
        self, vertices: np.ndarray, faces: np.ndarray, aabb: np.ndarray, view_origins: np.ndarray,
        settings: ProjectionSettings | None = None, device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings or ProjectionSettings()
        self.box = np.asarray(aabb, dtype=np.float64)
        self.band = self.settings.band * float(np.linalg.norm(self.box[1] - self.box[0]))
        self.cameras = look_at_box(self.box, np.asarray(view_origins, dtype=np.float64), self.settings.view_resolution).to(device)
        self.depth_maps = torch.stack([rasterize(self.cameras[k], vertices, faces).depth.float() for k in range(len(self.cameras))])

    def view_weights(self, points: Tensor, normals: Tensor) -> Tensor:
        """(P, K) weight of each view for each point: cos^4 of its angle to the normal where it sees the point, else 0."""
        weights = torch.zeros(len(points), len(self.cameras), dtype=torch.float32, device=points.device)
        for k in range(len(self.cameras)):
            camera = self.cameras[k]
            col, row, depth = project(camera, points)
            ic, ir = col.round().long(), row.round().long()
            inside = (ic >= 0) & (ic < camera.width) & (ir >= 0) & (ir < camera.height) & (depth > 0)
            to_camera = torch.nn.functional.normalize(camera.centers[0].to(points) - points, dim=-1)
            cos = (normals * to_camera).sum(-1)
            # Depth may rise across a pixel on a slanted surface: allow two pixel footprints along the slope.
            tolerance = 0.25 * self.band + 2.0 * depth / float(camera.focal[0]) / cos.clamp_min(0.1)
            surface = self.depth_maps[k][ir.clamp(0, camera.height - 1), ic.clamp(0, camera.width - 1)]
            visible = inside & (depth <= surface + tolerance) & (cos > self.settings.min_cos)
            weights[:, k] = torch.where(visible, cos.clamp_min(0.0) ** 4, torch.zeros_like(cos))
        return weights


@torch.no_grad()
def surface_colours(
    points: np.ndarray,
    normals: np.ndarray,
    projector: Projector,
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    chunk_size: int = 262_144,
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (P, 3) in [0, 1] of surface ``points`` (P, 3) with outward ``normals`` (P, 3), by projection.

    ``projector`` holds the mesh's visibility from the views (e.g. at
    :func:`sphere_viewpoints` or the training cameras); ``density_fn`` /
    ``albedo_fn`` take world points on the projector's device. Returns the
    colours and a (P,) int array of how each was found: 2 = seen from views,
    1 = along the normal, 0 = point albedo.
    """
    s, band = projector.settings, projector.band
    device = projector.depth_maps.device
    p = torch.as_tensor(np.asarray(points, dtype=np.float32), device=device)
    n = torch.nn.functional.normalize(torch.as_tensor(np.asarray(normals, dtype=np.float32), device=device), dim=-1)
    weights = projector.view_weights(p, n)
    cameras = projector.cameras
    colours = torch.zeros(len(p), 3, dtype=torch.float32, device=device)
    total = torch.zeros(len(p), dtype=torch.float32, device=device)
    top = min(s.views_per_point, len(cameras))
    best, which = weights.topk(top, dim=1)
    centres = cameras.centers.to(p)
    rays_per_chunk = max(1, chunk_size // s.samples)
    for slot in range(top):
        chosen = torch.nonzero(best[:, slot] > 0).reshape(-1)
        for start in range(0, len(chosen), rays_per_chunk):
            index = chosen[start : start + rays_per_chunk]
            toward = torch.nn.functional.normalize(centres[which[index, slot]] - p[index], dim=-1)
            colour, opacity = _render_segments(density_fn, albedo_fn, p[index] + band * toward, -toward, 2.0 * band, s.samples)
            weight = best[index, slot] * opacity
            colours[index] += weight[:, None] * colour
            total[index] += weight
    found = torch.where(total > 1e-6, 2, 0)
    colours = torch.where((total > 1e-6)[:, None], colours / total.clamp_min(1e-12)[:, None], colours)
    unseen = torch.nonzero(total <= 1e-6).reshape(-1)
    for start in range(0, len(unseen), rays_per_chunk):
        index = unseen[start : start + rays_per_chunk]
        colour, opacity = _render_segments(density_fn, albedo_fn, p[index] + band * n[index], -n[index], 2.0 * band, s.samples)
        hit = opacity > 0.05
        colours[index[hit]] = colour[hit]
        found[index[hit]] = 1
        missed = index[~hit]
        if len(missed):
            colours[missed] = albedo_fn(p[missed]).reshape(-1, 3).float().nan_to_num(0.0).clamp(0.0, 1.0)
    return colours.cpu().numpy().astype(np.float64), found.cpu().numpy()
