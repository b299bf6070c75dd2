"""Density field -> triangle mesh: sample a grid over the bounding box, run marching cubes.

Marching cubes is scikit-image's Lewiner variant (topologically consistent:
a closed, manifold surface for a grid padded with empty space). Its
triangles' right-hand normals point towards *increasing* values, so they are
flipped: with a density (high inside) the normals point outward and the
signed volume is positive (checked by tests/test_exports_isosurface.py on a
sphere).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import trimesh
from scipy.ndimage import binary_dilation

from recon.errors import ReconError
from recon.progress import warn

DensityFn = Callable[[torch.Tensor], torch.Tensor]


def as_aabb(aabb: torch.Tensor | np.ndarray | list) -> np.ndarray:
    """The box as a float64 (2, 3) array [min corner, max corner]; raises on a malformed box."""
    box = np.asarray(aabb.detach().cpu() if isinstance(aabb, torch.Tensor) else aabb, dtype=np.float64)
    if box.shape != (2, 3) or not np.all(box[1] > box[0]):
        raise ReconError(f"aabb must be (2, 3) [min, max] with max > min, got {box.tolist()}")
    return box


def _sample_axes(density_fn: DensityFn, axes: list[torch.Tensor], chunk_size: int, device: torch.device | str) -> np.ndarray:
    """Density on the tensor-product grid of per-axis coordinates ``axes`` (3 x (n_a,)), (n_x, n_y, n_z) float32."""
    grid = np.empty(len(axes[0]) * len(axes[1]) * len(axes[2]), dtype=np.float32)
    # One x-slab chunk at a time keeps memory at chunk_size points.
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
    slabs = max(1, chunk_size // yz.shape[0])
    for start in range(0, len(axes[0]), slabs):
        xs = axes[0][start : start + slabs]
        points = torch.cat([xs.repeat_interleave(yz.shape[0])[:, None], yz.repeat(len(xs), 1)], dim=1)
        values = density_fn(points.to(device)).reshape(-1).float().cpu().numpy()
        grid[start * yz.shape[0] : (start + len(xs)) * yz.shape[0]] = values
    return grid.reshape(len(axes[0]), len(axes[1]), len(axes[2]))


@torch.no_grad()
def sample_density_grid(
    density_fn: DensityFn,
    aabb: torch.Tensor | np.ndarray,
    resolution: int,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Density at the ``resolution``^3 grid points spanning ``aabb`` corner to corner, (R, R, R) float32.

    Axis order is (x, y, z); point (i, j, k) is ``min + (i, j, k) * (max - min) / (R - 1)``.
    Non-finite densities are replaced by 0 with a warning.
    """
    box = as_aabb(aabb)
    axes = [torch.linspace(float(box[0, a]), float(box[1, a]), resolution, dtype=torch.float32) for a in range(3)]
    grid = _sample_axes(density_fn, axes, chunk_size, device)
    bad = ~np.isfinite(grid)
    if bad.any():
        warn(f"{int(bad.sum())} non-finite density values replaced by 0 before marching cubes")
        grid[bad] = 0.0
    return grid


