"""The one world -> export-file transform used by every mesh writer.

recon's world frame (recon/cameras.py) is right-handed, +Y up, and the
photographed side of the object faces +Z. That is exactly glTF's frame
("+Y up, the front of an asset faces +Z"), and OBJ/PLY files carry no frame
of their own: importers (Blender included) read them as Y-up by default. So
the rotation is the identity today; it still lives here, in one place, so a
writer never invents its own axis swap.
"""

from __future__ import annotations

import numpy as np

EXPORT_ROTATION = np.eye(3)
"""(3, 3) proper rotation (det +1) taking world coordinates to file coordinates."""


def to_export_frame(vertices: np.ndarray, normals: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps world positions (V, 3) and optional normals (V, 3) into the export frame.

    The map is a rotation (det +1, no mirror), so triangle winding and
    outward normals are preserved; normals are rotated without translation.
    """
    vertices = np.asarray(vertices, dtype=np.float64) @ EXPORT_ROTATION.T
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64) @ EXPORT_ROTATION.T
    return vertices, normals
