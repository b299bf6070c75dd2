"""Mesh cleanup after marching cubes: merge/degenerate removal, floater removal, smoothing, decimation, repair.

Decimation uses quadric edge collapse through trimesh's wrapper around the
``fast_simplification`` package (pip install fast_simplification). Without
it, a vertex-clustering fallback (pure numpy) reaches the face budget with a
coarser, less faithful result, and a warning says so.
"""

from __future__ import annotations

import numpy as np
import trimesh

from recon.progress import warn


def basic_cleanup(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Merges coincident vertices, drops degenerate/duplicate faces and unused vertices (a new mesh)."""
    mesh = trimesh.Trimesh(vertices=mesh.vertices.copy(), faces=mesh.faces.copy(), process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    return mesh


def remove_small_components(mesh: trimesh.Trimesh, min_ratio: float) -> trimesh.Trimesh:
    """Keeps the connected pieces with at least ``min_ratio`` x the face count of the largest piece.

    Pieces are face-connected through shared edges. ``min_ratio`` 0 keeps everything.
    """
    if min_ratio <= 0 or len(mesh.faces) == 0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes >= min_ratio * sizes.max()
    result = mesh.copy()
    result.update_faces(keep[labels])
    result.remove_unreferenced_vertices()
    return result


def _cluster_vertices(mesh: trimesh.Trimesh, cell: float) -> trimesh.Trimesh:
    """Vertex clustering: snaps vertices to a grid of ``cell`` size, averaging each cell's vertices."""
    keys = np.floor((mesh.vertices - mesh.vertices.min(axis=0)) / cell).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    count = np.bincount(inverse).astype(np.float64)
    vertices = np.stack([np.bincount(inverse, weights=mesh.vertices[:, a]) / count for a in range(3)], axis=1)
    clustered = trimesh.Trimesh(vertices=vertices, faces=inverse[mesh.faces], process=False)
    return basic_cleanup(clustered)


def _decimate_by_clustering(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Bisects the cell size of :func:`_cluster_vertices` until the mesh has at most ``target_faces`` faces."""
    extent = float(mesh.extents.max())
    low, high = extent / 4096.0, extent / 2.0
    best = _cluster_vertices(mesh, high)
    for _ in range(24):
        middle = np.sqrt(low * high)
        candidate = _cluster_vertices(mesh, middle)
        if len(candidate.faces) <= target_faces:
            best, high = candidate, middle
        else:
            low = middle
        if high / low < 1.02:
            break
    return best


def decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """The mesh simplified to at most ``target_faces`` faces (unchanged if already smaller).

    Quadric decimation (fast_simplification) when installed, else vertex
    clustering with a warning.
    """
    if target_faces <= 0 or len(mesh.faces) <= target_faces:
        return mesh
    try:
        import fast_simplification  # noqa: F401  (trimesh imports it itself; checked here for the fallback)
    except ImportError:
        warn("fast_simplification is not installed (pip install fast_simplification); decimating by vertex clustering")
        return _decimate_by_clustering(mesh, target_faces)
    simplified = mesh.simplify_quadric_decimation(face_count=int(target_faces))
    simplified = basic_cleanup(simplified)
    if len(simplified.faces) > target_faces:
        # Quadric collapse can stop a little above the budget; clustering finishes the job.
        simplified = _decimate_by_clustering(simplified, target_faces)
    return simplified


def smooth(mesh: trimesh.Trimesh, iterations: int) -> trimesh.Trimesh:
    """Taubin smoothing (lambda 0.5, mu -0.53): removes the marching-cubes staircase without shrinking; a new mesh."""
    mesh = mesh.copy()
    if iterations > 0 and len(mesh.faces):
        trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.53, iterations=int(iterations))
    return mesh


def repair(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Fills small holes (trimesh: rings of 3-4 edges), unifies winding and points it outward; a new mesh."""
    mesh = basic_cleanup(mesh)
    if not mesh.is_watertight:
        trimesh.repair.fill_holes(mesh)
    trimesh.repair.fix_normals(mesh, multibody=True)
    return mesh


def mesh_report(mesh: trimesh.Trimesh) -> dict:
    """Facts about a mesh for meta.json: faces, vertices, is_watertight, euler_characteristic, components, area."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    components = int(labels.max()) + 1 if len(labels) else 0
    return {
        "faces": len(mesh.faces),
        "vertices": len(mesh.vertices),
        "is_watertight": bool(mesh.is_watertight),
        "euler_characteristic": int(mesh.euler_number),
        "components": components,
        "area": float(mesh.area),
    }


def is_closed(mesh: trimesh.Trimesh) -> bool:
    """Whether ``mesh`` is watertight (every edge in exactly two faces) with consistent winding."""
    return len(mesh.faces) > 0 and bool(mesh.is_watertight) and bool(mesh.is_winding_consistent)


def _decimate_closed(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh | None:
    """Quadric decimation of a closed mesh that stays closed, or None. (Collapsing a tiny handle of a noisy
    surface changes the Euler characteristic but keeps the mesh closed: that is allowed.)

    Tries the budget, then 95, 90 and 80 % of it (another collapse order
    usually avoids the one collapse that pinched an edge), then ever larger
    budgets up to the mesh's own size; the first that stays closed wins. Each
    result gets one :func:`repair` before it is judged.
    """
    budgets = [int(f * target_faces) for f in (1.0, 0.95, 0.9, 0.8)]
    budget = target_faces
    while budget * 1.5 < len(mesh.faces):
        budget = int(budget * 1.5)
        budgets.append(budget)
    for budget in budgets:
        candidate = decimate(mesh, budget)
        if not is_closed(candidate):
            candidate = repair(candidate)
        if is_closed(candidate):
            return candidate
    return None


def clean_mesh(
    mesh: trimesh.Trimesh,
    min_component_ratio: float = 0.05,
    target_faces: int = 0,
    smooth_iterations: int = 0,
    notes: list[str] | None = None,
) -> trimesh.Trimesh:
    """Basic cleanup, floater removal, Taubin smoothing (``smooth_iterations``), decimation to ``target_faces``
    (0 = none) and :func:`repair`; returns a new mesh.

    A closed input (e.g. marching cubes of :func:`exports.solidify.solid_grid`)
    stays closed: every step's result is checked (:func:`is_closed`) and a step that would open the mesh
    is undone, keeping its input; each undone step is appended to ``notes``
    and warned about. An open input gets :func:`repair` at the end instead.
    """
    notes = [] if notes is None else notes
    earlier = len(notes)
    mesh = remove_small_components(basic_cleanup(mesh), min_component_ratio)
    if not is_closed(mesh):
        mesh = smooth(mesh, smooth_iterations)
        mesh = decimate(mesh, target_faces)
        return repair(remove_small_components(mesh, min_component_ratio))
    smoothed = smooth(mesh, smooth_iterations)
    if is_closed(smoothed):
        mesh = smoothed
    else:
        notes.append("smoothing opened the mesh; kept it unsmoothed")
    if 0 < target_faces < len(mesh.faces):
        decimated = _decimate_closed(mesh, target_faces)
        if decimated is None:
            notes.append(f"decimation opened the mesh; kept all {len(mesh.faces)} faces")
        else:
            if len(decimated.faces) > target_faces:
                notes.append(f"decimation to {target_faces} faces opened the mesh; stopped at {len(decimated.faces)}")
            mesh = decimated
    repaired = repair(mesh)
    mesh = repaired if is_closed(repaired) else mesh
    for note in notes[earlier:]:
        warn(f"export cleanup: {note}")
    return mesh
