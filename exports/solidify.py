"""Solid occupancy before meshing: one solid piece, no cavities, nothing no camera saw.

A radiance field is only constrained where cameras see it; inside an object
its density is arbitrary and around it float small opaque specks, so
marching cubes on the raw density meshes nested inner shells and floaters.
Here the grid is turned into a *solid*: the occupied points (density at or
above the surface level) that some camera can see, reduced to the largest
connected pieces, with every point that empty space from outside cannot
reach filled. Marching cubes on :func:`solid_grid`'s result is the boundary
of that solid, so it is one closed, outward-oriented surface by construction.

Empty space is flood-filled from the box boundary (6-connected) through the
empty points eroded by ``hole_voxels`` (paths must be 2 * hole_voxels + 1
points wide), so holes in the shell smaller than that do not let it in; the
reached region is then grown back into the empty space it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure, label

Carve = Callable[[np.ndarray], np.ndarray]
"""Grid (R, R, R) -> (R, R, R) bool mask of seen-free points, as :func:`exports.carve.seen_free` gives it."""


def outside_region(occupied: np.ndarray, hole_voxels: int = 1, free: np.ndarray | None = None, regrow: int = 0) -> np.ndarray:
    """Grid points (R, R, R) bool reachable from outside the box through empty (not ``occupied``) points.

    Points beyond the box count as empty. Passages narrower than
    ``2 * hole_voxels + 1`` points are closed (0 = any 6-connected path).
    With ``free`` (R, R, R) bool (e.g. :func:`exports.carve.seen_free`), the
    flood passes only through free points, then grows back into the empty
    points around what it reached by ``regrow`` more steps (the band in
    front of the surface that ``free`` leaves out; a hole in the shell
    becomes a dimple at most ``hole_voxels + regrow`` steps deep).
    """
    empty = np.pad(~occupied, 1, constant_values=True)
    passable = binary_erosion(empty, iterations=hole_voxels, border_value=1) if hole_voxels > 0 else empty
    if free is not None:
        passable &= np.pad(free, 1, constant_values=True)
    labels, _ = label(passable)
    # The padding layer is passable and connected, so its label is the outside.
    reached = labels == labels[0, 0, 0]
    if hole_voxels + regrow > 0:
        reached = binary_dilation(reached, iterations=hole_voxels + regrow, mask=empty)
    return reached[1:-1, 1:-1, 1:-1]


def largest_pieces(occupied: np.ndarray, min_ratio: float = 0.0) -> np.ndarray:
    """``occupied`` (R, R, R) bool reduced to its largest 26-connected piece and the pieces with at least
    ``min_ratio`` x its point count (0 keeps only the largest)."""
    labels, count = label(occupied, structure=generate_binary_structure(3, 3))
    if count <= 1:
        return occupied.copy()
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    keep = sizes >= max(min_ratio * sizes.max(), 1)
    keep[np.argmax(sizes)] = True
    keep[0] = False
    return keep[labels]


def solidify(grid: np.ndarray, level: float, hole_voxels: int = 1) -> tuple[np.ndarray, int]:
    """``grid`` (R, R, R) with every point not reachable from outside raised to at least 2 x ``level``.

    Returns the new grid and the number of points raised. Marching cubes on
    the result gives only the outer surface: no nested shells, no interior
    bubbles, small holes in the shell closed.
    """
    occupied = grid >= level
    inside = ~outside_region(occupied, hole_voxels) & ~occupied
    filled = grid.copy()
    filled[inside] = max(2.0 * float(level), float(level) + 1.0)
    return filled, int(inside.sum())


@dataclass
class SolidStats:
    """What :func:`solid_grid` changed, in grid points: ``unseen`` occupied points no camera sees,
    ``floaters`` occupied points in the pieces dropped, ``filled`` empty points filled as interior."""

    unseen: int
    floaters: int
    filled: int


def solid_grid(
    grid: np.ndarray, level: float, hole_voxels: int = 1, min_ratio: float = 0.0, seen: np.ndarray | None = None,
    carve: Carve | None = None, regrow: int = 0,
) -> tuple[np.ndarray, SolidStats]:
    """``grid`` (R, R, R) changed so that its points at or above ``level`` are exactly one solid.

    The solid: the occupied points (``grid >= level``) inside ``seen`` (R, R, R)
    bool, the points some camera sees; None = all), kept only in the largest
    26-connected piece and pieces of at least ``min_ratio`` x its size, plus
    everything that outside empty space cannot reach (:func:`outside_region`). With ``carve``, a function of
    the grid without the dropped pieces returning the free mask of :func:`exports.carve.seen_free`, outside
    space passes only through free points and grows back ``regrow`` steps.
    Values keep their sub-voxel information: solid points get at least a hair
    above ``level``, all others at most a hair below it (dropped pieces: 0),
    so marching cubes at ``level`` meshes exactly the solid's boundary.
    """
    level = float(level)
    occupied = grid >= level
    unseen = 0
    if seen is not None:
        unseen = int((occupied & ~seen).sum())
        occupied &= seen
    kept = largest_pieces(occupied, min_ratio)
    floaters = int(occupied.sum() - kept.sum())
    above, below = level + max(1e-4 * abs(level), 1e-6), level - max(1e-4 * abs(level), 1e-6)
    result = np.minimum(grid, below).astype(np.float32)
    result[occupied & ~kept] = min(0.0, below)
    result[kept] = np.maximum(grid[kept], above)
    free = None
    if carve is not None:
        # Without the dropped pieces' 2-point halo of sub-level density, which would still stop the carving rays.
        halo = binary_dilation(occupied & ~kept, iterations=2) & ~binary_dilation(kept, iterations=2)
        free = carve(np.where(halo, 0.0, result).astype(np.float32))
    inside = ~outside_region(kept, hole_voxels, free, regrow if carve is not None else 0) & ~kept
    result[inside] = max(2.0 * level, level + 1.0)
    return result, SolidStats(unseen, floaters, int(inside.sum()))
