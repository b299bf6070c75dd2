"""Bake colour into a UV texture, without OpenGL.

Every triangle is rasterised in UV space (texel centres inside the
triangle, numpy), the barycentric coordinates of each covered texel give
its world position and normal on the mesh, and a colour function is
evaluated there: by projection of the field's renders
(:func:`exports.project.surface_colours`) or by point lookup of the albedo. Empty texels next to charts are then filled by dilation so bilinear
filtering and mip-mapping do not pull in the background along seams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_cdt

from recon.exports.uv import UVMesh

AlbedoFn = Callable[[torch.Tensor], torch.Tensor]


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, resolution: int, max_candidates: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, and where.

    ``uv`` (V, 2) in [0, 1] (v up), ``faces`` (F, 3). Returns ``face_index``
    (H, W) int64 (-1 = empty) and ``barycentric`` (H, W, 3) float64, with
    H = W = ``resolution``; texel (row, col) has its centre at
    u = (col + 0.5) / W, v = 1 - (row + 0.5) / H. Where triangles overlap the
    later one wins.
    """
    size = resolution
    face_index = np.full((size, size), -1, dtype=np.int64)
    barycentric = np.zeros((size, size, 3), dtype=np.float64)
    # Triangle corners in texel coordinates where integers are texel centres.
    corners = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=-1)[faces]
    x0 = np.clip(np.ceil(corners[..., 0].min(axis=1) - 1e-9), 0, size - 1).astype(np.int64)
    x1 = np.clip(np.floor(corners[..., 0].max(axis=1) + 1e-9), 0, size - 1).astype(np.int64)
    y0 = np.clip(np.ceil(corners[..., 1].min(axis=1) - 1e-9), 0, size - 1).astype(np.int64)
    y1 = np.clip(np.floor(corners[..., 1].max(axis=1) + 1e-9), 0, size - 1).astype(np.int64)
    width, height = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    area = width * height
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    denominator = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    valid = np.abs(denominator) > 1e-12
    order = np.nonzero(valid & (area > 0))[0]
    # Batches of triangles whose bounding boxes hold at most max_candidates texels together.
    cumulative = np.cumsum(area[order])
    start = 0
    while start < len(order):
        base = cumulative[start - 1] if start > 0 else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + max_candidates, side="right")))
        tri = order[start:stop]
        counts = area[tri]
        owner = np.repeat(tri, counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        px = x0[owner] + offset % width[owner]
        py = y0[owner] + offset // width[owner]
        ca, cb, cc = a[owner], b[owner], c[owner]
        d = denominator[owner]
        w0 = ((cb[:, 1] - cc[:, 1]) * (px - cc[:, 0]) + (cc[:, 0] - cb[:, 0]) * (py - cc[:, 1])) / d
        w1 = ((cc[:, 1] - ca[:, 1]) * (px - cc[:, 0]) + (ca[:, 0] - cc[:, 0]) * (py - cc[:, 1])) / d
        w2 = 1.0 - w0 - w1
        inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
        face_index[py[inside], px[inside]] = owner[inside]
        barycentric[py[inside], px[inside]] = np.stack([w0, w1, w2], axis=-1)[inside]
        start = stop
    return face_index, np.clip(barycentric, 0.0, 1.0)


def dilate(image: np.ndarray, mask: np.ndarray, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Grows the filled region (``mask`` (H, W) bool) of ``image`` (H, W, C) by ``pixels`` texels.

    Every empty texel within ``pixels`` steps (8-connected, i.e. chessboard
    distance) of a filled one takes the colour of its nearest filled texel,
    in one distance transform. Returns the new image and mask.
    """
    image, mask = image.copy(), mask.copy()
    if pixels <= 0 or mask.all() or not mask.any():
        return image, mask
    distance, (rows, cols) = distance_transform_cdt(~mask, metric="chessboard", return_indices=True)
    grow = (~mask) & (distance <= pixels)
    image[grow] = image[rows[grow], cols[grow]]
    return image, mask | grow


ColourFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SurfaceLookup:
    """Colour at the surface the field renders, found from the mesh's vertices (see :func:`bake_colours`).

    ``offsets`` (V,) or (V, Q): signed distances along each vertex normal from the vertex to that surface (world
    units, > 0 outside; NaN = unknown; Q points whose colours are averaged, e.g. quantiles of the ray's
    termination from :func:`exports.project.surface_offsets`); ``colour_fn`` gives the colour at points on it
    (typically :func:`point_lookup` of the albedo).
    """

    offsets: np.ndarray
    colour_fn: ColourFn


def bake_colours(
    mesh: UVMesh, colour_fn: ColourFn, resolution: int = 1024, padding: int = 4, surface: SurfaceLookup | None = None
) -> tuple[np.ndarray, float]:
    """The texture (H, W, 3) uint8 of ``mesh`` (H = W = ``resolution``, row 0 at v = 1) and the atlas
    utilisation (fraction of texels covered by a triangle).

    ``colour_fn(points (P, 3), normals (P, 3)) -> (P, 3)`` in [0, 1] gives the
    colour at the world positions of the covered texel centres (normals are the
    interpolated vertex normals, unit). With ``surface``, a texel whose
    triangle has offsets at all three vertices is instead moved along its
    normal by the offset interpolated there and coloured by
    ``surface.colour_fn`` (one point lookup, no ray); ``colour_fn`` colours
    the rest. Charts are dilated by ``padding``
    texels; texels still empty after that take the mean colour, so nothing
    black bleeds in at low mip levels.
    """
    face_index, barycentric = rasterize_uv(mesh.uv, mesh.faces, resolution)
    mask = face_index >= 0
    image = np.zeros((resolution, resolution, 3), dtype=np.float64)
    if mask.any():
        corners = mesh.faces[face_index[mask]]
        weights = barycentric[mask]
        points = np.einsum("pk,pkc->pc", weights, mesh.vertices[corners])
        normals = np.einsum("pk,pkc->pc", weights, mesh.normals[corners])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)
        colours = np.zeros_like(points)
        rest = np.ones(len(points), dtype=bool)
        if surface is not None:
            offsets = surface.offsets.reshape(len(surface.offsets), -1)[corners]  # (T, 3 corners, Q)
            rest = ~np.isfinite(offsets).all(axis=(1, 2))
            known = ~rest
            along = np.einsum("pk,pkq->pq", weights[known], offsets[known])
            for q in range(along.shape[1]):
                moved = points[known] + along[:, q : q + 1] * normals[known]
                colours[known] += surface.colour_fn(moved, normals[known]) / along.shape[1]
        if rest.any():
            colours[rest] = colour_fn(points[rest], normals[rest])
        image[mask] = np.nan_to_num(colours, nan=0.0).clip(0.0, 1.0)
        image, filled = dilate(image, mask, padding)
        image[~filled] = image[filled].mean(axis=0)
    return np.round(image * 255.0).astype(np.uint8), float(mask.mean())


def point_lookup(albedo_fn: AlbedoFn, chunk_size: int = 262_144, device: torch.device | str = "cpu") -> ColourFn:
    """A :data:`ColourFn` that evaluates ``albedo_fn`` at the points themselves, in chunks."""

    @torch.no_grad()
    def colours(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        out = np.empty((len(points), 3), dtype=np.float64)
        for start in range(0, len(points), chunk_size):
            chunk = torch.as_tensor(points[start : start + chunk_size], dtype=torch.float32, device=device)
            out[start : start + chunk_size] = albedo_fn(chunk).reshape(-1, 3).float().cpu().numpy()
        return out

    return colours


def bake_texture(
    mesh: UVMesh,
    albedo_fn: AlbedoFn,
    resolution: int = 1024,
    padding: int = 4,
    chunk_size: int = 262_144,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The albedo texture (H, W, 3) uint8 of ``mesh`` by point lookup: ``albedo_fn(points (P, 3) world, on
    ``device``) -> (P, 3)`` in [0, 1] at each texel's position on the mesh (see :func:`bake_colours`)."""
    return bake_colours(mesh, point_lookup(albedo_fn, chunk_size, device), resolution, padding)[0]
