"""The export's fast paths against their reference paths: xatlas in pieces vs one piece, the normal bake's
vertex rays vs a ray per texel. Behaviour and parity only (speed is measured by bench/export.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from recon.data.primitives import Capsule, Material, PrimitiveObject
from recon.errors import ReconError
from recon.exports import ExportConfig
from recon.exports.bake import bake_colours, rasterize_uv
from recon.exports.isosurface import marching_cubes, sample_density_grid
from recon.exports.project import SolidProbe, normal_colours, surface_offsets, vertex_surface
from recon.exports.uv import count_charts, split_faces, unwrap_uv

BOX = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
CAPSULE = PrimitiveObject([Capsule.between((0.0, -0.35, 0.0), (0.0, 0.35, 0.0), 0.3, Material((0.85, 0.3, 0.2), "stripes", (0.2, 0.5, 0.9), 3.0))])


def density(points: torch.Tensor) -> torch.Tensor:
    return 200.0 * torch.sigmoid(-CAPSULE.sdf(points) / 0.004)


def albedo(points: torch.Tensor) -> torch.Tensor:
    """The capsule's stripes near its surface (where rays terminate), black elsewhere (never learned)."""
    near = CAPSULE.sdf(points).abs()[:, None] < 0.03
    return torch.where(near, CAPSULE.albedo(points), torch.zeros_like(points))


@pytest.fixture(scope="module")
def capsule_mesh():
    grid = sample_density_grid(density, BOX, 64)
    mesh = marching_cubes(grid, BOX, 100.0)
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.53, iterations=5)
    return mesh, grid


def test_split_faces_covers_every_face_once_in_balanced_pieces():
    mesh = trimesh.creation.icosphere(4)  # 5120 faces
    pieces = split_faces(mesh.vertices, mesh.faces, 1000)
    assert len(pieces) == 5
    together = np.sort(np.concatenate(pieces))
    assert np.array_equal(together, np.arange(len(mesh.faces)))
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 2
    assert [len(p) for p in split_faces(mesh.vertices, mesh.faces, 0)] == [len(mesh.faces)]
    assert len(split_faces(mesh.vertices, mesh.faces, 1)) == 16  # at most MAX_PIECES


def uv_and_world_areas(atlas) -> tuple[np.ndarray, np.ndarray]:
    """Per-triangle area in UV space (fractions of the texture) and in the world."""
    corners, uv = atlas.vertices[atlas.faces], atlas.uv[atlas.faces]
    world = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    return 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]), world


def test_unwrap_in_pieces_is_one_valid_deterministic_atlas(capsule_mesh):
    mesh, _ = capsule_mesh
    pieces = unwrap_uv(mesh, texture_resolution=256, padding=2, piece_faces=len(mesh.faces) // 4)
    whole = unwrap_uv(mesh, texture_resolution=256, padding=2, piece_faces=0)
    again = unwrap_uv(mesh, texture_resolution=256, padding=2, piece_faces=len(mesh.faces) // 4)
    assert pieces.method == whole.method == "xatlas"
    assert np.array_equal(pieces.uv, again.uv) and np.array_equal(pieces.faces, again.faces)
    assert pieces.uv.min() >= 0.0 and pieces.uv.max() <= 1.0 and len(pieces.faces) == len(mesh.faces)
    # The same surface: every UV-mesh vertex is a mesh vertex, and the winding stays outward.
    assert np.isin(pieces.vertices.view([("", float)] * 3), np.asarray(mesh.vertices).view([("", float)] * 3)).all()
    assert trimesh.Trimesh(pieces.vertices, pieces.faces, process=False).volume > 0
    # No two triangles share texels: the triangles' UV areas add up to the area they cover.
    face_index, _ = rasterize_uv(pieces.uv, pieces.faces, 1024)
    covered = (face_index >= 0).mean()
    uv_area, world_area = uv_and_world_areas(pieces)
    assert covered == pytest.approx(uv_area.sum(), rel=0.05)
    # One texel density for the charts of all pieces; about as many charts and as much texture as one piece.
    ratio = uv_area / np.maximum(world_area, 1e-12)
    assert np.percentile(ratio, 90) < 3.0 * np.percentile(ratio, 10)
    assert count_charts(pieces) <= 2 * count_charts(whole) + 8
    whole_covered = (rasterize_uv(whole.uv, whole.faces, 1024)[0] >= 0).mean()
    assert covered > 0.75 * whole_covered


def test_surface_offsets_find_where_the_rays_terminate():
    """A slab whose face is at x = 0.1: points at x = 0 (normal +x) terminate about 0.1 outside; far points miss."""

    def slab(points: torch.Tensor) -> torch.Tensor:
        return 200.0 * torch.sigmoid((0.1 - points[:, 0]) / 0.002)

    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.3, -0.2], [0.6, 0.0, 0.0]])
    normals = np.tile([1.0, 0.0, 0.0], (3, 1))
    offsets = surface_offsets(points, normals, slab, band=0.2, samples=64, quantiles=3)
    assert offsets.shape == (3, 3)
    step = 0.4 / 64
    assert np.all(np.abs(offsets[:2] - 0.1) < 2 * step)
    assert np.all(np.diff(offsets[:2], axis=1) <= 0)  # later quantiles lie deeper along the ray
    assert np.isnan(offsets[2]).all()  # its ray (x from 0.8 to 0.4) meets no density


