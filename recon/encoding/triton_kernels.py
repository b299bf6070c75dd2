"""Triton kernels of the fused hash-grid lookup (see recon.encoding.triton_backend).

Imported only when the Triton backend runs, so Triton stays optional. One
program handles BLOCK_P points across all levels; the table layout and hash
are those of recon.encoding.hashgrid.TorchHashGrid.
"""

import triton
import triton.language as tl


@triton.jit
def _load_unit_points(x_ptr, points, valid):
    """The three coordinates of ``points`` of x (P, 3), 0 where not ``valid``."""
    r0 = tl.load(x_ptr + points * 3 + 0, mask=valid, other=0.0)
    r1 = tl.load(x_ptr + points * 3 + 1, mask=valid, other=0.0)
    r2 = tl.load(x_ptr + points * 3 + 2, mask=valid, other=0.0)
    return r0, r1, r2


@triton.jit
def _cell(x, scale):
    """Integer vertex below ``x`` on a level and the fractional position in the cell."""
    pos = tl.minimum(tl.maximum(x, 0.0), 1.0) * scale + 0.5
    base = tl.floor(pos)
    return base.to(tl.int64), pos - base


@triton.jit
def _corner_rows(v0, v1, v2, res, size, offset, hashed):
    """Table rows of grid vertices (v0, v1, v2) on a level: dense index or spatial hash, modulo the level size."""
    dense = v0 + v1 * res + v2 * res * res
    # the spatial hash with recon.encoding.hashgrid.PRIMES, kept to 32 bits
    spatial = (v0 & 0xFFFFFFFF) ^ ((v1 * 2654435761) & 0xFFFFFFFF) ^ ((v2 * 805459861) & 0xFFFFFFFF)
    return tl.where(hashed != 0, spatial, dense) % size + offset


@triton.jit
def _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level):
    """A level's grid scale, resolution, table offset, table size and whether it is hashed."""
    scale = tl.load(scales_ptr + level)
    res = tl.load(res_ptr + level)
    offset = tl.load(offsets_ptr + level)
    size = tl.load(sizes_ptr + level)
    hashed = tl.load(hashed_ptr + level)
    return scale, res, offset, size, hashed


@triton.jit
def _corner_weights(corner, f0, f1, f2):
    """Offsets (0/1 per axis) of cell corner ``corner`` (0..7) and its trilinear weight factors per axis."""
    c0 = corner & 1
    c1 = (corner >> 1) & 1
    c2 = (corner >> 2) & 1
    w0 = c0 * f0 + (1 - c0) * (1.0 - f0)
    w1 = c1 * f1 + (1 - c1) * (1.0 - f1)
    w2 = c2 * f2 + (1 - c2) * (1.0 - f2)
    return c0, c1, c2, w0, w1, w2


@triton.jit
def forward_kernel(
    x_ptr, table_ptr, out_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    n_points, n_levels, F: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Encodes points x (P, 3) in the unit cube into out (P, n_levels * F): per level, trilinear
    interpolation of the F features at the 8 corners of the point's cell."""
    points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    feature = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    for level in range(n_levels):
        scale, res, offset, size, hashed = _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level)
        i0, f0 = _cell(r0, scale)
        i1, f1 = _cell(r1, scale)
        i2, f2 = _cell(r2, scale)
        acc = tl.zeros((BLOCK_P, F), dtype=tl.float32)
        for corner in tl.static_range(8):
            c0, c1, c2, w0, w1, w2 = _corner_weights(corner, f0, f1, f2)
            rows = _corner_rows(i0 + c0, i1 + c1, i2 + c2, res, size, offset, hashed)
            values = tl.load(table_ptr + rows[:, None] * F + feature[None, :], mask=valid[:, None], other=0.0)
            acc += (w0 * w1 * w2)[:, None] * values
        out_index = points[:, None] * (n_levels * F) + level * F + feature[None, :]
        tl.store(out_ptr + out_index, acc, mask=valid[:, None])


@triton.jit
def backward_kernel(
    x_ptr, table_ptr, grad_out_ptr, grad_table_ptr, grad_x_ptr,
    scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    n_points, n_levels, F: tl.constexpr, BLOCK_P: tl.constexpr, NEED_GRAD_X: tl.constexpr,
):
    """Backward of :func:`forward_kernel`: scatters grad_out (P, n_levels * F) into grad_table
    (atomic adds) and, if NEED_GRAD_X, writes grad_x (P, 3)."""
    points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    feature = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    g0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    g1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    g2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for level in range(n_levels):
        scale, res, offset, size, hashed = _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level)
        i0, f0 = _cell(r0, scale)
        i1, f1 = _cell(r1, scale)
        i2, f2 = _cell(r2, scale)
        out_index = points[:, None] * (n_levels * F) + level * F + feature[None, :]
        grad = tl.load(grad_out_ptr + out_index, mask=valid[:, None], other=0.0)
        for corner in tl.static_range(8):
            c0, c1, c2, w0, w1, w2 = _corner_weights(corner, f0, f1, f2)
            rows = _corner_rows(i0 + c0, i1 + c1, i2 + c2, res, size, offset, hashed)
            table_index = rows[:, None] * F + feature[None, :]
            tl.atomic_add(grad_table_ptr + table_index, (w0 * w1 * w2)[:, None] * grad, mask=valid[:, None])
            if NEED_GRAD_X:
                values = tl.load(table_ptr + table_index, mask=valid[:, None], other=0.0)
                dot = tl.sum(values * grad, axis=1) * scale
                g0 += dot * (2.0 * c0 - 1.0) * w1 * w2
                g1 += dot * (2.0 * c1 - 1.0) * w0 * w2
                g2 += dot * (2.0 * c2 - 1.0) * w0 * w1
    if NEED_GRAD_X:
        # clamp(x, 0, 1) passes the gradient only inside [0, 1], as torch.clamp does
        g0 = tl.where((r0 >= 0.0) & (r0 <= 1.0), g0, 0.0)
        g1 = tl.where((r1 >= 0.0) & (r1 <= 1.0), g1, 0.0)
        g2 = tl.where((r2 >= 0.0) & (r2 <= 1.0), g2, 0.0)
        tl.store(grad_x_ptr + points * 3 + 0, g0, mask=valid)
        tl.store(grad_x_ptr + points * 3 + 1, g1, mask=valid)
        tl.store(grad_x_ptr + points * 3 + 2, g2, mask=valid)
