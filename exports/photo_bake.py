"""Texture from the training photos: each surface point takes the colour the posed photos show at it.

For fit-views the photos are the best record of the object's colour: the
field only approximates them (finite hash grid, a few thousand steps), so a
texture baked from the field is blurrier than the photos it was fitted to.
Here every query point on the exported mesh (a texel or a vertex) is
projected into each photo; a photo counts where it sees the point (a
z-buffer of the mesh in that camera, :mod:`exports.raster`, within a depth
tolerance), where the point faces it (cosine of the angle between the normal
and the direction to the camera above ``min_cos``) and where the photo shows
the object there (alpha, eroded by a pixel so silhouette pixels mixed with
the background are not used). The colour is the photos' bilinear RGB,
averaged with weights cos^``power``. Points that no photo sees get the
fallback colour (the field's bake); :func:`exports.bake.bake_colours` then
dilates across seams as for any colour function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.cameras import Cameras
from recon.exports.raster import mesh_depth_maps, view_weight


@dataclass
class PhotoSettings:
    """How :class:`PhotoProjector` weighs the photos (module defaults; the export pipeline sets depth_tolerance to
    two grid steps)."""

    power: float = 4.0
    """Weight of a photo: cos^power of the angle between the surface normal and the direction to its camera."""
    min_cos: float = 0.2
    """Photos that see the surface more obliquely than this cosine are not used."""
    depth_tolerance: float = 0.01
    """A point is visible in a photo when it is at most this far (world units) behind the mesh's z-buffer there,
    plus two pixel footprints along the slope."""
    min_alpha: float = 0.99
    """Photo pixels (and their 8 neighbours) must be at least this opaque to be used."""


class PhotoProjector:
    """Posed photos and the exported mesh's z-buffer in each of them, computed once.

    ``vertices`` (V, 3) / ``faces`` (F, 3): the exported mesh, world units;
    ``images`` (N, H, W, 4) straight-alpha RGBA in [0, 1]; ``cameras``: the N
    photos' cameras in the same world frame.
    """

    def __init__(
        self, vertices: np.ndarray, faces: np.ndarray, images: Tensor, cameras: Cameras,
        settings: PhotoSettings | None = None, device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings or PhotoSettings()
        self.cameras = cameras.to(device)
        images = torch.as_tensor(images, dtype=torch.float32).to(device)
        # (N, 3, H, W) colour for grid_sample; alpha eroded by one pixel (3x3 minimum).
        self.rgb = images[..., :3].permute(0, 3, 1, 2).contiguous()
        alpha = images[..., 3][:, None]
        self.solid = -torch.nn.functional.max_pool2d(-alpha, 3, stride=1, padding=1)[:, 0] >= self.settings.min_alpha
        self.depth = mesh_depth_maps(self.cameras, vertices, faces)

    @torch.no_grad()
    def colours(self, points: np.ndarray, normals: np.ndarray, chunk: int = 131_072) -> tuple[np.ndarray, np.ndarray]:
        """Colour (P, 3) in [0, 1] of ``points`` (P, 3) with outward unit ``normals`` (P, 3) from the photos, and
        the summed weight (P,) of the photos used (0 = no photo sees the point; its colour is then 0)."""
        device = self.depth.device
        s = self.settings
        out = np.zeros((len(points), 3), dtype=np.float64)
        total = np.zeros(len(points), dtype=np.float64)
        for start in range(0, len(points), chunk):
            p = torch.as_tensor(np.asarray(points[start : start + chunk], dtype=np.float32), device=device)
            n = torch.nn.functional.normalize(torch.as_tensor(np.asarray(normals[start : start + chunk], dtype=np.float32), device=device), dim=-1)
            colour = torch.zeros(len(p), 3, device=device)
            weight = torch.zeros(len(p), device=device)
            for k in range(len(self.cameras)):
                camera = self.cameras[k]
                w, col, row = view_weight(camera, self.depth[k], p, n, s.depth_tolerance, s.min_cos, s.power)
                ic, ir = col.round().long().clamp(0, camera.width - 1), row.round().long().clamp(0, camera.height - 1)
                w = torch.where(self.solid[k][ir, ic], w, torch.zeros_like(w))
                if not (w > 0).any():
                    continue
                grid = torch.stack([(col + 0.5) / camera.width * 2 - 1, (row + 0.5) / camera.height * 2 - 1], dim=-1)
                sampled = torch.nn.functional.grid_sample(self.rgb[k : k + 1], grid[None, None], align_corners=False, padding_mode="border")
                colour += w[:, None] * sampled[0, :, 0].T
                weight += w
            seen = weight > 0
            colour[seen] /= weight[seen, None]
            out[start : start + len(p)] = colour.clamp(0.0, 1.0).cpu().numpy()
            total[start : start + len(p)] = weight.cpu().numpy()
        return out, total


def with_photos(projector: PhotoProjector, fallback, coverage: list[float] | None = None):
    """A colour function (points, normals) -> (P, 3): the photos' colour where a photo sees the point, else
    ``fallback(points, normals)`` (the field's bake). Appends the fraction of points coloured from photos to
    ``coverage`` (one entry per call) when given."""

    def colours(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        result, weight = projector.colours(points, normals)
        missing = weight <= 0
        if missing.any():
            result[missing] = fallback(points[missing], normals[missing])
        if coverage is not None:
            coverage.append(float(1.0 - missing.mean()) if len(points) else 0.0)
        return result

    return colours
