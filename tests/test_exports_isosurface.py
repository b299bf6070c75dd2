"""Marching cubes orientation/radius, automatic threshold, export frame."""

import numpy as np
import pytest
import torch
import trimesh

from recon.cameras import orbit
from recon.errors import ReconError
from recon.exports.config import ExportConfig
from recon.exports.frame import (
    EXPORT_ROTATIONS,
    UP_AXES,
    dominant_up_axis,
    to_export_frame,
)
from recon.exports.isosurface import auto_threshold, extract_mesh, sample_density_grid
from recon.exports.pipeline import export_field

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def sphere(radius=0.5, peak=100.0, softness=0.01, center=(0.0, 0.0, 0.0)):
    c = torch.tensor(center)
    return lambda p: peak * torch.sigmoid((radius - (p - c).norm(dim=-1)) / softness)


def test_grid_sampling_order_matches_axes():
    grid = sample_density_grid(lambda p: p[:, 0] + 10 * p[:, 1] + 100 * p[:, 2], BOX, 5, chunk_size=7)
    axis = np.linspace(-1, 1, 5)
    assert np.allclose(grid, axis[:, None, None] + 10 * axis[None, :, None] + 100 * axis[None, None, :], atol=1e-5)


def test_sphere_radius_and_outward_normals():
    mesh, level = extract_mesh(sphere(), BOX, resolution=48, threshold=50.0)
    assert level == 50.0
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.allclose(radii, 0.5, atol=0.01)
    assert mesh.volume > 0  # signed volume: faces wound counter-clockwise seen from outside
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.5**3, rel=0.05)
    centroids = mesh.triangles_center
    outward = np.einsum("ij,ij->i", mesh.face_normals, centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    assert (outward > 0.5).mean() > 0.99


def test_automatic_threshold_recovers_sphere():
    mesh, level = extract_mesh(sphere(softness=0.01), BOX, resolution=48)
    assert 1.0 < level < 100.0
    assert np.allclose(np.linalg.norm(mesh.vertices, axis=1), 0.5, atol=0.03)
    assert mesh.volume > 0


def test_automatic_threshold_ignores_faint_fog_and_keeps_lower_density_part():
    body, ear = sphere(0.4, 1000.0), sphere(0.2, 50.0, center=(0.0, 0.65, 0.0))
    fog = lambda p: 0.3 * torch.exp(-p.norm(dim=-1))
    mesh, _ = extract_mesh(lambda p: body(p) + ear(p) + fog(p), BOX, resolution=48)
    assert mesh.bounds[1, 1] == pytest.approx(0.85, abs=0.05)  # the ear survives
    assert mesh.bounds[1, 0] == pytest.approx(0.4, abs=0.05)  # the fog does not become a surface


def test_hard_step_surface_is_midway():
    grid = np.zeros((20, 20, 20), dtype=np.float32)
    grid[5:15, 5:15, 5:15] = 40.0
    assert auto_threshold(grid, spacing=0.1) == pytest.approx(20.0)


def test_empty_field_raises():
    with pytest.raises(ReconError, match="empty"):
        extract_mesh(lambda p: torch.zeros(len(p)), BOX, resolution=16)
    with pytest.raises(ReconError, match="no surface"):
        extract_mesh(sphere(), BOX, resolution=16, threshold=1000.0)


@pytest.mark.parametrize("up_axis", UP_AXES)
def test_export_frame_is_a_proper_rotation_keeping_outward_winding(up_axis):
    rotation = EXPORT_ROTATIONS[up_axis]
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert np.allclose(rotation @ rotation.T, np.eye(3))
    mesh = trimesh.creation.icosphere(2)
    mesh.vertices += [0.0, 0.0, 0.3]
    vertices, normals = to_export_frame(mesh.vertices, mesh.vertex_normals, up_axis)
    moved = trimesh.Trimesh(vertices, mesh.faces, process=False)
    assert moved.volume == pytest.approx(mesh.volume)
    assert moved.volume > 0
    centre = vertices.mean(axis=0)
    assert (np.einsum("ij,ij->i", normals, vertices - centre) > 0).all()


def test_export_frame_puts_the_scene_up_at_file_plus_y():
    # recon's frame is glTF's: up (+Y) and front (+Z) stay where they are.
    assert np.allclose(to_export_frame(np.array([[0.0, 1.0, 2.0]]))[0], [[0.0, 1.0, 2.0]])
    # A Blender-style Z-up scene: up (+Z) becomes +Y, its front (-Y, Blender's front view) becomes +Z.
    up, front = to_export_frame(np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), up_axis="+z")[0]
    assert np.allclose(up, [0.0, 1.0, 0.0]) and np.allclose(front, [0.0, 0.0, 1.0])


def test_up_axis_follows_the_cameras():
    cameras = orbit(8, 20.0, 3.0, 40.0, 32)
    up = cameras.c2w[:, :3, 1].numpy()
    assert dominant_up_axis(up) == "+y"
    # The same rig in a Z-up world: world = R^T @ recon (R maps Z-up world to the +Y-up file frame).
    assert dominant_up_axis(up @ EXPORT_ROTATIONS["+z"]) == "+z"
    with pytest.raises(ReconError, match="up_axis"):
        ExportConfig(up_axis="-x")
    with pytest.raises(ReconError, match="auto"):
        export_field(lambda p: p.new_ones(len(p)), lambda p: p.new_ones(len(p), 3), BOX, "unused", ExportConfig(up_axis="auto"))
