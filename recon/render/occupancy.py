"""An occupancy-grid ray sampler in plain PyTorch: nerfacc's algorithm without its CUDA build.

Same grid, same refresh and same marching as nerfacc 0.5.3's one-level
``OccGridEstimator`` (which :class:`recon.render.samplers.OccupancyGridSampler`
wraps), so either can train a field and load the other's checkpoints:

* the grid: ``occs`` (cells,) is an EMA of density * step_size at a random
  point of each cell, refreshed every ``n`` steps (every cell during the
  warm-up, then a random quarter plus as many occupied cells);
  ``binaries`` (1, R, R, R) marks cells above min(threshold, mean occupancy);
* the marching: each ray's samples are the intervals [near + k dt,
  near + (k + 1) dt] (near jittered by U(0, dt) when stratified) whose
  midpoints lie inside the box in an occupied cell; then the field's density
  at those samples drops the ones behind the point where transmittance
  falls below ``early_stop_eps`` (and, with ``alpha_threshold``, the
  near-transparent ones).

nerfacc walks each ray cell by cell in a CUDA kernel; here every ray gets
its full lattice of candidates as one dense (rays, steps) boolean row, in ray
chunks that bound memory, and a training render waits for the device three
times: to pack the rays that cross the grid, their candidates, and (with one
read of the survivors' count, packed by ``nonzero_static``) the samples that
survive. None depends on the number of chunks.
Needs no compiler, runs on the CPU too (tests), and its outputs are sorted
by ray as nerfacc's are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from recon.render.samplers import PackedSamples, ray_aabb_intersect

CANDIDATES_PER_CHUNK = 1 << 24
"""Lattice points (rays x steps) tested at once: bounds the sampler's transient memory (about 25 bytes each)."""
FIRST_ROUND = 32
"""With ``two_rounds``: candidates per ray whose density the sampler evaluates first; the rest only for rays
still transparent after them."""
DENSITY_POINTS = 1 << 21
"""Candidate samples whose density is evaluated at once (bounds the field's activations during sampling)."""


