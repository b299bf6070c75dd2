"""Surface colour from the field's renders: along the normal, or projected from many views.

Normal bake (:func:`normal_colours`, the default): each query point on the
exported mesh (a texel or a vertex) gets the colour the field renders on a
short ray along its inward normal, from just outside the mesh to just inside:
the albedo composited at the expected ray termination, i.e. on the surface
the field actually renders rather than at the mesh point (which marching
cubes and smoothing put up to a voxel inside or outside it, where the
field's colour was never learned). A ray whose start would lie inside
another part of the object (a narrow gap, e.g. an arm against a body) is
shortened until it starts in empty space (:class:`SolidProbe`).

Projection bake (:func:`surface_colours`): for every query point on the exported mesh (a texel or a vertex) the views
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

from recon.exports.bake import SurfaceLookup, point_lookup
from recon.exports.raster import look_at_box, mesh_depth_maps, view_weight
from recon.exports.uv import UVMesh
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
    band: float = 0.05
    """Half-length of the rays about the mesh, world units."""
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
        self.band = self.settings.band
        self.cameras = look_at_box(self.box, np.asarray(view_origins, dtype=np.float64), self.settings.view_resolution).to(device)
        self.depth_maps = mesh_depth_maps(self.cameras, vertices, faces)

    def view_weights(self, points: Tensor, normals: Tensor) -> Tensor:
        """(P, K) weight of each view for each point: cos^4 of its angle to the normal where it sees the point
        (:func:`exports.raster.view_weight`, a quarter band of depth tolerance), else 0."""
        weights = torch.zeros(len(points), len(self.cameras), dtype=torch.float32, device=points.device)
        for k in range(len(self.cameras)):
            weights[:, k] = view_weight(self.cameras[k], self.depth_maps[k], points, normals, 0.25 * self.band, self.settings.min_cos, 4)[0]
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


class SolidProbe:
    """Whether world points lie inside a solid grid: trilinear lookup of ``grid`` (R, R, R, sampled over
    ``aabb`` (2, 3) as in :func:`exports.isosurface.sample_density_grid`) against ``level``."""

    def __init__(self, grid: np.ndarray, aabb: np.ndarray, level: float, device: torch.device | str = "cpu") -> None:
        self.volume = torch.as_tensor(np.ascontiguousarray(grid, dtype=np.float32), device=device)[None, None]
        box = torch.as_tensor(np.asarray(aabb, dtype=np.float32), device=device)
        self.low, self.size, self.level = box[0], box[1] - box[0], float(level)

    def values(self, points: Tensor) -> Tensor:
        """(P,) the grid trilinearly interpolated at ``points`` (P, 3) (0 outside the box)."""
        unit = (points.to(self.low) - self.low) / self.size * 2.0 - 1.0
        # grid_sample's last coordinate indexes the first axis of the volume: (x, y, z) grid -> (z, y, x) order.
        coords = unit.flip(-1).reshape(1, 1, 1, -1, 3)
        return torch.nn.functional.grid_sample(self.volume, coords, mode="bilinear", padding_mode="zeros", align_corners=True).view(-1)

    def inside(self, points: Tensor) -> Tensor:
        """(P,) bool: the interpolated grid value at ``points`` (P, 3) is at or above the level (outside the box: False)."""
        return self.values(points) >= self.level


def _ray_offsets(p: Tensor, n: Tensor, band: float, samples: int, probe: SolidProbe | None) -> tuple[Tensor, Tensor]:
    """The rays of :func:`normal_colours` for points ``p`` (R, 3) with unit normals ``n`` (R, 3): ``samples``
    midpoints (R, S) as signed offsets from the point along the normal (> 0 outside), from ``band`` outside
    (half or a quarter of it where ``probe`` puts that start inside another part) to ``band`` inside, and the
    sample widths (R, 1): rays of different lengths are sampled over their own length."""
    outside = torch.full((len(p),), band, dtype=torch.float32, device=p.device)
    if probe is not None:
        for fraction in (0.5, 0.25):
            outside = torch.where(probe.inside(p + outside[:, None] * n), band * fraction, outside)
    length = outside + band
    t = (torch.arange(samples, device=p.device, dtype=torch.float32) + 0.5) / samples
    return outside[:, None] - t[None] * length[:, None], (length / samples)[:, None]


def _composite(p: Tensor, n: Tensor, offsets: Tensor, widths: Tensor, sigma_fn: FieldFn) -> tuple[Tensor, Tensor]:
    """Sample positions (R, S, 3) at ``offsets`` (R, S) along the normals ``n`` from ``p`` and their compositing
    weights (R, S) under the density ``sigma_fn`` (world points (M, 3) -> (M,)), samples ``widths`` (R, 1) wide."""
    positions = p[:, None] + n[:, None] * offsets[..., None]
    sigma = sigma_fn(positions.reshape(-1, 3)).reshape(offsets.shape).float().nan_to_num(0.0).clamp_min(0.0)
    weights, _, _ = compositing_weights(sigma, widths.expand_as(sigma).contiguous())
    return positions, weights


def _normal_rays(
    p: Tensor, n: Tensor, density_fn: FieldFn, band: float, samples: int, probe: SolidProbe | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Marches the rays of :func:`normal_colours` for points ``p`` (R, 3) with unit normals ``n`` (R, 3):
    sample positions (R, S, 3), their signed offsets from the point along the normal (R, S; > 0 outside) and
    compositing weights (R, S)."""
    offsets, widths = _ray_offsets(p, n, band, samples, probe)
    positions, weights = _composite(p, n, offsets, widths, density_fn)
    return positions, offsets, weights


