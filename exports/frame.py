"""The one world -> export-file transform used by every mesh writer.

recon's world frame (recon/cameras.py) is right-handed, +Y up, and the
photographed side of the object faces +Z. That is exactly glTF's frame
("+Y up, the front of an asset faces +Z"), and OBJ/PLY files carry no frame
of their own: importers (Blender included) read them as Y-up by default. So a
single-image fit exports with the identity. Scenes fitted from posed images
keep their capture's world frame, and Blender / NeRF-synthetic captures are
+Z up (front facing -Y); ``up_axis="+z"`` rotates such a scene so that its
up becomes the file's +Y (and its -Y front the file's +Z front). Either way
the map is a proper rotation, and it lives here so a writer never invents
its own axis swap.
"""

from __future__ import annotations

import numpy as np

EXPORT_ROTATIONS: dict[str, np.ndarray] = {
    "+y": np.eye(3),
    # (x, y, z) -> (x, z, -y): a -90 deg turn about +X.
    "+z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}
"""Scene up axis (in world coordinates) -> (3, 3) proper rotation (det +1) taking world coordinates to file coordinates."""

UP_AXES = tuple(EXPORT_ROTATIONS)


def to_export_frame(
    vertices: np.ndarray, normals: np.ndarray | None = None, up_axis: str = "+y"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps world positions (V, 3) and optional normals (V, 3) into the export frame of a scene whose
    up is the world's ``up_axis`` ("+y" or "+z").

    The map is a rotation (det +1, no mirror), so triangle winding and
    outward normals are preserved; normals are rotated without translation.
    """
    rotation = EXPORT_ROTATIONS[up_axis]
    vertices = np.asarray(vertices, dtype=np.float64) @ rotation.T
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64) @ rotation.T
    return vertices, normals


def dominant_up_axis(camera_up: np.ndarray) -> str:
    """The scene up axis ("+y" or "+z") that the cameras' up vectors (N, 3), world coordinates, agree with most.

    Cameras of an object capture are held roughly upright, so their mean up
    vector points near the scene's up (+Y for recon's own data, +Z for
    Blender / NeRF-synthetic renders).
    """
    mean_up = np.asarray(camera_up, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return "+z" if mean_up[2] > mean_up[1] else "+y"
