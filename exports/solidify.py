"""Solid interior before marching cubes: everything that empty space from outside cannot reach is filled.

A radiance field is only constrained where cameras see it; inside an object
its density is arbitrary, so marching cubes on it meshes nested inner
shells. Here the grid points below the surface level are flood-filled from
the box boundary (6-connected); empty pockets the flood does not reach are
inside the object and are raised above the level. The flood runs through
empty space eroded by ``hole_voxels`` (paths must be 2 * hole_voxels + 1
points wide), so holes in the shell smaller than that do not let it in;
the reached region is then grown back into the empty space it came from.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, label


def outside_region(occupied: np.ndarray, hole_voxels: int = 1) -> np.ndarray:
    """Grid points (R, R, R) bool reachable from outside the box through empty (not ``occupied``) points.

    Points beyond the box count as empty. Passages narrower than
    ``2 * hole_voxels + 1`` points are closed (0 = any 6-connected path).
    """
    empty = np.pad(~occupied, 1, constant_values=True)
    passable = binary_erosion(empty, iterations=hole_voxels, border_value=1) if hole_voxels > 0 else empty
    labels, _ = label(passable)
    # The padding layer is passable and connected, so its label is the outside.
    reached = labels == labels[0, 0, 0]
    if hole_voxels > 0:
        reached = binary_dilation(reached, iterations=hole_voxels, mask=empty)
    return reached[1:-1, 1:-1, 1:-1]


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
