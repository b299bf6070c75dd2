"""Multi-resolution hash encoding (instant-NGP) with interchangeable backends.

:class:`HashGridEncoding` is the one module callers see. It owns the level
mask (coarse-to-fine schedules) and delegates the lookup to a backend module:

* ``torch``: :class:`TorchHashGrid`, the plain PyTorch reference (CPU and GPU,
  differentiable twice, so analytic normals can be trained through);
* ``triton``: ``recon.encoding.triton_backend.TritonHashGrid``, fused Triton
  kernels on the same table (CUDA; first-order gradients only);
* ``tcnn``: ``recon.encoding.tcnn_backend.TcnnHashGrid`` (tinycudann, CUDA).

A backend is any ``nn.Module`` built from a :class:`HashGridConfig` whose
``forward(x (P, 3) in [0, 1]) -> (P, n_levels * F)``; :data:`BACKENDS` maps a
name to its factory, so a fused kernel can be added without touching callers.

The table layout follows tinycudann's grid encoding, so parameters can be
copied between the two backends: level ``l`` has scale
``base_resolution * per_level_scale**l - 1`` and ``ceil(scale) + 1`` vertices
per axis; a point maps to ``x * scale + 0.5`` in vertex units; a level whose
vertex count cubed fits the table is indexed densely (x fastest), finer levels
use the spatial hash ``(i * 1) ^ (j * 2654435761) ^ (k * 805459861)`` (uint32);
each level holds ``min(vertices**3 rounded up to 8, 2**log2_hashmap_size)``
rows of ``F`` features in one flat ``(rows, F)`` table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from recon.errors import ReconError

PRIMES = (1, 2654435761, 805459861)
INIT_RANGE = 1e-4


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
    """Plain PyTorch hash-grid lookup, vectorised over levels and the 8 cell corners.

    All levels gather from one flat ``table`` (rows, F) with per-level row
    offsets, so a forward pass is a few dozen kernels whatever the level count.
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
        self.register_buffer("strides", torch.tensor([[1, lay.resolution, lay.resolution**2] for lay in layouts]), persistent=False)
        self.register_buffer("offsets", torch.tensor([lay.offset for lay in layouts]), persistent=False)
        self.register_buffer("sizes", torch.tensor([lay.size for lay in layouts]), persistent=False)
        self.register_buffer("hashed", torch.tensor([lay.hashed for lay in layouts]), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES), persistent=False)

    @property
    def output_dim(self) -> int:
        """Features per point: n_levels * n_features_per_level."""
        return self.cfg.n_levels * self.cfg.n_features_per_level

    def forward(self, x: Tensor) -> Tensor:
        """Encodes points ``x`` (P, 3) in [0, 1] (clamped) -> (P, n_levels * F) in the table's dtype."""
        n_points, n_levels = x.shape[0], self.scales.shape[0]
        points = x.to(self.table.dtype).clamp(0.0, 1.0)
        pos = points[:, None, :] * self.scales.to(points.dtype)[:, None] + 0.5  # (P, L, 3)
        base = pos.detach().floor()
        frac = pos - base  # gradients flow to x through the fractional part only
        low = base.long()
        ends = torch.stack([low, low + 1], dim=2)  # (P, L, 2, 3): [lower/upper vertex, axis]
        # per-axis index terms, combined over the 2 x 2 x 2 corners by broadcasting
        dense = _corners(ends * self.strides[:, None, :], torch.add)
        hashed = _corners((ends * self.primes) & 0xFFFFFFFF, torch.bitwise_xor)
        level = (slice(None), None, None, None)
        rows = torch.where(self.hashed[level], hashed, dense) % self.sizes[level] + self.offsets[level]  # (P, L, 2, 2, 2)
        weights = _corners(torch.stack([1.0 - frac, frac], dim=2), torch.mul)  # trilinear, (P, L, 2, 2, 2)
        features = self.table.index_select(0, rows.reshape(-1)).view(n_points, n_levels, 8, -1)
        out = (features * weights.reshape(n_points, n_levels, 8, 1)).sum(2)
        return out.reshape(n_points, -1)