@pytest.mark.parametrize("softness", [0.004, 0.03])
def test_grid_guided_vertex_rays_find_the_full_rays_termination(capsule_mesh, softness):
    """The guided march (field calls only on the half of the ray where the density grid puts the surface)
    against the full march, on a sharp and a soft surface."""
    mesh, _ = capsule_mesh

    def soft(points: torch.Tensor) -> torch.Tensor:
        return 200.0 * torch.sigmoid(-CAPSULE.sdf(points) / softness)

    grid = sample_density_grid(soft, BOX, 64)
    probe = SolidProbe(grid, BOX, 100.0)
    band, samples = 3.0 * 2.0 / 63, 16
    points, normals = np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals)
    full = surface_offsets(points, normals, soft, band, samples, probe, quantiles=2)
    guided = surface_offsets(points, normals, soft, band, samples, probe, quantiles=2, guided=True)
    assert np.isfinite(guided).all() and np.isfinite(full).all()
    spacing = 2 * band / samples
    assert np.mean(np.abs(guided - full) <= spacing) > 0.95, np.abs(guided - full).max()


def test_vertex_ray_bake_matches_the_texel_ray_bake(capsule_mesh):
    mesh, grid = capsule_mesh
    atlas = unwrap_uv(mesh, texture_resolution=128, padding=2, piece_faces=0)
    band = 3.0 * 2.0 / 63
    probe = SolidProbe(grid, BOX, 100.0)

    def reference(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        return normal_colours(points, normals, density, albedo, band, 16, probe)[0]

    surface = vertex_surface(atlas, density, albedo, band, 16, probe, quantiles=2)
    assert surface.offsets.shape == (len(atlas.vertices), 2) and np.isfinite(surface.offsets).mean() > 0.99
    fast, used = bake_colours(atlas, reference, 128, 2, surface)
    slow, used_slow = bake_colours(atlas, reference, 128, 2)
    assert used == used_slow
    mask = rasterize_uv(atlas.uv, atlas.faces, 128)[0] >= 0
    error = ((fast[mask].astype(float) - slow[mask].astype(float)) / 255.0) ** 2
    assert -10 * np.log10(error.mean()) > 30.0
    # Colour learned only near the surface: neither bake looks it up far from it (black) on any texel.
    assert (fast[mask].max(axis=1) < 25).mean() < 0.01 and (slow[mask].max(axis=1) < 25).mean() < 0.01


def test_the_speed_paths_are_the_defaults_and_the_references_are_settings():
    cfg = ExportConfig()
    assert (cfg.bake_rays, cfg.bake_surface_points, cfg.uv_piece_faces) == ("auto", 2, 4000)
    # Vertex rays where the field is slow to evaluate (the CPU); a ray per texel on a GPU.
    assert cfg.for_device("cpu").bake_rays == "vertices" and cfg.for_device("cuda:0").bake_rays == "texels"
    # Smaller UV pieces where many cores chart them at once; the CPU keeps larger ones (fewer seams).
    assert cfg.for_device("cuda:0").uv_piece_faces == 4000 and cfg.for_device("cpu").uv_piece_faces == 8000
    reference = ExportConfig(bake_rays="texels", uv_piece_faces=0)
    assert reference.for_device("cpu").bake_rays == "texels" and reference.for_device("cuda") is reference
    for bad in ({"bake_rays": "pixels"}, {"bake_surface_points": 0}, {"uv_piece_faces": -1}):
        with pytest.raises(ReconError, match=next(iter(bad))):
            ExportConfig(**bad)
