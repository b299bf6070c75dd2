"""Fused hash-grid lookup in Triton: one kernel per pass instead of dozens.

:class:`TritonHashGrid` has exactly the parameters, table layout and hash of
:class:`recon.encoding.hashgrid.TorchHashGrid` (it subclasses it), so the two
are interchangeable and held together by parity tests. Each pass walks all
levels and the 8 cell corners of a block of points in registers
(recon/encoding/triton_kernels.py):

* forward: a gather of the table;
* gradient w.r.t. the points: a gather (no atomics);
* gradient w.r.t. the table: a scatter with relaxed atomic adds; the coarse
  dense levels, whose few rows every point hits, add into ``private_copies``
  replicas that are summed afterwards, so adds to one row do not contend.

Both first-order gradients are themselves differentiable with respect to
the upstream gradient and the table (not w.r.t. the points again), which is
what training through analytic normals needs: :meth:`TritonHashGrid.input_gradient`
gives dL/dx for given dL/dfeatures with that graph, and its backward is a
gather plus a scatter weighted by the trilinear weights' directional
derivatives. :meth:`TritonHashGrid.encode_with_input_gradient` pairs an
encoding with its input gradient so that the two table gradients go out in
one scatter (half the atomic adds of a normal-trained step). Second
derivatives w.r.t. the points are not computed (zero), as in tinycudann.

On the CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the parity tests run without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from recon.encoding.reference import HashGridConfig, TorchHashGrid, autograd_input_gradient, level_layouts

# points per program and warps per program: 256 x 4 measured ~10-20% faster than 128 x 4 on H200 (bench/hashgrid.py)
BLOCK = 256
NUM_WARPS = 4
# the fused lookup + MLP kernel (bench of 7.5M points' densities, H200): 128 points x 4 warps with tf32 tile dots
# 5.9 ms; 64 x 4 9.7, 256 x 8 7.1, 128 x 8 10.8; ieee float32 dots 14.3; the encoding then the MLP in bf16 11.6
MLP_BLOCK = 128
MLP_WARPS = 4


def triton_available() -> bool:
    """True when Triton is importable and can run here (CUDA, or the interpreter on the CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or interpreted()


def interpreted() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``, Triton's own switch)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_can_read(x: Tensor) -> bool:
    """Whether the kernels can take ``x``: a CUDA tensor, or any tensor under Triton's interpreter. CPU tensors
    outside it (a field on the CPU of a GPU machine, as with ``--device cpu``) go through the reference lookup."""
    return x.is_cuda or interpreted()


@functools.cache
def _kernels():
    from recon.encoding import triton_kernels

    notice_first_build("forward_kernel", "hash grid: compiling its Triton kernels")
    return triton_kernels


def notice_first_build(kernel: str, what: str) -> None:
    """Prints "``what`` (first run on this machine; ...)" when Triton is about to compile the kernel named
    ``kernel`` rather than load a cached build (never under the interpreter, which compiles nothing)."""
    if not interpreted() and not compiled_before(kernel):
        from recon.progress import info

        info(f"{what} (first run on this machine; cached for later runs)")


def compiled_before(kernel: str) -> bool:
    """Whether Triton's on-disk cache (``TRITON_CACHE_DIR``, default ~/.triton/cache) holds a build of the
    Triton function named ``kernel``: then the first launches load cached binaries instead of compiling."""
    from pathlib import Path

    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return cache.is_dir() and any(cache.glob(f"*/{kernel}.*"))


def _grid(n_points: int, block: int = BLOCK) -> tuple[int]:
    return (-(-n_points // block),)


def _autocast_half(device: torch.device) -> int:
    """The fused MLP kernel's ``HALF``: the half type a linear layer on ``device`` computes in now (1 = bfloat16,
    2 = float16 under autocast), else 0 (float32, which the kernel does not serve)."""
    if not torch.is_autocast_enabled(device.type):
        return 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(torch.get_autocast_dtype(device.type), 0)


def _layout_args(grid: TritonHashGrid) -> tuple:
    return grid.scales, grid.resolutions, grid.offsets, grid.sizes, grid.hashed_int


def _gather(x: Tensor, table: Tensor, grid: TritonHashGrid, v: Tensor | None = None) -> Tensor:
    """(P, L * F) per-level sums over the cell corners of u_c T[row_c]: u_c = trilinear weights, or their derivative along ``v`` (P, 3)."""
    n_points, cfg = x.shape[0], grid.cfg
    # levels past the active ones are not written: zeros, as the level mask makes them anyway
    alloc = torch.empty if grid.active_levels == cfg.n_levels else torch.zeros
    out = alloc(n_points, cfg.n_levels * cfg.n_features_per_level, device=x.device, dtype=torch.float32)
    if n_points:
        _kernels().forward_kernel[_grid(n_points)](
            x, table.contiguous(), out, x if v is None else v.contiguous().float(), *_layout_args(grid),
            n_points, cfg.n_levels, grid.active_levels, F=cfg.n_features_per_level, BLOCK_P=BLOCK, DIRECTIONAL=v is not None, num_warps=NUM_WARPS,
        )
    return out


def _scatter(x: Tensor, grid: TritonHashGrid, grad_out: Tensor | None, directional: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Table gradient (rows, F) of points ``x`` (P, 3): per point and cell corner, w_c grad_out[p] (the
    encoding's table gradient; ``grad_out`` (P, L * F), None = no such term) plus, with ``directional`` =
    (v (Q, 3), grad_dir (Q, L * F)) for the first Q <= P points, the weight's derivative along v[p] times
    grad_dir[p] (the table gradient of <v, dL/dx>); both terms in one scatter."""
    rows, n_features = grid.table.shape
    private_rows, copies = grid.private_rows, grid.private_copies
    buffer = torch.zeros(rows + copies * private_rows, n_features, device=x.device, dtype=torch.float32)
    v, grad_dir = (x, x) if directional is None else (t.contiguous().float() for t in directional)
    n_points = x.shape[0] if grad_out is not None else grad_dir.shape[0]
    if n_points:
        _kernels().scatter_kernel[_grid(n_points)](
            x, x if grad_out is None else grad_out.contiguous().float(), buffer, v, grad_dir, *_layout_args(grid),
            n_points, 0 if directional is None else grad_dir.shape[0], grid.cfg.n_levels, grid.active_levels,
            rows, grid.private_levels, private_rows, max(copies, 1),
            F=n_features, BLOCK_P=BLOCK, FIRST=grad_out is not None, DIRECTIONAL=directional is not None, num_warps=NUM_WARPS,
        )
    grad = buffer[:rows]
    if copies:
        grad[:private_rows] += buffer[rows:].view(copies, private_rows, n_features).sum(0)
    return grad


class _DeferredDirectional:
    """Hands the table gradient of <v, dL/dx> from :class:`_InputGradient`'s backward to the backward of the
    encoding it is paired with (:meth:`TritonHashGrid.encode_with_input_gradient`), which adds it in the same
    scatter as its own table gradient.

    A pair is made only where dL/dfeatures was computed from the paired features (its graph reaches the
    encoding's node, :func:`_reaches`): then in every backward pass the encoding's node runs after the input
    gradient's and finds the term waiting.
    """

    def __init__(self) -> None:
        self.pending: tuple[Tensor, Tensor] | None = None  # (v (Q, 3), dL/dfeatures (Q, L * F)) of the input gradient

    def take(self) -> tuple[Tensor, Tensor] | None:
        """The waiting term, if any, now owned by the encoding's backward."""
        pending, self.pending = self.pending, None
        return pending


def _reaches(start: torch.autograd.graph.Node | None, target: torch.autograd.graph.Node | None) -> bool:
    """Whether autograd node ``target`` lies in the graph of ``start`` (None for a tensor without one)."""
    if start is None or target is None:
        return False
    # keyed by id, holding the node: Python wrappers of C++ nodes are made on access, and a freed one's id can be reused
    seen: dict[int, torch.autograd.graph.Node] = {}
    stack = [start]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(following for following, _ in node.next_functions)
    return False


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, grid: TritonHashGrid, link: _DeferredDirectional | None) -> Tensor:  # type: ignore[override]
        x = x.contiguous().float()
        ctx.save_for_backward(x, table)
        ctx.grid, ctx.link = grid, link
        return _gather(x, table, grid)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        x, table = ctx.saved_tensors
        grad_out = grad_out.contiguous().float()
        grad_x = _InputGradient.apply(grad_out, x, table, ctx.grid, None) if ctx.needs_input_grad[0] else None
        grad_table = None
        if ctx.needs_input_grad[1]:
            pending = ctx.link.take() if ctx.link is not None else None
            if pending is not None and not torch.is_grad_enabled():
                grad_table = _scatter(x, ctx.grid, grad_out, pending)
            else:  # keeps the first-order term differentiable (a backward with create_graph)
                grad_table = _TableGradient.apply(grad_out, x, ctx.grid)
                if pending is not None:
                    grad_table = grad_table + _scatter(x, ctx.grid, None, pending)
        return grad_x, grad_table, None, None


class _InputGradient(torch.autograd.Function):
    """dL/dx (P, 3) from dL/dout (P, L * F); differentiable w.r.t. dL/dout and the table."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, table: Tensor, grid: TritonHashGrid, link: _DeferredDirectional | None) -> Tensor:  # type: ignore[override]
        grad_out = grad_out.contiguous().float()
        ctx.save_for_backward(grad_out, x, table)
        ctx.grid, ctx.link = grid, link
        grad_x = torch.empty_like(x)
        n_points, cfg = x.shape[0], grid.cfg
        if n_points:
            _kernels().input_grad_kernel[_grid(n_points)](
                x, table.contiguous(), grad_out, grad_x, *_layout_args(grid),
                n_points, cfg.n_levels, grid.active_levels, F=cfg.n_features_per_level, BLOCK_P=BLOCK, num_warps=NUM_WARPS,
            )
        return grad_x

    @staticmethod
    @once_differentiable
    def backward(ctx, v: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None]:  # type: ignore[override]
        grad_out, x, table = ctx.saved_tensors
        d_grad_out = _gather(x, table, ctx.grid, v) if ctx.needs_input_grad[0] else None
        d_table = None
        if ctx.needs_input_grad[2]:
            link = ctx.link
            if link is not None:
                link.pending = (v, grad_out)  # the paired encoding's backward, which runs next, scatters it with its own
            else:
                d_table = _scatter(x, ctx.grid, None, (v, grad_out))
        return d_grad_out, None, d_table, None, None


class _TableGradient(torch.autograd.Function):
    """dL/dtable from dL/dout; linear in dL/dout, so its own gradient is a forward gather."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, grid: TritonHashGrid) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.grid = grid
        return _scatter(x, grid, grad_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_table: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _gather(x, gg_table.float(), ctx.grid), None, None


class TritonHashGrid(TorchHashGrid):
    """The torch backend's table and layout, looked up by fused Triton kernels.

    ``private_copies``: replicas of the coarse dense levels' gradient rows that
    the table-gradient scatter spreads its atomic adds over (levels of at most
    ``private_max_rows`` rows); 0 = every add goes straight to the table.
    """

    def __init__(self, cfg: HashGridConfig, private_copies: int = 16, private_max_rows: int = 2**16) -> None:
        if cfg.n_features_per_level & (cfg.n_features_per_level - 1):
            raise ValueError(f"the triton hash grid needs a power-of-two n_features_per_level, got {cfg.n_features_per_level}")
        super().__init__(cfg)
        # the kernels read the layout as int64, whatever index type the reference lookup computes in
        self.strides, self.offsets, self.sizes = self.strides.long(), self.offsets.long(), self.sizes.long()
        self.register_buffer("hashed_int", self.hashed.to(torch.int32), persistent=False)
        self.register_buffer("resolutions", self.strides[:, 1].contiguous(), persistent=False)
        layouts = level_layouts(cfg)
        count = 0  # a leading run of small dense levels: their rows are the table's first rows
        while count < len(layouts) and not layouts[count].hashed and layouts[count].size <= private_max_rows:
            count += 1
        self.private_levels = count if private_copies > 0 else 0
        self.private_copies = private_copies if self.private_levels else 0
        self.private_rows = sum(lay.size for lay in layouts[: self.private_levels])
        self.active_levels = cfg.n_levels

    def set_active_levels(self, k: int) -> None:
        """Only levels 0..k-1 are looked up (the encoding masks the others); ``k`` in [0, n_levels]."""
        self.active_levels = max(0, min(int(k), self.cfg.n_levels))

    def forward(self, x: Tensor) -> Tensor:
        """Encodes points ``x`` (P, 3) in [0, 1] (clamped) -> (P, n_levels * F) float32; points the kernels cannot
        read (:func:`kernels_can_read`) through the reference lookup on the same table."""
        if not kernels_can_read(x):
            return super().forward(x)
        return _Encode.apply(x, self.table, self, None)

    def mlp_channel(
        self, x: Tensor, w_first: Tensor, b_first: Tensor, hidden: list[nn.Linear], w_last: Tensor, b_last: Tensor
    ) -> Tensor | None:
        """One output (P,) of a ReLU MLP on the encoding of points ``x`` (P, 3) in [0, 1], in one kernel that
        keeps the features in registers; no gradients. ``w_first`` (n_levels * F, width) input by output (the
        rows of masked levels zeroed by the caller), ``b_first`` (width,), ``hidden`` width -> width layers,
        ``w_last`` (width,) and ``b_last`` (1,) the output's row of the last layer. None where the kernel does
        not apply (points it cannot read, a width that is not a power of two >= 16; the caller encodes and runs
        the MLP instead), and outside half-precision autocast: the kernel rounds as a bfloat16 or float16 linear
        layer does, while its float32 tile products would be tf32, less exact than PyTorch's float32."""
        width, half = w_first.shape[1], _autocast_half(x.device)
        if not half or not kernels_can_read(x) or width < 16 or width & (width - 1):
            return None
        n_points, cfg = x.shape[0], self.cfg
        out = torch.empty(n_points, device=x.device, dtype=torch.float32)
        if hidden:
            w_hidden = torch.stack([layer.weight.t() for layer in hidden]).float().contiguous()
            b_hidden = torch.stack([layer.bias for layer in hidden]).float().contiguous()
        else:
            w_hidden, b_hidden = w_first, b_first  # not read
        inputs = max(16, 1 << (w_first.shape[0] - 1).bit_length())
        w_first = torch.cat([w_first.float(), w_first.new_zeros(inputs - w_first.shape[0], width, dtype=torch.float32)])
        if n_points:
            _kernels().mlp_channel_kernel[_grid(n_points, MLP_BLOCK)](
                x.contiguous().float(), self.table.detach().contiguous(), out, *_layout_args(self),
                w_first, b_first.float().contiguous(), w_hidden, b_hidden, w_last.float().contiguous(), b_last.float().contiguous(),
                n_points, self.active_levels, len(hidden), F=cfg.n_features_per_level, IN=inputs, WIDTH=width, BLOCK_P=MLP_BLOCK,
                HALF=half, num_warps=MLP_WARPS,
            )
        return out

    def input_gradient(self, x: Tensor, grad_features: Tensor) -> Tensor:
        """dL/dx (P, 3) of points ``x`` (P, 3) for dL/dfeatures (P, n_levels * F); differentiable w.r.t.
        ``grad_features`` and the table (the graph analytic normals train through). Points the kernels cannot
        read: the reference lookup differentiated with autograd."""
        if not kernels_can_read(x):
            return autograd_input_gradient(super().forward, x, grad_features)
        return _InputGradient.apply(grad_features, x.contiguous().float(), self.table, self, None)

    def encode_with_input_gradient(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """:meth:`forward` of points ``x`` (P, 3) and :meth:`input_gradient` at its first Q points as a function
        of dL/dfeatures (Q, n_levels * F). Where dL/dfeatures was computed from these features (as analytic
        normals compute it), the pair's backward adds both table gradients in one scatter instead of two."""
        if not kernels_can_read(x):
            lookup = super().forward
            return lookup(x), lambda grad: autograd_input_gradient(lookup, x[: grad.shape[0]], grad)
        x = x.contiguous().float()
        link = _DeferredDirectional()
        features = _Encode.apply(x, self.table, self, link)

        def input_gradient(grad: Tensor) -> Tensor:
            paired = link if _reaches(grad.grad_fn, features.grad_fn) else None
            return _InputGradient.apply(grad, x[: grad.shape[0]], self.table, self, paired)

        return features, input_gradient
