"""Free space seen by cameras: which grid points some camera sees in front of the surface the field renders.

A fitted field is only constrained where cameras look; behind its opaque
surface the density is arbitrary, and where it dips below the surface level
the thresholded shell has holes that open the unseen interior to the
outside. A flood fill of empty space from the box boundary then runs in
through those holes and marching cubes meshes the insides as deep tunnels:
handles (negative Euler characteristic) and inner surface area.

Here each camera renders the density grid as a depth map (the distance
along each pixel's ray where the accumulated opacity first reaches a small
value: the first matter along the ray), and a grid point counts as *seen
free* when some camera sees it at least ``margin`` in front of its pixel's
depth. Density below :data:`FOG_FRACTION` of the surface level is left out
of these renders: a fitted field's faint haze, summed over a whole ray,
would otherwise stop every ray near the box and hide all free space. Points behind the rendered surface in every view that sees
them are never seen free, so a flood through seen-free space
(:func:`exports.solidify.solid_grid`) cannot enter the unseen interior
through a hole in the shell, whatever the hole's size; concavities that the
cameras look into stay open.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recon.cameras import Cameras, generate_rays
from recon.exports.project import SolidProbe
from recon.exports.raster import project
from recon.render.samplers import ray_aabb_intersect

FOG_FRACTION = 0.1
"""Density below this fraction of the surface level is haze, not matter, for the carving renders (a hole in a
fitted shell is usually well above it: the field renders it nearly opaque)."""


@torch.no_grad()
def depth_maps(
    grid: np.ndarray, aabb: np.ndarray, cameras: Cameras, resolution: int = 128, opacity: float = 0.5,
    device: torch.device | str = "cpu", rays_per_chunk: int = 16_384,
) -> tuple[Cameras, Tensor]:
    """Depth maps of a density grid seen by ``cameras``: where each pixel's ray first gathers ``opacity``.

    ``grid`` (X, Y, Z) density per world unit on the points spanning ``aabb``
    (2, 3) corner to corner (as :func:`exports.isosurface.sample_density_grid`);
    the cameras are rendered at ``resolution`` pixels on their longer side.
    Each ray is marched in steps of half a grid step through the box with
    trilinear density; its depth is the distance from the camera centre
    where the accumulated opacity first reaches ``opacity`` (inf where it
    never does). Returns the resized cameras and the depths (N, H, W).
    """
    scale = resolution / max(cameras.height, cameras.width)
    small = cameras.resized(max(1, round(cameras.height * scale)), max(1, round(cameras.width * scale))).to(device)
    density = SolidProbe(np.maximum(grid, 0.0), aabb, 0.0, device)  # its trilinear lookup of the grid
    box = torch.as_tensor(aabb, dtype=torch.float32, device=device)
    step = 0.5 * float(((box[1] - box[0]) / (torch.tensor(grid.shape, device=device) - 1)).min())
    length = float((box[1] - box[0]).norm())
    samples = max(2, int(np.ceil(length / step)))
    origins, directions = generate_rays(small)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    depth = torch.full((len(origins),), float("inf"), device=device)
    offsets = (torch.arange(samples, device=device, dtype=torch.float32) + 0.5) * step
    threshold = -float(np.log(1.0 - opacity))
    for start in range(0, len(origins), rays_per_chunk):
        o, d = origins[start : start + rays_per_chunk], directions[start : start + rays_per_chunk]
        near, far, hit = ray_aabb_intersect(o, d, box)
        if not hit.any():
            continue
        o, d, near, far = o[hit], d[hit], near[hit], far[hit]
        t = near[:, None] + offsets[None]
        points = o[:, None] + d[:, None] * t[..., None]
        sigma = density.values(points.reshape(-1, 3)).reshape(len(o), samples) * (t < far[:, None])
        tau = torch.cumsum(sigma * step, dim=1)
        reached = tau >= threshold
        first = torch.where(reached.any(dim=1), reached.float().argmax(dim=1), torch.full_like(near, -1).long())
        found = first >= 0
        result = torch.full((len(o),), float("inf"), device=device)
        result[found] = t[found, first[found]]
        chunk = depth[start : start + rays_per_chunk]
        chunk[hit] = result
    return small, depth.reshape(len(small), small.height, small.width)


@torch.no_grad()
def seen_free(
    grid: np.ndarray, aabb: np.ndarray, level: float, cameras: Cameras, margin: float, resolution: int = 128,
    device: torch.device | str = "cpu", opacity: float = 0.02,
) -> np.ndarray:
    """(X, Y, Z) bool: the empty grid points (``grid < level``) that some camera sees at least ``margin`` (world
    units) in front of the surface it renders there (:func:`depth_maps`), or that lie outside every camera's view
    (nothing says they are inside). The surface is where a ray's opacity first reaches ``opacity``: a low value, the first
    matter along the ray, so a hole that the field renders partly transparent still counts as shell (free space
    is the union over cameras, so a faint floater hides nothing that another camera sees past)."""
    matter = np.where(grid >= FOG_FRACTION * level, grid, 0.0)
    small, depths = depth_maps(matter, aabb, cameras, resolution, opacity, device=device)
    empty = grid < level
    index = np.argwhere(empty)
    free = np.zeros(grid.shape, dtype=bool)
    if len(index) == 0:
        return free
    step = (aabb[1] - aabb[0]) / (np.array(grid.shape) - 1)
    seen_by_any = torch.zeros(len(index), dtype=torch.bool, device=device)
    in_front = torch.zeros(len(index), dtype=torch.bool, device=device)
    chunk = 1 << 20
    for start in range(0, len(index), chunk):
        points = torch.as_tensor(aabb[0] + index[start : start + chunk] * step, dtype=torch.float32, device=device)
        for k in range(len(small)):
            camera = small[k]
            col, row, z = project(camera, points)
            ic, ir = col.round().long(), row.round().long()
            inside = (z > 0) & (ic >= 0) & (ic < camera.width) & (ir >= 0) & (ir < camera.height)
            distance = (points - camera.c2w[0, :3, 3]).norm(dim=-1)
            surface = depths[k][ir.clamp(0, camera.height - 1), ic.clamp(0, camera.width - 1)]
            seen_by_any[start : start + chunk] |= inside
            in_front[start : start + chunk] |= inside & (distance < surface - margin)
    free[tuple(index.T)] = (in_front | ~seen_by_any).cpu().numpy()
    return free
