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
