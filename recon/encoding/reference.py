"""The hash grid's configuration, table layout and plain-PyTorch reference lookup.

The bottom of recon.encoding: the fused backends (triton_backend, tcnn_backend)
build on these definitions and are tested for parity against
:class:`TorchHashGrid`; :mod:`recon.encoding.hashgrid` picks among them.

The table layout follows tinycudann's grid encoding, so parameters can be
copied between the backends: level ``l`` has scale
``base_resolution * per_level_scale**l - 1`` and ``ceil(scale) + 1`` vertices
per axis; a point maps to ``x * scale + 0.5`` in vertex units; a level whose
vertex count cubed fits the table is indexed densely (x fastest), finer levels
use the spatial hash ``(i * 1) ^ (j * 2654435761) ^ (k * 805459861)`` (uint32);
each level holds ``min(vertices**3 rounded up to 8, 2**log2_hashmap_size)``
rows of ``F`` features in one flat ``(rows, F)`` table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from recon.errors import ReconError

PRIMES = (1, 2654435761, 805459861)
INIT_RANGE = 1e-4
CPU_POINTS_PER_PASS = 1 << 16
"""On the CPU the lookup runs over at most this many points at a time, so that its intermediates stay in cache
(a trained field's 363k points: 0.19-0.27 s in passes of 2^16 against 0.57-0.58 s in one, forward only; forward
and backward 0.88 against 1.27 s; a 2-core machine, docs/SPEED.md). Values are the same; a table gradient sums
in another order."""


@dataclass
class HashGridConfig:
    """Multi-resolution hash grid (instant-NGP)."""

    n_levels: int = 16
    """Number of resolution levels."""
    n_features_per_level: int = 2
    """Features stored per table entry."""
    log2_hashmap_size: int = 19
    """log2 of the number of entries per level's table."""
    base_resolution: int = 16
    """Grid resolution of the coarsest level."""
    per_level_scale: float = 1.447269
    """Resolution growth factor from one level to the next."""
    backend: Literal["auto", "torch", "triton", "tcnn"] = "auto"
    """Implementation: auto (on CUDA tinycudann if installed, else triton; torch on the CPU), torch, triton or tcnn."""

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.n_features_per_level < 1:
            raise ReconError(f"encoding: n_levels and n_features_per_level must be >= 1, got {self.n_levels}, {self.n_features_per_level}")
        if not 1 <= self.log2_hashmap_size <= 30:
            raise ReconError(f"encoding: log2_hashmap_size must be in [1, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 1 or self.per_level_scale < 1.0:
            raise ReconError("encoding: base_resolution must be >= 1 and per_level_scale >= 1")


@dataclass(frozen=True)
class LevelLayout:
    """Where one level lives in the flat table and how it is indexed."""

    scale: float
    """Point-to-vertex scale: a point x in [0, 1] sits at x * scale + 0.5."""
    resolution: int
    """Vertices per axis used for the dense stride."""
    offset: int
    """First row of the level in the flat table."""
    size: int
    """Rows of the level."""
    hashed: bool
    """True when the level uses the spatial hash instead of dense indexing."""


def level_layouts(cfg: HashGridConfig) -> list[LevelLayout]:
    """Per-level scale, resolution and table slice (tinycudann's layout)."""
    table_size = 2**cfg.log2_hashmap_size
    log2_scale = math.log2(cfg.per_level_scale)
    layouts, offset = [], 0
    for level in range(cfg.n_levels):
        # float32 arithmetic, as tinycudann computes it on the device
        scale = float(torch.tensor(2.0 ** (level * log2_scale), dtype=torch.float32) * cfg.base_resolution - 1.0)
        resolution = math.ceil(scale) + 1
        dense_rows = resolution**3
        size = min(-(-dense_rows // 8) * 8, table_size)
        layouts.append(LevelLayout(scale, resolution, offset, size, hashed=dense_rows > size))
        offset += size
    return layouts


class TorchHashGrid(nn.Module):
    """Plain PyTorch hash-grid lookup, vectorised over the 8 cell corners and over the levels of each kind
    (dense, then hashed).

    All levels gather from one flat ``table`` (rows, F) with per-level row
    offsets, so a forward pass is a few dozen kernels whatever the level count.
    Every intermediate is laid out (corner, level, point) with the point index
    innermost: the elementwise kernels then run over long contiguous rows
    instead of broadcasting within the 2 x 2 x 2 corners of each point (with
    int32 index arithmetic, about twice as fast on a CPU: docs/FIELD.md).
    Memory: about 2.5 KB per point for 16 levels x 2 features (indices,
    corner features and weights kept for backward).
    """

    def __init__(self, cfg: HashGridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layouts = level_layouts(cfg)
        rows = layouts[-1].offset + layouts[-1].size
        self.table = nn.Parameter(torch.empty(rows, cfg.n_features_per_level).uniform_(-INIT_RANGE, INIT_RANGE))
        self.register_buffer("scales", torch.tensor([lay.scale for lay in layouts], dtype=torch.float32), persistent=False)
        # Vertex and row arithmetic in int32 (half the memory traffic of int64) wherever every row number fits;
        # the hash's products take int64 from the primes.
        index = torch.int32 if rows < 2**31 else torch.int64
        strides = [[1, lay.resolution, lay.resolution**2] for lay in layouts]
        self.register_buffer("strides", torch.tensor(strides, dtype=index), persistent=False)
        self.register_buffer("offsets", torch.tensor([lay.offset for lay in layouts], dtype=index), persistent=False)
        self.register_buffer("sizes", torch.tensor([lay.size for lay in layouts], dtype=index), persistent=False)
        self.register_buffer("hashed", torch.tensor([lay.hashed for lay in layouts]), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES), persistent=False)
        # levels indexed densely come first: a level's vertex count only grows with the level
        self.dense_levels = next((level for level, lay in enumerate(layouts) if lay.hashed), len(layouts))

    @property
    def output_dim(self) -> int:
        """Features per point: n_levels * n_features_per_level."""
        return self.cfg.n_levels * self.cfg.n_features_per_level

    def forward(self, x: Tensor) -> Tensor:
        """Encodes points ``x`` (P, 3) in [0, 1] (clamped) -> (P, n_levels * F) in the table's dtype (on the CPU in
        passes of :data:`CPU_POINTS_PER_PASS` points)."""
        if not x.is_cuda and x.shape[0] > CPU_POINTS_PER_PASS:
            return torch.cat([self._encode(part) for part in x.split(CPU_POINTS_PER_PASS)])
        return self._encode(x)

    def _encode(self, x: Tensor) -> Tensor:
        n_points = x.shape[0]
        points = x.to(self.table.dtype).clamp(0.0, 1.0)
        pos = self.scales.to(points.dtype)[:, None, None] * points.T + 0.5  # (L, 3, P)
        base = pos.detach().floor()
        frac = pos - base  # gradients flow to x through the fractional part only
        low = base.to(self.offsets.dtype)
        ends = torch.stack([low, low + 1])  # (2, L, 3, P): [lower/upper vertex, level, axis, point]
        weights = _corners(torch.stack([1.0 - frac, frac]), torch.mul)  # trilinear, (2, 2, 2, L, P)
        # Dense levels come first (finer levels only grow), so each group's indices are computed for its own levels
        # alone; per-axis index terms are combined over the 2 x 2 x 2 corners by broadcasting.
        dense, groups = self.dense_levels, []
        if dense > 0:
            rows = _corners(ends[:, :dense] * self.strides[:dense, :, None], torch.add) % self.sizes[:dense, None]
            groups.append(self._interpolate(rows + self.offsets[:dense, None], weights[:, :, :, :dense]))
        if dense < self.scales.shape[0]:
            # A hashed level holds exactly 2**log2_hashmap_size (<= 2**30) rows: the modulo is a mask, and the low bits
            # it keeps are those of the uint32 products, so the products need no reduction to 32 bits first.
            hashed = _corners(ends[:, dense:] * self.primes[:, None], torch.bitwise_xor)
            rows = hashed & (2**self.cfg.log2_hashmap_size - 1)
            groups.append(self._interpolate(rows + self.offsets[dense:, None], weights[:, :, :, dense:]))
        return torch.cat(groups).transpose(0, 1).reshape(n_points, self.output_dim)

    def _interpolate(self, rows: Tensor, weights: Tensor) -> Tensor:
        """Table rows (2, 2, 2, l, P) blended by their corner weights (2, 2, 2, l, P) -> (l, P, F)."""
        n_levels, n_points = rows.shape[3:]
        rows = rows.reshape(-1)
        if torch.is_grad_enabled() and self.table.requires_grad:
            rows = rows.long()  # index_select's backward (index_add) is several times slower with int32 indices
        features = self.table.index_select(0, rows).view(8, n_levels, n_points, self.cfg.n_features_per_level)
        weights = weights.reshape(8, n_levels, n_points)
        # one feature at a time: a (8, l, P) product, not one broadcast over the last F-wide dimension
        return torch.stack([(features[..., f] * weights).sum(0) for f in range(self.cfg.n_features_per_level)], dim=-1)


def _corners(per_axis: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Combines per-axis terms (2, l, 3, P) into the 8 cell corners (2, 2, 2, l, P) indexed [x bit, y bit, z bit]."""
    x = per_axis[:, None, None, :, 0]
    y = per_axis[None, :, None, :, 1]
    z = per_axis[None, None, :, :, 2]
    return op(op(x, y), z)


def autograd_input_gradient(lookup: Callable[[Tensor], Tensor], x: Tensor, grad_features: Tensor) -> Tensor:
    """dL/dx (P, 3) at points ``x`` (P, 3) for dL/dfeatures ``grad_features`` (P, D) of ``lookup`` (points -> (P, D)
    features), by differentiating the lookup with autograd; with grad enabled the result keeps its graph."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        point = x.detach().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(lookup(point).float(), point, grad_features, create_graph=create_graph)
    return grad_x