class GridState(nn.Module):
    """The grid's buffers under nerfacc's names and shapes: ``occs`` (R^3,) float, ``binaries`` (1, R, R, R) bool."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.register_buffer("occs", torch.zeros(resolution**3))
        self.register_buffer("binaries", torch.zeros(1, resolution, resolution, resolution, dtype=torch.bool))


class TorchOccupancyGrid(nn.Module):
    """Occupancy grid over the box ``aabb`` (2, 3) with ``resolution`` cells per axis; state in ``estimator``."""

    def __init__(self, aabb: Tensor, resolution: int) -> None:
        super().__init__()
        self.estimator = GridState(resolution)
        self.register_buffer("aabb", aabb.reshape(2, 3).float().clone(), persistent=False)
        self._box: tuple[Tensor, float] | None = None  # box of the occupied cells and its diagonal, until a refresh
        self.register_load_state_dict_post_hook(_forget_box)

    def _apply(self, fn, recurse: bool = True):
        self._box = None  # .to() / .cuda(): the cached box lives on the old device
        return super()._apply(fn, recurse)

    @property
    def resolution(self) -> int:
        """Cells per axis."""
        return self.estimator.resolution

    @property
    def occupied_fraction(self) -> float:
        """Fraction of grid cells currently marked occupied."""
        return float(self.estimator.binaries.float().mean().item())

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[Tensor], Tensor], step_size: float, threshold: float, every: int, warmup_steps: int) -> None:
        """Every ``every`` steps: occs = max(0.95 occs, density * step_size at a random point per chosen cell),
        binaries = occs > min(threshold, mean occs). Random draws use the global RNG of the grid's device."""
        if step % every:
            return
        state, res = self.estimator, self.resolution
        cells = res**3
        device = state.occs.device
        if step < warmup_steps:
            indices = torch.arange(cells, device=device)
        else:
            quarter = cells // 4
            uniform = torch.randint(cells, (quarter,), device=device)
            occupied = torch.nonzero(state.binaries.flatten())[:, 0]
            if quarter < occupied.numel():
                occupied = occupied[torch.randint(occupied.numel(), (quarter,), device=device)]
            indices = torch.cat([uniform, occupied])
        coords = torch.stack([indices // (res * res), (indices // res) % res, indices % res], dim=-1).float()
        unit = (coords + torch.rand_like(coords)) / res
        points = self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])
        occupancy = density_fn(points).reshape(-1).float() * step_size
        state.occs[indices] = torch.maximum(state.occs[indices] * 0.95, occupancy)
        level = state.occs[state.occs >= 0].mean().clamp(max=threshold)
        state.binaries.copy_((state.occs > level).view(state.binaries.shape))
        self._box = None

    def occupied_box(self) -> tuple[Tensor, float, float] | None:
        """The smallest box (2, 3) made of whole cells that holds every occupied cell, its diagonal and the
        grid's mean occupancy (nerfacc's cap on the alpha threshold); None when no cell is occupied.
        Computed once per grid refresh (one device sync), then cached."""
        if self._box is None:
            cells = torch.nonzero(self.estimator.binaries[0])
            if cells.numel() == 0:
                return None
            size = (self.aabb[1] - self.aabb[0]) / self.resolution
            box = torch.stack([self.aabb[0] + cells.amin(0) * size, self.aabb[0] + (cells.amax(0) + 1) * size])
            diagonal, mean = torch.stack([(box[1] - box[0]).norm(), self.estimator.occs.mean()]).tolist()
            self._box = (box, diagonal, mean)
        return self._box

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        origins: Tensor,
        directions: Tensor,
        density_fn: Callable[[Tensor], Tensor],
        step_size: float,
        alpha_threshold: float,
        early_stop_eps: float,
        stratified: bool,
        near: float = 0.0,
        prefix_rays: int | None = None,
        two_rounds: bool = True,
    ) -> PackedSamples:
        """:class:`PackedSamples` of rays (R, 3) with unit directions; ``density_fn`` (world points (M, 3) -> (M,))
        drops the invisible ones; ``prefix`` counted when ``prefix_rays`` is given.

        ``two_rounds``: with early stopping, evaluate the density of each ray's first :data:`FIRST_ROUND`
        candidates, then of the rest of the rays still transparent (less work when the field is opaque, two more
        device syncs); without it every candidate's density is evaluated at once. The samples are the same (given
        densities that do not depend on how the queries are batched).
        """
        n_rays = origins.shape[0]
        occupied = self.occupied_box()
        if alpha_threshold > 0 and occupied is not None:
            alpha_threshold = min(alpha_threshold, occupied[2])
        base = torch.full((n_rays,), float(near), device=origins.device, dtype=torch.float32)
        if stratified:
            base = base + torch.rand(n_rays, device=origins.device) * step_size
        empty = torch.zeros(0, device=origins.device)
        nothing = PackedSamples(empty.long(), empty, empty, None if prefix_rays is None else 0)
        if occupied is None:
            return nothing
        # every sample lies in an occupied cell: march only the rays that cross the occupied cells' box, and
        # only across it (the same lattice points as marching the whole box, fewer of them to test)
        box, diagonal, _ = occupied
        origins, directions = origins.float(), directions.float()
        t_near, t_far, hit = ray_aabb_intersect(origins, directions, box, near)
        rays = torch.nonzero(hit).squeeze(1)
        if rays.numel() == 0:
            return nothing
        steps = math.ceil(diagonal / step_size) + 1
        chunk = max(1, CANDIDATES_PER_CHUNK // steps)
        # the first lattice interval whose midpoint is at or after the box entry, per ray
        k0 = torch.ceil((t_near[rays] - base[rays]) / step_size - 0.5).clamp_min(0)
        first_mid = base[rays] + (k0 + 0.5) * step_size
        # the occupied lattice points of every ray, chunk by chunk (bounded transient memory, no sync)
        candidate = torch.cat([
            self._occupied_lattice(origins[part], directions[part], first_mid[s : s + chunk], t_far[part], steps, step_size)
            for s, part in ((s, rays[s : s + chunk]) for s in range(0, rays.numel(), chunk))
        ])  # fmt: skip
        where = torch.nonzero(candidate.view(-1)).squeeze(1)  # (rays, steps) flattened: sorted by ray
        rows = torch.div(where, steps, rounding_mode="floor")
        t_mid = first_mid[rows] + (where - rows * steps).float() * step_size
        ray_ids = rays[rows]
        keep = None
        if where.numel() and (early_stop_eps > 0 or alpha_threshold > 0):
            keep = self._visible(origins, directions, ray_ids, t_mid, density_fn, step_size, alpha_threshold, early_stop_eps, two_rounds)
        return _packed(ray_ids, t_mid, keep, step_size, prefix_rays)

    @staticmethod
    def _visible(
        origins: Tensor,
        directions: Tensor,
        ray_ids: Tensor,
        t_mid: Tensor,
        density_fn: Callable[[Tensor], Tensor],
        step_size: float,
        alpha_threshold: float,
        early_stop_eps: float,
        two_rounds: bool = True,
    ) -> Tensor:
        """(M,) bool: which packed candidates (sorted by ray) are in front of the point where transmittance falls
        below ``early_stop_eps`` and have alpha >= ``alpha_threshold``.

        With early stopping and ``two_rounds`` the density is evaluated in two rounds: each ray's first
        :data:`FIRST_ROUND` candidates, then the rest only of the rays still transparent after them (the others
        cannot keep any); unevaluated candidates count as empty, which changes no decision.
        """
        points = origins[ray_ids] + directions[ray_ids] * t_mid[:, None]
        start = torch.searchsorted(ray_ids, ray_ids)  # each candidate's ray's first candidate

        def density(part: Tensor) -> Tensor:
            return torch.cat([density_fn(chunk).reshape(-1).float() for chunk in part.split(DENSITY_POINTS)])

        def evaluate(mask: Tensor) -> None:
            index = torch.nonzero(mask).squeeze(1)
            if index.numel():
                sigma[index] = density(points[index])

        def transmittance() -> Tensor:
            return transmittance_before(sigma.double() * step_size, start)

        if early_stop_eps > 0 and two_rounds:
            sigma = torch.zeros_like(t_mid)
            first = torch.arange(t_mid.numel(), device=t_mid.device) - start < FIRST_ROUND
            evaluate(first)
            evaluate(~first & (transmittance() >= early_stop_eps))
        else:
            sigma = density(points)
        keep = transmittance() >= early_stop_eps
        if alpha_threshold > 0:
            keep &= (1.0 - torch.exp(-sigma * step_size)) >= alpha_threshold
        return keep

    def _occupied_lattice(self, origins: Tensor, directions: Tensor, first_mid: Tensor, t_far: Tensor, steps: int, step_size: float) -> Tensor:
        """(rays, steps) bool: lattice midpoints ``first_mid + k * step_size`` before ``t_far`` in an occupied cell."""
        t_mid = first_mid[:, None] + torch.arange(steps, device=origins.device, dtype=torch.float32) * step_size
        res = self.resolution
        flat = None
        for axis in range(3):  # the midpoint's cell, one axis at a time (int32: small transient memory)
            lo, size = self.aabb[0, axis], self.aabb[1, axis] - self.aabb[0, axis]
            unit = (origins[:, axis, None] + directions[:, axis, None] * t_mid - lo) / size
            index = (unit * res).floor_().clamp_(0, res - 1).to(torch.int32)
            flat = index if flat is None else flat * res + index
        candidate = self.estimator.binaries.view(-1)[flat]
        candidate &= t_mid < t_far[:, None]
        return candidate


def _packed(ray_ids: Tensor, t_mid: Tensor, keep: Tensor | None, step_size: float, prefix_rays: int | None) -> PackedSamples:
    """The candidates (M,) at lattice midpoints ``t_mid`` of rays ``ray_ids`` (sorted) that ``keep`` marks (all when
    None) as :class:`PackedSamples`: one device sync reads their count (and the first ``prefix_rays`` rays' count
    with it); ``nonzero_static`` then packs them without another."""
    counts = [] if keep is None else [keep.sum()]
    if prefix_rays is not None:
        before = ray_ids < prefix_rays
        counts.append(before.sum() if keep is None else (before & keep).sum())
    read = torch.stack(counts).tolist() if counts else []
    if keep is not None:
        kept = torch.nonzero_static(keep, size=read.pop(0)).squeeze(1)
        ray_ids, t_mid = ray_ids[kept], t_mid[kept]
    t_starts = t_mid - 0.5 * step_size
    return PackedSamples(ray_ids, t_starts, t_starts + step_size, read[0] if read else None)


def _forget_box(module: TorchOccupancyGrid, _keys: object) -> None:
    """A loaded grid invalidates the cached box of occupied cells."""
    module._box = None


def packed_weights(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor) -> Tensor:
    """Compositing weights w_i = T_i (1 - exp(-sigma_i delta_i)) of packed samples (M,) sorted by ray.

    The exclusive sum of optical depth restarts at every ray: a float64 running sum minus its value at
    the ray's first sample (found by a binary search of the sorted ray indices; no per-ray loop, no host
    sync); differentiable w.r.t. ``sigmas``.
    """
    optical = sigmas * (t_ends - t_starts)
    if optical.numel() == 0:
        return optical
    transmittance = transmittance_before(optical, torch.searchsorted(ray_indices, ray_indices)).to(optical.dtype)
    return transmittance * (1.0 - torch.exp(-optical))


def transmittance_before(optical: Tensor, first: Tensor) -> Tensor:
    """float64 transmittance (M,) in front of each packed sample of optical depth ``optical`` (M,), sorted by ray:
    exp(-exclusive running sum), restarted at each ray's first sample, whose index ``first`` (M,) gives per sample
    (one float64 cumsum, no per-ray loop, no host sync; differentiable w.r.t. ``optical``)."""
    optical = optical.double()
    before = torch.cumsum(optical, 0) - optical
    return torch.exp(-(before - torch.gather(before, 0, first)))


def accumulate_packed(weights: Tensor, values: Tensor | None, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Per-ray sums (n_rays, C) of ``weights`` (M,) times ``values`` (M, C); without values, (n_rays, 1) opacity."""
    src = weights[:, None] if values is None else weights[:, None] * values
    return torch.zeros(n_rays, src.shape[-1], device=src.device, dtype=src.dtype).index_add_(0, ray_indices, src)
