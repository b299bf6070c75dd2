"""Multi-resolution hash encoding (instant-NGP) with interchangeable backends.

:class:`HashGridEncoding` is the one module callers see. It owns the level
mask (coarse-to-fine schedules) and delegates the lookup to a backend module:

* ``torch``: :class:`TorchHashGrid`, the plain PyTorch reference (CPU and GPU,
  differentiable twice, so analytic normals can be trained through);
* ``triton``: ``recon.encoding.triton_backend.TritonHashGrid``, fused Triton
  kernels on the same table (CUDA; gradients differentiable once more w.r.t.
  the table, enough for analytic normals);
* ``tcnn``: ``recon.encoding.tcnn_backend.TcnnHashGrid`` (tinycudann, CUDA).

A backend is any ``nn.Module`` built from a :class:`HashGridConfig` whose
``forward(x (P, 3) in [0, 1]) -> (P, n_levels * F)``; :data:`BACKENDS` maps a
name to its factory, so a fused kernel can be added without touching callers.

The configuration, table layout and the reference lookup live below the
backends in :mod:`recon.encoding.reference`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from recon.encoding.reference import HashGridConfig, TorchHashGrid
from recon.errors import ReconError


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
        self.register_load_state_dict_post_hook(_lookup_every_level)

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
        if hasattr(self.backend, "set_active_levels"):  # a fused backend skips the masked levels' lookups
            self.backend.set_active_levels(k)

    def forward(self, x: Tensor) -> Tensor:
        """(P, 3) points in [0, 1] -> (P, output_dim) features."""
        return self._masked(self.backend(x))

    def _masked(self, features: Tensor) -> Tensor:
        if features.dtype == torch.float16:
            features = features.float()
        return features * self.level_mask.to(features.dtype)

    def mlp_channel(self, x: Tensor, linears: list[nn.Linear], channel: int) -> Tensor | None:
        """Output ``channel`` (P,) float32 of the MLP ``linears`` (ReLU between layers, at least two layers) on the
        features of points ``x`` (P, 3) in [0, 1], without gradients, in one fused kernel that never stores
        the features; None where the backend has none for this input (then encode and run the MLP)."""
        if not hasattr(self.backend, "mlp_channel") or len(linears) < 2:
            return None
        first, last = linears[0], linears[-1]
        with torch.no_grad():
            w_first = (first.weight * self.level_mask).t()
            return self.backend.mlp_channel(x, w_first, first.bias, linears[1:-1], last.weight[channel], last.bias[channel : channel + 1])

    def encode_with_input_gradient(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """:meth:`forward` of points ``x`` (P, 3) in [0, 1], and a function from dL/dfeatures (Q, output_dim) of
        its first Q <= P points to dL/dx (Q, 3) there, for backends that have one (the Triton grid; check
        ``hasattr(encoding.backend, "encode_with_input_gradient")``).

        With grad enabled dL/dx keeps its graph to dL/dfeatures and the table (second-order training), in two
        kernels instead of a second differentiation of the whole lookup; where dL/dfeatures is computed from
        these features, as analytic normals compute it, the backward adds both table gradients in one scatter.
        """
        features, backend_gradient = self.backend.encode_with_input_gradient(x)

        def input_gradient(grad_features: Tensor) -> Tensor:
            return backend_gradient(grad_features.float() * self.level_mask)

        return self._masked(features), input_gradient


def make_encoding(cfg: HashGridConfig) -> HashGridEncoding:
    """Builds the hash-grid encoding with the backend ``cfg.backend`` resolves to."""
    return HashGridEncoding(cfg)


def _lookup_every_level(module: HashGridEncoding, _keys: object) -> None:
    """After loading a state dict (whose level mask may differ) a fused backend looks up every level again:
    a superset of the active ones is always right, the mask zeroes the rest."""
    if hasattr(module.backend, "set_active_levels"):
        module.backend.set_active_levels(module.cfg.n_levels)
