"""UV unwrap in a subprocess (and its crash fallbacks), UV rasterisation, texture bake."""

import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from recon.exports import uv
from recon.exports.bake import bake_texture, dilate, rasterize_uv
from recon.exports.uv import unwrap_uv


def front_red_back_blue(points):
    front = (points[:, 2] > 0).float()
    return torch.stack([front, torch.full_like(front, 0.2), 1.0 - front], dim=-1)


def check_atlas(result, mesh):
    assert result.uv.min() >= 0.0 and result.uv.max() <= 1.0
    assert len(result.faces) == len(mesh.faces) or result.method == "xatlas-retry"
    assert len(result.uv) == len(result.vertices) == len(result.normals)
    # Vertices are copies of surface points (the retry decimates) and faces keep their outward winding.
    tolerance = 0.1 if result.method == "xatlas-retry" else 1e-6
    assert np.allclose(np.linalg.norm(result.vertices, axis=1), 1.0, atol=tolerance)
    assert trimesh.Trimesh(result.vertices, result.faces, process=False).volume > 0


def test_xatlas_unwrap():
    mesh = trimesh.creation.icosphere(2)
    result = unwrap_uv(mesh, texture_resolution=128, padding=2)
    assert result.method == "xatlas"
    check_atlas(result, mesh)


@pytest.mark.parametrize(("mode", "method"), [("always", "per-triangle"), ("first", "xatlas-retry")])
def test_unwrap_survives_crashing_child(monkeypatch, mode, method):
    """A child that aborts (as xatlas does on some meshes): every attempt ("always") or only the first."""
    working = uv.child_command
    abort = [sys.executable, "-c", "import os; os.abort()"]
    monkeypatch.setattr(uv, "child_command", lambda src, dst, attempt: abort if mode == "always" or attempt == 0 else working(src, dst, attempt))
    mesh = trimesh.creation.icosphere(2)
    result = unwrap_uv(mesh, texture_resolution=128, padding=2)
    assert result.method == method
    check_atlas(result, mesh)
    if method == "per-triangle":
        # Every triangle gets texels of its own: no texel is claimed by two triangles.
        face_index, _ = rasterize_uv(result.uv, result.faces, 256)
        claimed = [set(zip(*np.nonzero(rasterize_uv(result.uv, result.faces[i : i + 1], 256)[0] == 0))) for i in range(40)]
        assert sum(len(c) for c in claimed) == len(set().union(*claimed))
        assert len(np.unique(face_index[face_index >= 0])) > 0.9 * len(result.faces)


def test_rasterize_matches_triangle_area_and_orientation():
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # lower-left half of the texture (v up)
    face_index, bary = rasterize_uv(uv, np.array([[0, 1, 2]]), 64)
    covered = face_index == 0
    assert abs(covered.sum() - 64 * 64 / 2) < 64 + 1
    assert covered[-1, 0] and not covered[0, -1]  # v = 0 is the bottom row
    assert np.allclose(bary[covered].sum(axis=1), 1.0)
    # Barycentrics reproduce the texel-centre UV.
    rows, cols = np.nonzero(covered)
    centre = np.stack([(cols + 0.5) / 64, 1 - (rows + 0.5) / 64], axis=1)
    assert np.allclose(bary[covered] @ uv, centre, atol=1e-9)


def test_dilate_fills_n_pixels():
    image = np.zeros((9, 9, 1))
    mask = np.zeros((9, 9), dtype=bool)
    image[4, 4], mask[4, 4] = 1.0, True
    grown, grown_mask = dilate(image, mask, 2)
    assert grown_mask.sum() == 25 and np.allclose(grown[grown_mask], 1.0)


def test_bake_puts_front_colour_on_front_faces():
    mesh = trimesh.creation.icosphere(3)
    atlas = unwrap_uv(mesh, texture_resolution=256, padding=2)
    texture = bake_texture(atlas, front_red_back_blue, resolution=256, padding=2, chunk_size=1000)
    assert texture.shape == (256, 256, 3) and texture.dtype == np.uint8
    tri = trimesh.Trimesh(atlas.vertices, atlas.faces, process=False)
    for sign, channel in ((1, 0), (-1, 2)):
        faces = np.nonzero(sign * tri.triangles_center[:, 2] > 0.3)[0]
        uv = np.einsum("fkc,k->fc", atlas.uv[atlas.faces[faces]], np.full(3, 1 / 3))
        colours = trimesh.visual.color.uv_to_color(uv, Image.fromarray(texture))
        assert (colours[:, channel] > 200).mean() > 0.95
        assert (colours[:, 2 - channel] < 50).mean() > 0.95
