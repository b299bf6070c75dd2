"""Mesh cleanup after marching cubes: merge/degenerate removal, floater removal, smoothing, decimation, repair.

Decimation uses quadric edge collapse (the ``fast_simplification`` package,
pip install fast_simplification); where it pinches a closed mesh's surface
against itself, :func:`split_pinches` separates the sheets again so the mesh
stays closed. Without the package, a vertex-clustering fallback (pure numpy)
reaches the face budget with a coarser, less faithful result, and a warning
says so.
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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


def _edge_angles(vertices: np.ndarray, a: int, b: int, opposite: np.ndarray) -> np.ndarray:
    """Angles (radians) of the triangles (a, b, opposite[i]) about the axis a -> b, in one fixed frame."""
    axis = vertices[b] - vertices[a]
    axis = axis / max(float(np.linalg.norm(axis)), 1e-300)
    helper = np.eye(3)[int(np.argmin(np.abs(axis)))]
    u = np.cross(axis, helper)
    u /= np.linalg.norm(u)
    w = np.cross(axis, u)
    radial = vertices[opposite] - vertices[a]
    return np.arctan2(radial @ w, radial @ u)


def _fan_halves(vertices: np.ndarray, faces: np.ndarray, half_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The 2k half-edges ``half_edges`` (indices 3 * face + corner) of one edge shared by more than two faces,
    split by direction, each half in angular order about the edge, and the shift s for which forward[i]
    paired with backward[(i + s) % k] pairs faces that bound the same empty wedge (where the directions
    alternate about the edge: two sheets of a surface touching along it; else 0: a folded spot). None when
    the directions do not balance."""
    tails = faces.reshape(-1)[half_edges]
    a = int(tails.min())
    b = int(faces.reshape(-1)[(half_edges // 3) * 3 + (half_edges % 3 + 1) % 3].max())
    forward = tails == a  # a -> b: the face's outward normal points towards increasing angle about a -> b
    if 2 * int(forward.sum()) != len(half_edges):
        return None
    opposite = faces[half_edges // 3, (half_edges % 3 + 2) % 3]
    order = np.argsort(_edge_angles(vertices, a, b, opposite), kind="stable")
    forward, ordered = forward[order], half_edges[order]
    alternating = bool(np.all(forward[1:] != forward[:-1]))
    return ordered[forward], ordered[~forward], int(alternating and not forward[0])


def _drop_fins(faces: np.ndarray) -> np.ndarray:
    """``faces`` without the pairs of faces on the same three vertices wound opposite ways (a flat fin of
    zero volume that decimation can leave; removing both keeps every edge's count even)."""
    ordered = np.sort(faces, axis=1)
    _, inverse, counts = np.unique(ordered, axis=0, return_inverse=True, return_counts=True)
    return faces[counts[inverse.reshape(-1)] == 1] if np.any(counts == 2) else faces


def split_pinches(vertices: np.ndarray, faces: np.ndarray, nudge: float = 0.1) -> trimesh.Trimesh | None:
    """A closed, manifold mesh from a closed one whose surface touches itself: vertices (V, 3), faces (F, 3)
    counter-clockwise from outside, where every edge has an even number of faces, half of them in each
    direction (e.g. quadric decimation of a closed mesh, which can pinch two nearby sheets together along
    an edge or at a vertex).

    Fins (a face and its reverse) are dropped, each edge's faces are paired (:func:`_fan_halves` where more
    than two faces share it; such an edge left shared by more than two is paired another way, up to 3 tries), and every vertex gets one copy per fan of faces connected through those pairs; the
    copies of a split vertex move ``nudge`` of the way towards their own fan's centre so they do not
    coincide. Returns None when the input is open (an edge with an odd count) or not consistently wound.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = _drop_fins(np.asarray(faces, dtype=np.int64))
    count = len(faces)
    if count == 0 or np.any((faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])):
        return None
    tails, heads = faces.reshape(-1), faces[:, [1, 2, 0]].reshape(-1)  # half-edge 3f+k: corner k -> k+1 of face f
    low, high = np.minimum(tails, heads), np.maximum(tails, heads)
    order = np.lexsort((high, low))
    key = low[order] * np.int64(len(vertices)) + high[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    if np.any(sizes % 2):
        return None
    twin = np.empty(3 * count, dtype=np.int64)
    plain = starts[sizes == 2]
    first, second = order[plain], order[plain + 1]
    if np.any(tails[first] != heads[second]):
        return None
    twin[first], twin[second] = second, first
    fans_of_edges = []
    for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
        halves = _fan_halves(vertices, faces, order[start : start + size])
        if halves is None:
            return None
        fans_of_edges.append(halves)
    where = {int(key[start]): index for index, start in enumerate(starts[sizes > 2])}
    shifts = np.zeros(len(fans_of_edges), dtype=np.int64)
    for _ in range(3):
        for (forward, backward, base), shift in zip(fans_of_edges, shifts):
            partner = backward[(np.arange(len(forward)) + base + shift) % len(forward)]
            twin[forward], twin[partner] = partner, forward
        # Corner 3f+k (at vertex tails[3f+k]) is in the same fan as the corner of that vertex in the face
        # across its outgoing half-edge: the twin's head end.
        across = (twin // 3) * 3 + (twin % 3 + 1) % 3
        graph = coo_matrix((np.ones(3 * count), (np.arange(3 * count), across)), shape=(3 * count, 3 * count))
        fans, labels = connected_components(graph, directed=False)
        # An edge whose pairs left both ends' fans joined still has more than two faces: pair it the other way.
        ends = labels.reshape(-1, 3)[:, [1, 2, 0]].reshape(-1)
        new_keys = np.minimum(labels, ends) * np.int64(fans) + np.maximum(labels, ends)
        _, first_of, counts = np.unique(new_keys, return_index=True, return_counts=True)
        crowded = first_of[counts > 2]
        if len(crowded) == 0:
            break
        shifts[[where[int(k)] for k in low[crowded] * np.int64(len(vertices)) + high[crowded]]] += 1
    else:
        return None
    source = np.empty(fans, dtype=np.int64)
    source[labels] = tails
    positions = vertices[source]
    split = np.bincount(source, minlength=len(vertices))[source] > 1
    if split.any():
        ring = vertices[faces[:, [1, 2, 0]]].reshape(-1, 3) + vertices[faces[:, [2, 0, 1]]].reshape(-1, 3)
        centre = np.stack([np.bincount(labels, weights=ring[:, c], minlength=fans) for c in range(3)], axis=1)
        centre /= 2.0 * np.bincount(labels, minlength=fans)[:, None]
        positions[split] += nudge * (centre[split] - positions[split])
    mesh = trimesh.Trimesh(vertices=positions, faces=labels.reshape(-1, 3), process=False)
    mesh.remove_unreferenced_vertices()
    return mesh if is_closed(mesh) else None


def decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """The mesh simplified to at most ``target_faces`` faces (unchanged if already smaller).

    Quadric decimation (fast_simplification) when installed, else vertex
    clustering with a warning. Where quadric collapse pinched a closed mesh's
    surface against itself, :func:`split_pinches` separates it again, so a
    closed input stays closed (and is not merged back by :func:`basic_cleanup`).
    """
    if target_faces <= 0 or len(mesh.faces) <= target_faces:
        return mesh
    try:
        import fast_simplification
    except ImportError:
        warn("fast_simplification is not installed (pip install fast_simplification); decimating by vertex clustering")
        return _decimate_by_clustering(mesh, target_faces)
    points = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    vertices, faces = fast_simplification.simplify(points, np.ascontiguousarray(mesh.faces, dtype=np.int64), target_count=int(target_faces))
    if 0 < len(faces) <= target_faces and bool(mesh.is_watertight):
        unpinched = split_pinches(vertices, faces)
        if unpinched is not None:
            return unpinched
    simplified = basic_cleanup(trimesh.Trimesh(vertices=vertices, faces=faces, process=False))
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


def orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of a closed, consistently wound mesh with each connected piece wound to a positive signed volume
    (normals outward), as trimesh's ``fix_normals(multibody=True)`` leaves it, without its per-face walk."""
    faces = np.asarray(mesh.faces, dtype=np.int64).copy()
    if len(faces):
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))
        corners = np.asarray(mesh.vertices, dtype=np.float64)[faces]
        volumes = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2]))
        flip = (np.bincount(labels, weights=volumes) < 0)[labels]
        faces[flip] = faces[flip][:, ::-1]
    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices).copy(), faces=faces, process=False)


def repair(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Fills small holes (trimesh: rings of 3-4 edges), unifies winding and points it outward; a new mesh.

    A closed, consistently wound mesh (:func:`is_closed`) is only oriented (:func:`orient_outward`).
    """
    if is_closed(mesh):
        return orient_outward(mesh)
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


CLOSED_BUDGETS = (1.0, 0.9)
"""Face budgets (x target_faces) tried in turn by the decimation of a closed mesh before giving up."""


def _decimate_closed(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh | None:
    """Quadric decimation of a closed mesh that stays closed, or None. (Collapsing a tiny handle of a noisy
    surface changes the Euler characteristic but keeps the mesh closed: that is allowed.)

    :func:`decimate` separates the sheets quadric collapse pinches together, so the first budget of
    :data:`CLOSED_BUDGETS` almost always stays closed; a result that does not gets one :func:`repair`, then
    the next budget is tried (another collapse order). None when none stays closed: the caller keeps the
    mesh (exports.pipeline then meshes the solid on a coarser grid rather than decimating further).
    """
    for fraction in CLOSED_BUDGETS:
        candidate = decimate(mesh, int(fraction * target_faces))
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