def auto_threshold(grid: np.ndarray, spacing: np.ndarray | float = 1.0, optical_depth: float = 1.0, quantile: float = 0.25) -> float:
    """A surface level chosen from the density distribution: where volume rendering puts the surface.

    Axis-aligned rays are marched through the grid from all six sides,
    accumulating optical depth (density x ``spacing``, the world length of a
    grid step per axis; density is per world unit as in the renderer). On
    every ray that becomes opaque, the density of the grid point where the
    accumulated optical depth first reaches ``optical_depth`` (transmittance
    e^-1) is recorded; the level is the ``quantile`` of these densities (a
    low quantile, so an opaque part whose density is lower than the rest's
    still gets a surface). It is capped at half the 99.9th-percentile density so a hard density step gets
    its surface mid-way across the step. A field that no ray finds opaque
    gets that cap with a warning.
    """
    grid = np.nan_to_num(np.asarray(grid, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = float(np.percentile(grid, 99.9))
    if top <= 0.0:
        raise ReconError("the density field is empty (no positive density in the box); nothing to export")
    steps = np.broadcast_to(np.asarray(spacing, dtype=np.float32), (3,))
    samples = []
    for axis in range(3):
        tau = grid * steps[axis]
        for flipped in (False, True):
            t = np.flip(tau, axis=axis) if flipped else tau
            after = np.cumsum(t, axis=axis, dtype=np.float32)
            crossing = (after >= optical_depth) & (after - t < optical_depth)
            values = np.flip(grid, axis=axis) if flipped else grid
            samples.append(values[crossing])
    crossings = np.concatenate(samples)
    if crossings.size == 0:
        warn("no ray through the density grid becomes opaque; using half the peak density as the surface level")
        return 0.5 * top
    return float(min(np.quantile(crossings, quantile), 0.5 * top))


def marching_cubes(grid: np.ndarray, aabb: torch.Tensor | np.ndarray, threshold: float) -> trimesh.Trimesh:
    """Isosurface of ``grid`` (R, R, R, sampled as in :func:`sample_density_grid`) at ``threshold``, world units.

    The grid is padded with one layer of empty space so surfaces cut by the
    box are closed. Normals point towards lower density (outward); vertices
    on shared cube edges are shared (no merging needed).
    """
    from skimage.measure import marching_cubes as lewiner

    box = as_aabb(aabb)
    resolution = np.array(grid.shape, dtype=np.float64)
    low, high = float(np.min(grid)), float(np.max(grid))
    if not high > float(threshold):
        raise ReconError(f"no surface at density level {threshold:.4g} (grid range {low:.4g} .. {high:.4g}); set export.threshold")
    padded = np.pad(grid.astype(np.float32), 1, mode="constant", constant_values=min(0.0, float(threshold) - 1.0))
    vertices, faces, _, _ = lewiner(padded, float(threshold), method="lewiner", allow_degenerate=False)
    spacing = (box[1] - box[0]) / (resolution - 1)
    vertices = box[0] + (vertices.astype(np.float64) - 1.0) * spacing
    vertices = np.clip(vertices, box[0], box[1])
    return trimesh.Trimesh(vertices=vertices, faces=faces[:, ::-1].astype(np.int64), process=False)


def crop_to_surface(grid: np.ndarray, aabb: np.ndarray, level: float, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``grid`` (sampled over ``aabb`` as in :func:`sample_density_grid`) around its points at or above
    ``level``, with ``margin`` grid points around them, and that part's box: the same grid spacing, less work
    for what follows. A grid with no such point is returned whole."""
    box = as_aabb(aabb)
    occupied = np.nonzero(grid >= level)
    if len(occupied[0]) == 0:
        return grid, box
    low = np.array([max(int(axis.min()) - margin, 0) for axis in occupied])
    high = np.array([min(int(axis.max()) + margin, size - 1) for axis, size in zip(occupied, grid.shape)])
    step = (box[1] - box[0]) / (np.array(grid.shape) - 1)
    part = grid[low[0] : high[0] + 1, low[1] : high[1] + 1, low[2] : high[2] + 1]
    return np.ascontiguousarray(part), np.stack([box[0] + low * step, box[0] + high * step])


def _interpolate_axis(values: torch.Tensor, coarse: np.ndarray, size: int, axis: int) -> torch.Tensor:
    """Linear interpolation of ``values`` along ``axis`` from grid indices ``coarse`` to 0..size-1."""
    fine = np.arange(size, dtype=np.float64)
    upper = np.clip(np.searchsorted(coarse, fine, side="right"), 1, len(coarse) - 1)
    lower = upper - 1
    t = torch.as_tensor((fine - coarse[lower]) / (coarse[upper] - coarse[lower]), dtype=torch.float32, device=values.device)
    shape = [1, 1, 1]
    shape[axis] = size
    t = t.reshape(shape)
    pick = [torch.as_tensor(index, device=values.device) for index in (lower, upper)]
    return values.index_select(axis, pick[0]) * (1.0 - t) + values.index_select(axis, pick[1]) * t


@torch.no_grad()
def sample_density_near_surface(
    density_fn: DensityFn,
    aabb: torch.Tensor | np.ndarray,
    resolution: int,
    threshold: float | None = None,
    stride: int = 4,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, float, float]:
    """The (R, R, R) density grid of :func:`sample_density_grid`, evaluated exactly only near the surface.

    The field is first sampled on every ``stride``-th grid point; the surface
    level is chosen there (:func:`auto_threshold`) unless ``threshold`` is
    given. Coarse cells that may hold the surface (some corner at least a
    quarter of the level and some corner below it), grown by one cell, are
    then evaluated at full resolution; the rest of the grid is interpolated
    trilinearly from the coarse samples (well inside or well outside, where
    no surface is lost). ``stride`` 1 evaluates every point. The grid is
    assembled on ``device`` (one copy to the CPU at the end). Returns the grid,
    the level and the fraction of grid points evaluated.
    """
    box = as_aabb(aabb)
    if stride <= 1 or resolution <= 2 * stride:
        grid = sample_density_grid(density_fn, box, resolution, chunk_size, device)
        spacing = (box[1] - box[0]) / (resolution - 1)
        level = auto_threshold(grid, spacing) if threshold is None else float(threshold)
        return grid, level, 1.0
    coarse = np.unique(np.append(np.arange(0, resolution, stride), resolution - 1))
    axes = [torch.linspace(float(box[0, a]), float(box[1, a]), resolution, dtype=torch.float32) for a in range(3)]
    small = _sample_axes(density_fn, [axes[a][torch.as_tensor(coarse)] for a in range(3)], chunk_size, device)
    small = np.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)
    # The coarse grid is uniform but for a shorter last step; its mean step is close enough for the level.
    level = auto_threshold(small, (box[1] - box[0]) / (len(coarse) - 1)) if threshold is None else float(threshold)
    grid = torch.as_tensor(small, device=device)
    for axis in range(3):
        grid = _interpolate_axis(grid, coarse, resolution, axis)
    grid = grid.contiguous()
    # Coarse cells (between consecutive coarse points) that may hold the surface.
    n = len(coarse) - 1
    corners = [small[i : n + i, j : n + j, k : n + k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    high, low = np.max(corners, axis=0), np.min(corners, axis=0)
    near = torch.as_tensor(binary_dilation((high >= 0.25 * level) & (low < level), iterations=1), device=device)
    # Fine points inside (or on the border of) a chosen cell: a border point belongs to the cells on both sides.
    fine = np.arange(resolution)
    sides = [
        torch.as_tensor(np.clip(np.searchsorted(coarse, fine, side=side) - 1, 0, n - 1), device=device) for side in ("right", "left")
    ]
    wanted = torch.zeros((resolution,) * 3, dtype=torch.bool, device=device)
    for a in sides:
        for b in sides:
            for c in sides:
                wanted |= near.index_select(0, a).index_select(1, b).index_select(2, c)
    index = torch.nonzero(wanted)
    device_axes = [axis.to(device) for axis in axes]
    for start in range(0, len(index), chunk_size):
        block = index[start : start + chunk_size]
        points = torch.stack([device_axes[a][block[:, a]] for a in range(3)], dim=1)
        grid[block[:, 0], block[:, 1], block[:, 2]] = density_fn(points).reshape(-1).float()
    grid = grid.cpu().numpy()
    bad = ~np.isfinite(grid)
    if bad.any():
        warn(f"{int(bad.sum())} non-finite density values replaced by 0 before marching cubes")
        grid[bad] = 0.0
    return grid, level, (len(coarse) ** 3 + len(index)) / resolution**3


def resample_grid(grid: np.ndarray, factor: float, device: torch.device | str = "cpu") -> np.ndarray:
    """``grid`` (X, Y, Z) resampled trilinearly to ``round(factor * size)`` points per axis (at least 2), its
    corner points kept where they are (so it spans the same box, as scipy's ``zoom(order=1)``); on ``device``."""
    size = [max(2, round(factor * s)) for s in grid.shape]
    values = torch.as_tensor(np.ascontiguousarray(grid, dtype=np.float32), device=device)[None, None]
    return torch.nn.functional.interpolate(values, size=size, mode="trilinear", align_corners=True)[0, 0].cpu().numpy()


def extract_mesh(
    density_fn: DensityFn,
    aabb: torch.Tensor | np.ndarray,
    resolution: int = 256,
    threshold: float | None = None,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
) -> tuple[trimesh.Trimesh, float]:
    """Marching-cubes mesh of ``density_fn`` over ``aabb`` and the level used (``threshold`` or the automatic one).

    ``density_fn(points (P, 3) world, on ``device``) -> (P,)``.
    """
    grid = sample_density_grid(density_fn, aabb, resolution, chunk_size, device)
    box = as_aabb(aabb)
    level = auto_threshold(grid, (box[1] - box[0]) / (resolution - 1)) if threshold is None else float(threshold)
    return marching_cubes(grid, aabb, level), level