def _chunks(points: np.ndarray, normals: np.ndarray, rays: int, device: torch.device | str):
    """Yields (start, points (R, 3), unit normals (R, 3)) tensors on ``device``, ``rays`` at a time."""
    for start in range(0, len(points), rays):
        p = torch.as_tensor(np.asarray(points[start : start + rays], dtype=np.float32), device=device)
        n = torch.as_tensor(np.asarray(normals[start : start + rays], dtype=np.float32), device=device)
        yield start, p, torch.nn.functional.normalize(n, dim=-1)


@torch.no_grad()
def normal_colours(
    points: np.ndarray,
    normals: np.ndarray,
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    band: float,
    samples: int = 16,
    probe: SolidProbe | None = None,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (P, 3) in [0, 1] of surface ``points`` (P, 3) with outward ``normals`` (P, 3), rendered along the normal.

    Each point's ray runs from ``b`` outside the mesh to ``band`` inside it
    (world units), ``b`` the longest of ``band``, ``band / 2``, ``band / 4``
    whose start ``probe`` finds outside the solid (``band`` without a probe);
    ``samples`` samples per ray. ``density_fn`` / ``albedo_fn`` take world
    points on ``device``. Where the ray finds no opaque surface (opacity
    < 0.05) the albedo at the point is used. Returns the colours and a (P,)
    int array of how each was found: 1 = along the normal, 0 = point albedo.
    """
    colours = torch.zeros(len(points), 3, dtype=torch.float32)
    found = torch.zeros(len(points), dtype=torch.int64)
    for start, p, n in _chunks(points, normals, max(1, chunk_size // samples), device):
        positions, _, weights = _normal_rays(p, n, density_fn, band, samples, probe)
        opacity = weights.sum(dim=1)
        used = (weights > 1e-4 * opacity.clamp_min(1e-12)[:, None]).reshape(-1)
        albedo = torch.zeros(len(p) * samples, 3, device=p.device)
        if used.any():
            albedo[used] = albedo_fn(positions.reshape(-1, 3)[used]).reshape(-1, 3).float().nan_to_num(0.0)
        colour = ((weights[..., None] * albedo.view(len(p), samples, 3)).sum(dim=1) / opacity.clamp_min(1e-8)[:, None]).clamp(0.0, 1.0)
        hit = opacity > 0.05
        if (~hit).any():
            colour[~hit] = albedo_fn(p[~hit]).reshape(-1, 3).float().nan_to_num(0.0).clamp(0.0, 1.0)
        colours[start : start + len(p)] = colour.cpu()
        found[start : start + len(p)] = hit.long().cpu()
    return colours.numpy().astype(np.float64), found.numpy()


def _quantile_offsets(offsets: Tensor, weights: Tensor, quantiles: int) -> tuple[Tensor, Tensor]:
    """(R, Q) offsets of the first samples whose accumulated weight reaches (k + 0.5) / Q of each ray's opacity,
    and the opacities (R,)."""
    opacity = weights.sum(dim=1)
    fractions = (torch.arange(quantiles, dtype=weights.dtype, device=weights.device) + 0.5) / quantiles
    reached = weights.cumsum(dim=1)[:, None, :] >= (fractions[None, :, None] * opacity[:, None, None])
    return offsets.gather(1, reached.float().argmax(dim=2)), opacity


def _guided_offsets(
    p: Tensor, n: Tensor, density_fn: FieldFn, band: float, samples: int, probe: SolidProbe, quantiles: int
) -> tuple[Tensor, Tensor]:
    """:func:`surface_offsets` for one chunk, the field evaluated only near where the density grid puts the
    surface: the ray is marched through ``probe``'s grid first (no field calls), then the field at ``samples // 2``
    points over the half of the ray centred on the grid's median termination (the full ray's sample spacing).
    Rays whose window starts inside the surface or holds no surface are marched in full. (R, Q) offsets and (R,)
    opacities."""
    offsets, widths = _ray_offsets(p, n, band, 2 * samples, probe)
    _, weights = _composite(p, n, offsets, widths, probe.values)
    centre, _ = _quantile_offsets(offsets, weights, 1)
    fine = max(2, samples // 2)
    half = 0.5 * band
    step = 2.0 * half / fine
    window = centre + half - (torch.arange(fine, device=p.device, dtype=torch.float32) + 0.5)[None] * step
    _, weights = _composite(p, n, window, torch.full((1, 1), step, device=p.device), density_fn)
    depth, opacity = _quantile_offsets(window, weights, quantiles)
    # The window must start in free space and end behind the surface: else the full ray.
    redo = torch.nonzero((weights[:, 0] > 0.5 * opacity) | (opacity < 0.5)).reshape(-1)
    if len(redo):
        _, full_offsets, full_weights = _normal_rays(p[redo], n[redo], density_fn, band, samples, probe)
        depth[redo], opacity[redo] = _quantile_offsets(full_offsets, full_weights, quantiles)
    return depth, opacity


@torch.no_grad()
def surface_offsets(
    points: np.ndarray,
    normals: np.ndarray,
    density_fn: FieldFn,
    band: float,
    samples: int = 16,
    probe: SolidProbe | None = None,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
    quantiles: int = 1,
    guided: bool = False,
) -> np.ndarray:
    """Where the rays of :func:`normal_colours` terminate: (P, ``quantiles``) signed distances along the outward
    ``normals`` (P, 3) from ``points`` (P, 3) (world units, > 0 outside the mesh) at which the accumulated
    compositing weight reaches the fractions (k + 0.5) / quantiles of the ray's opacity (1: the median
    termination, on one of the surfaces a ray meets, where a mean would fall between two); NaN where the ray
    finds no opaque surface (opacity < 0.05).

    Only density is evaluated: ``samples`` calls per point, or with ``guided`` (and a ``probe``, whose grid
    holds the density near the surface) about half as many, on the half of the ray where the grid puts the
    surface. :func:`exports.bake.bake_colours` interpolates these offsets, found at a mesh's vertices,
    across its triangles and averages the colour at the quantiles: ``quantiles`` albedo calls per texel
    instead of a ray.
    """
    result = np.full((len(points), quantiles), np.nan, dtype=np.float64)
    for start, p, n in _chunks(points, normals, max(1, chunk_size // samples), device):
        if guided and probe is not None:
            depth, opacity = _guided_offsets(p, n, density_fn, band, samples, probe, quantiles)
        else:
            _, offsets, weights = _normal_rays(p, n, density_fn, band, samples, probe)
            depth, opacity = _quantile_offsets(offsets, weights, quantiles)
        depth = torch.where((opacity > 0.05)[:, None], depth, torch.full_like(depth, float("nan")))
        result[start : start + len(p)] = depth.double().cpu().numpy()
    return result


def vertex_surface(
    mesh: UVMesh,
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    band: float,
    samples: int = 16,
    probe: SolidProbe | None = None,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
    quantiles: int = 1,
    guided: bool = True,
) -> SurfaceLookup:
    """The normal bake's rays cast once per vertex of ``mesh`` (vertices split along UV seams are cast once):
    :func:`surface_offsets` at its vertices (``guided`` by the probe's grid) and a point lookup of
    ``albedo_fn``, for :func:`exports.bake.bake_colours`."""
    rows = np.concatenate([np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.normals, dtype=np.float64)], axis=1)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    offsets = surface_offsets(unique[:, :3], unique[:, 3:], density_fn, band, samples, probe, chunk_size, device, quantiles, guided)
    return SurfaceLookup(offsets[inverse.reshape(-1)], point_lookup(albedo_fn, chunk_size, device))
