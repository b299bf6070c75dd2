"""Getting a closed mesh to the face budget quickly: pinch splitting after quadric decimation, cheap orientation,
and the solid meshed on a coarser grid instead of decimated (export.reduce)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import trimesh
from scipy.ndimage import gaussian_filter, zoom
from scipy.spatial import cKDTree

from recon.data.primitives import Capsule, Material, PrimitiveObject
from recon.errors import ReconError
from recon.exports import ExportConfig, cleanup
from recon.exports.cleanup import clean_mesh, is_closed, orient_outward, split_pinches
from recon.exports.isosurface import marching_cubes, resample_grid
from recon.exports.pipeline import export_mesh
from recon.exports.solidify import solid_grid

fast_simplification = pytest.importorskip("fast_simplification")

BOX = np.array([[-1.0] * 3, [1.0] * 3])


def edge_face_counts(faces: np.ndarray) -> np.ndarray:
    """How many faces share each undirected edge."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def noisy_solid_mesh(seed: int = 0, size: int = 40) -> trimesh.Trimesh:
    """The closed marching-cubes mesh of a lumpy random solid (many thin necks and tunnels, as a short fit's field)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, size)
    radius = np.sqrt(sum(axis**2 for axis in np.meshgrid(x, x, x, indexing="ij")))
    density = (8.0 * gaussian_filter(rng.standard_normal((size,) * 3), 1.5) + 3.0 * (0.7 - radius)).astype(np.float32)
    mesh = marching_cubes(solid_grid(density, 0.0, 0)[0], BOX, 0.0)
    return cleanup.remove_small_components(cleanup.basic_cleanup(mesh), 0.05)


def two_boxes(offset: list[float]) -> trimesh.Trimesh:
    """Two unit cubes, the second moved by ``offset``, their coincident corners merged (they touch there)."""
    boxes = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation(offset)])
    boxes.merge_vertices()
    return boxes


def test_two_cubes_touching_along_an_edge_are_split_into_two_closed_cubes():
    boxes = two_boxes([1.0, 1.0, 0.0])
    assert edge_face_counts(boxes.faces).max() == 4 and not boxes.is_watertight
    split = split_pinches(boxes.vertices, boxes.faces)
    assert split is not None and is_closed(split)
    assert len(split.vertices) == len(boxes.vertices) + 2 and len(split.faces) == len(boxes.faces)
    assert split.body_count == 2 and split.euler_number == 4
    assert split.volume == pytest.approx(2.0, rel=0.1)
    # the two copies of each shared corner are moved apart, so merging coincident vertices does not re-pinch them
    assert len(np.unique(np.round(split.vertices, 8), axis=0)) == len(split.vertices)


def test_two_cubes_touching_at_a_corner_are_split_and_an_open_mesh_is_refused():
    boxes = two_boxes([1.0, 1.0, 1.0])
    split = split_pinches(boxes.vertices, boxes.faces)
    assert split is not None and is_closed(split) and split.body_count == 2
    assert len(split.vertices) == len(boxes.vertices) + 1
    sphere = trimesh.creation.icosphere(2)
    assert split_pinches(sphere.vertices, sphere.faces[1:]) is None  # a hole: not closed
    flipped = sphere.faces.copy()
    flipped[0] = flipped[0, ::-1]
    assert split_pinches(sphere.vertices, flipped) is None  # inconsistent winding


def test_orient_outward_flips_only_the_inverted_pieces():
    inside_out = trimesh.creation.icosphere(2).apply_translation([3.0, 0.0, 0.0])
    inside_out.invert()
    pair = trimesh.util.concatenate([trimesh.creation.icosphere(2), inside_out])
    oriented = orient_outward(pair)
    reference = pair.copy()
    trimesh.repair.fix_normals(reference, multibody=True)
    assert np.array_equal(oriented.faces, reference.faces)
    assert oriented.volume == pytest.approx(2 * trimesh.creation.icosphere(2).volume)


def test_a_noisy_closed_mesh_that_decimation_pinches_stays_closed_at_the_budget_in_one_attempt(monkeypatch):
    mesh = noisy_solid_mesh()
    assert is_closed(mesh)
    target = len(mesh.faces) // 4
    _, pinched = fast_simplification.simplify(np.asarray(mesh.vertices), np.asarray(mesh.faces), target_count=target)
    assert edge_face_counts(pinched).max() > 2  # quadric collapse alone pinches it: not a closed manifold

    calls = []
    decimate = cleanup.decimate
    monkeypatch.setattr(cleanup, "decimate", lambda m, budget: calls.append(budget) or decimate(m, budget))
    notes: list[str] = []
    cleaned = clean_mesh(mesh, 0.05, target_faces=target, smooth_iterations=5, notes=notes)
    assert is_closed(cleaned) and notes == []
    assert 0.9 * target <= len(cleaned.faces) <= target
    assert calls == [target]
    assert cleaned.volume == pytest.approx(mesh.volume, rel=0.03)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decimated_noisy_meshes_are_closed_and_close_to_the_input(seed):
    mesh = noisy_solid_mesh(seed)
    decimated = cleanup.decimate(mesh, len(mesh.faces) // 3)
    assert is_closed(decimated) and decimated.volume > 0
    distances = cKDTree(mesh.vertices).query(decimated.vertices)[0]  # >= the distance to the surface
    assert distances.max() < 2.0 / 39  # a grid step


def test_resample_grid_matches_scipy_zoom():
    grid = np.random.default_rng(0).random((30, 24, 17)).astype(np.float32)
    for factor in (0.5, 0.73):
        ours = resample_grid(grid, factor)
        assert np.allclose(ours, zoom(grid, factor, order=1, mode="nearest"), atol=1e-5)


CAPSULE = PrimitiveObject([Capsule.between((0.0, -0.35, 0.0), (0.0, 0.35, 0.0), 0.3, Material((0.85, 0.3, 0.2)))])


def capsule_density(points: torch.Tensor) -> torch.Tensor:
    return 200.0 * torch.sigmoid(-CAPSULE.sdf(points) / 0.004)


def capsule_albedo(points: torch.Tensor) -> torch.Tensor:
    return CAPSULE.albedo(points)


def test_a_large_solid_mesh_is_meshed_on_a_coarser_grid_without_decimation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cleanup, "decimate", lambda m, budget: calls.append(budget) or m)
    cfg = ExportConfig(formats=["ply"], mc_resolution=96, threshold=100.0, target_faces=2000, bake="point", carve_views=0)
    result = export_mesh(capsule_density, capsule_albedo, BOX, tmp_path, cfg)
    report = result.report
    assert report["is_watertight"] and report["euler_characteristic"] == 2 and report["cleanup_notes"] == []
    assert 0.25 <= report["grid_factor"] < 0.95 and 0.5 * 2000 <= report["faces"] <= 1.1 * 2000
    assert calls == []  # about 0.9 x the budget already: nothing to decimate
    mesh = trimesh.load(result.paths["ply"], force="mesh")
    assert np.abs(CAPSULE.sdf(torch.as_tensor(mesh.vertices, dtype=torch.float32)).numpy()).max() < 0.02


def test_reduce_decimate_decimates_the_full_resolution_mesh(tmp_path):
    cfg = ExportConfig(formats=["ply"], mc_resolution=96, threshold=100.0, target_faces=2000, bake="point", carve_views=0, reduce="decimate")
    result = export_mesh(capsule_density, capsule_albedo, BOX, tmp_path, cfg)
    report = result.report
    assert report["grid_factor"] == 1.0 and report["is_watertight"] and report["euler_characteristic"] == 2
    assert 0.9 * 2000 <= report["faces"] <= 2000
    with pytest.raises(ReconError, match="export.reduce"):
        replace(cfg, reduce="collapse")