def _corners(per_axis: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Combines per-axis terms (..., 2, 3) into the 8 cell corners (..., 2, 2, 2) indexed [x bit, y bit, z bit]."""
    x = per_axis[..., :, None, None, 0]
    y = per_axis[..., None, :, None, 1]
    z = per_axis[..., None, None, :, 2]
    return op(op(x, y), z)


def _make_torch(cfg: HashGridConfig) -> nn.Module:
    return TorchHashGrid(cfg)


def _make_tcnn(cfg: HashGridConfig) -> nn.Module:
    from recon.encoding.tcnn_backend import TcnnHashGrid

    return TcnnHashGrid(cfg)


def _make_triton(cfg: HashGridConfig) -> nn.Module:
    from recon.encoding.triton_backend import TritonHashGrid

    return TritonHashGrid(cfg)


BACKENDS: dict[str, Callable[[HashGridConfig], nn.Module]] = {"torch": _make_torch, "triton": _make_triton, "tcnn": _make_tcnn}
"""Backend name -> factory building the lookup module from a config."""


def resolve_backend(name: str) -> str:
    """The concrete backend for a requested name ("auto": tcnn, else triton on CUDA; torch on the CPU)."""
    from recon.encoding.tcnn_backend import tcnn_available
    from recon.encoding.triton_backend import triton_available

    if name == "auto":
        if torch.cuda.is_available() and tcnn_available():
            return "tcnn"
        if torch.cuda.is_available() and triton_available():
            return "triton"
        if torch.cuda.is_available():
            warnings.warn("neither tinycudann nor triton is installed: using the plain PyTorch hash grid (slower)", stacklevel=3)
        return "torch"
    if name not in BACKENDS:
        raise ReconError(f"encoding.backend {name!r} is unknown; choose auto, {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available():
        raise ReconError("encoding.backend 'triton' needs the triton package and CUDA: install triton or use backend torch/auto")
    if name == "tcnn" and not (torch.cuda.is_available() and tcnn_available()):
        raise ReconError("encoding.backend 'tcnn' needs tinycudann and CUDA: install tinycudann or use backend torch/auto")
    return name


class HashGridEncoding(nn.Module):
    """Hash-grid encoding of points in the unit cube, with coarse-to-fine level masking.

    ``forward(x (P, 3) in [0, 1]) -> (P, n_levels * F)`` float32. The lookup is
    done by ``self.backend`` (name in ``backend_name``); masked levels give
    exactly zero features (and zero gradient to their table rows).
    """

    def __init__(self, cfg: HashGridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend_name = resolve_backend(cfg.backend)
        self.backend = BACKENDS[self.backend_name](cfg)
        self.register_buffer("level_mask", torch.ones(cfg.n_levels * cfg.n_features_per_level))

    @property
    def n_levels(self) -> int:
        """Number of resolution levels."""
        return self.cfg.n_levels

    @property
    def output_dim(self) -> int:
        """Features per point: n_levels * n_features_per_level."""
        return self.cfg.n_levels * self.cfg.n_features_per_level

    @property
    def active_levels(self) -> int:
        """How many levels (from the coarsest) currently contribute."""
        return int(self.level_mask.view(self.cfg.n_levels, -1)[:, 0].sum().item())

    def set_active_levels(self, k: int) -> None:
        """Keeps levels 0..k-1 and zeroes levels >= k (k is clipped to [0, n_levels])."""
        k = max(0, min(int(k), self.cfg.n_levels))
        mask = torch.zeros(self.cfg.n_levels, self.cfg.n_features_per_level, device=self.level_mask.device)
        mask[:k] = 1.0
        self.level_mask.copy_(mask.view(-1))

    def forward(self, x: Tensor) -> Tensor:
        """(P, 3) points in [0, 1] -> (P, output_dim) features."""
        features = self.backend(x)
        if features.dtype == torch.float16:
            features = features.float()
        return features * self.level_mask.to(features.dtype)


def make_encoding(cfg: HashGridConfig) -> HashGridEncoding:
    """Builds the hash-grid encoding with the backend ``cfg.backend`` resolves to."""
    return HashGridEncoding(cfg)
