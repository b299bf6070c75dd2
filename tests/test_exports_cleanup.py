"""Mesh cleanup: floaters, degenerate faces, decimation (quadric and the clustering fallback)."""

import sys

import numpy as np
import pytest
import trimesh

from recon.exports.cleanup import (
    basic_cleanup,
    clean_mesh,
    decimate,
    remove_small_components,
)


def body_with_floaters():
    body = trimesh.creation.icosphere(4, radius=0.5)
    floaters = [trimesh.creation.icosphere(1, radius=0.05).apply_translation(t) for t in ([0.9, 0, 0], [0, 0.9, 0])]
    return trimesh.util.concatenate([body, *floaters]), body


def test_floaters_removed_big_component_kept():
    mesh, body = body_with_floaters()
    cleaned = remove_small_components(mesh, 0.05)
    assert len(cleaned.faces) == len(body.faces)
    assert np.abs(np.linalg.norm(cleaned.vertices, axis=1) - 0.5).max() < 1e-6
    assert len(remove_small_components(mesh, 0.0).faces) == len(mesh.faces)


def test_basic_cleanup_merges_and_drops_degenerates():
    soup = trimesh.creation.box()
    unmerged = trimesh.Trimesh(soup.triangles.reshape(-1, 3), np.arange(len(soup.faces) * 3).reshape(-1, 3), process=False)
    degenerate = trimesh.Trimesh(np.vstack([unmerged.vertices, [[0, 0, 0]]]), np.vstack([unmerged.faces, [[0, 0, len(unmerged.vertices)]]]), process=False)
    cleaned = basic_cleanup(degenerate)
    assert len(cleaned.vertices) == 8 and len(cleaned.faces) == 12
    assert cleaned.is_watertight


@pytest.mark.parametrize("quadric", [True, False])
def test_decimation_reaches_target_and_keeps_orientation(monkeypatch, quadric):
    if quadric:
        pytest.importorskip("fast_simplification")
    else:
        monkeypatch.setitem(sys.modules, "fast_simplification", None)  # import raises ImportError
    mesh = trimesh.creation.icosphere(4)
    result = decimate(mesh, 600)
    assert 300 <= len(result.faces) <= 600
    assert result.volume > 0
    assert result.volume == pytest.approx(mesh.volume, rel=0.1)


def test_clean_mesh_pipeline():
    mesh, _ = body_with_floaters()
    cleaned = clean_mesh(mesh, 0.05, target_faces=1000)
    assert len(cleaned.faces) <= 1000
    assert cleaned.body_count == 1
    assert cleaned.volume > 0


def test_a_step_that_opens_a_closed_mesh_is_undone_and_noted(monkeypatch):
    from recon.exports import cleanup

    sphere = trimesh.creation.icosphere(4)

    def tearing_decimate(mesh, target_faces):
        torn = mesh.copy()
        torn.update_faces(np.arange(len(torn.faces)) % 7 != 0)  # holes everywhere: repair cannot close them
        return torn

    monkeypatch.setattr(cleanup, "decimate", tearing_decimate)
    notes: list[str] = []
    cleaned = clean_mesh(sphere, 0.05, target_faces=1000, smooth_iterations=2, notes=notes)
    assert cleaned.is_watertight and cleaned.euler_number == 2 and len(cleaned.faces) == len(sphere.faces)
    assert notes == [f"decimation opened the mesh; kept all {len(sphere.faces)} faces"]


def test_closed_mesh_stays_closed_through_smoothing_and_decimation():
    sphere = trimesh.creation.icosphere(5)
    notes: list[str] = []
    cleaned = clean_mesh(sphere, 0.05, target_faces=2000, smooth_iterations=5, notes=notes)
    assert notes == [] and len(cleaned.faces) <= 2000
    assert cleaned.is_watertight and cleaned.is_winding_consistent and cleaned.euler_number == 2 and cleaned.volume > 0
