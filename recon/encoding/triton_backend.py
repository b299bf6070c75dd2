"""Fused hash-grid lookup in Triton: one kernel per pass instead of dozens.

:class:`TritonHashGrid` has exactly the parameters, table layout and hash of
:class:`recon.encoding.hashgrid.TorchHashGrid` (it subclasses it), so the two
are interchangeable and held together by a parity test. The forward kernel
walks all levels and the 8 cell corners of each point in registers; the
backward kernel scatters table gradients with atomic adds and, when the
points need a gradient, accumulates it from the trilinear weights'
derivatives. It is first-order only: a field that differentiates its normals
again (analytic normals inside a loss) must use the torch backend or finite
difference normals.

On the CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the parity test runs without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recon.encoding.reference import HashGridConfig, TorchHashGrid

BLOCK = 128


def triton_available() -> bool:
    """True when Triton is importable and can run here (CUDA, or the interpreter on the CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    from recon.encoding import triton_kernels

    return triton_kernels.forward_kernel, triton_kernels.backward_kernel


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, grid: TritonHashGrid) -> Tensor:  # type: ignore[override]
        forward_kernel, _ = _kernels()
        x = x.contiguous().float()
        n_points, n_levels, n_features = x.shape[0], grid.cfg.n_levels, grid.cfg.n_features_per_level
        out = torch.empty(n_points, n_levels * n_features, device=x.device, dtype=torch.float32)
        if n_points:
            forward_kernel[(-(-n_points // BLOCK),)](
                x, table, out, grid.scales, grid.strides[:, 1].contiguous(), grid.offsets, grid.sizes, grid.hashed_int,
                n_points, n_levels, F=n_features, BLOCK_P=BLOCK,
            )
        ctx.save_for_backward(x, table)
        ctx.grid = grid
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        _, backward_kernel = _kernels()
        x, table = ctx.saved_tensors
        grid: TritonHashGrid = ctx.grid
        need_x = ctx.needs_input_grad[0]
        grad_table = torch.zeros_like(table)
        grad_x = torch.zeros_like(x) if need_x else x.new_empty(1)
        n_points = x.shape[0]
        if n_points:
            backward_kernel[(-(-n_points // BLOCK),)](
                x, table, grad_out.contiguous().float(), grad_table, grad_x,
                grid.scales, grid.strides[:, 1].contiguous(), grid.offsets, grid.sizes, grid.hashed_int,
                n_points, grid.cfg.n_levels, F=grid.cfg.n_features_per_level, BLOCK_P=BLOCK, NEED_GRAD_X=need_x,
            )
        return (grad_x if need_x else None), grad_table, None


class TritonHashGrid(TorchHashGrid):
    """The torch backend's table and layout, looked up by fused Triton kernels (first-order gradients)."""

    def __init__(self, cfg: HashGridConfig) -> None:
        if cfg.n_features_per_level & (cfg.n_features_per_level - 1):
            raise ValueError(f"the triton hash grid needs a power-of-two n_features_per_level, got {cfg.n_features_per_level}")
        super().__init__(cfg)
        self.register_buffer("hashed_int", self.hashed.to(torch.int32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Encodes points ``x`` (P, 3) in [0, 1] (clamped) -> (P, n_levels * F) float32."""
        return _HashGridFunction.apply(x, self.table, self)
