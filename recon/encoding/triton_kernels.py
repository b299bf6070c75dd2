"""Triton kernels of the fused hash-grid lookup (see recon.encoding.triton_backend).

Imported only when the Triton backend runs, so Triton stays optional. One
program handles BLOCK_P points across all levels; the table layout and hash
are those of recon.encoding.hashgrid.TorchHashGrid.

Three passes share one corner walk (:func:`_corner`). Each walks the first
``n_active`` of the ``n_levels`` levels only: coarse-to-fine schedules mask
the others (zero features, zero gradients), so they cost nothing.

* :func:`forward_kernel`: out[p, l] = sum_c w_c T[row_c] (a gather), also used
  with another table or per-corner weights for the second-order terms;
* :func:`input_grad_kernel`: dL/dx from dL/dout (a gather, no atomics);
* :func:`scatter_kernel`: table gradients sum_p u_c(p) g[p, l] into the rows
  (atomic adds, relaxed ordering). The coarse dense levels, whose few rows
  every point hits, go to ``copies`` private replicas of their rows (chosen
  by program id) that are summed afterwards, so the adds to one row are
  spread over ``copies`` addresses instead of contending for one. The
  weights u_c are the trilinear weights (first order), their directional
  derivative along a per-point vector (second order, analytic normals), or
  both terms at once, each with its own g, in one add per row.

:func:`mlp_channel_kernel` goes on from the gather to one output of a ReLU
MLP on the features, so a density query without gradients never writes the
features to memory.
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
def _inside(r):
    """1.0 where a coordinate lies in [0, 1] (clamp passes its gradient), else 0.0."""
    return tl.where((r >= 0.0) & (r <= 1.0), 1.0, 0.0)


@triton.jit
def _directional_weight(c0, c1, c2, w0, w1, w2, v0, v1, v2, scale):
    """d w_c / dx . v for a corner: the trilinear weight's derivative along v (per point), in unit-cube units."""
    return scale * (v0 * (2.0 * c0 - 1.0) * w1 * w2 + v1 * (2.0 * c1 - 1.0) * w0 * w2 + v2 * (2.0 * c2 - 1.0) * w0 * w1)


@triton.jit
def _level_gather(
    table_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level, r0, r1, r2, v0, v1, v2, valid, F: tl.constexpr, DIRECTIONAL: tl.constexpr
):
    """(BLOCK_P, F) one level's sum over the 8 corners of the points' cells of u_c T[row_c]: u_c the trilinear
    weights, or with DIRECTIONAL their derivative along (v0, v1, v2)."""
    scale, res, offset, size, hashed = _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level)
    i0, f0 = _cell(r0, scale)
    i1, f1 = _cell(r1, scale)
    i2, f2 = _cell(r2, scale)
    feature = tl.arange(0, F)
    acc = tl.zeros((r0.shape[0], F), dtype=tl.float32)
    for corner in tl.static_range(8):
        c0, c1, c2, w0, w1, w2 = _corner_weights(corner, f0, f1, f2)
        rows = _corner_rows(i0 + c0, i1 + c1, i2 + c2, res, size, offset, hashed)
        values = tl.load(table_ptr + rows[:, None] * F + feature[None, :], mask=valid[:, None], other=0.0)
        if DIRECTIONAL:
            u = _directional_weight(c0, c1, c2, w0, w1, w2, v0, v1, v2, scale)
        else:
            u = w0 * w1 * w2
        acc += u[:, None] * values
    return acc


@triton.jit
def forward_kernel(
    x_ptr, table_ptr, out_ptr, v_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    n_points, n_levels, n_active, F: tl.constexpr, BLOCK_P: tl.constexpr, DIRECTIONAL: tl.constexpr,
):
    """out (P, n_levels * F) = per level, sum over the 8 corners of the point's cell of u_c T[row_c]:
    the trilinear weights u_c = w_c (the encoding), or with DIRECTIONAL their derivative along v (P, 3)
    (the gradient of <v, dL/dx> with respect to dL/dout)."""
    points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    feature = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    v0, v1, v2 = r0, r1, r2  # unused without DIRECTIONAL
    if DIRECTIONAL:
        v0, v1, v2 = _load_unit_points(v_ptr, points, valid)
        v0, v1, v2 = v0 * _inside(r0), v1 * _inside(r1), v2 * _inside(r2)
    for level in range(n_active):
        acc = _level_gather(
            table_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level, r0, r1, r2, v0, v1, v2, valid, F, DIRECTIONAL
        )
        out_index = points[:, None] * (n_levels * F) + level * F + feature[None, :]
        tl.store(out_ptr + out_index, acc, mask=valid[:, None])


@triton.jit
def input_grad_kernel(
    x_ptr, table_ptr, grad_out_ptr, grad_x_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    n_points, n_levels, n_active, F: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_x (P, 3) = d<grad_out, out>/dx: per level and corner, (T[row_c] . grad_out) times the
    trilinear weight's derivative; 0 on axes where x was clamped. A gather: no atomics."""
    points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    feature = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    g0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    g1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    g2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for level in range(n_active):
        scale, res, offset, size, hashed = _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level)
        i0, f0 = _cell(r0, scale)
        i1, f1 = _cell(r1, scale)
        i2, f2 = _cell(r2, scale)
        out_index = points[:, None] * (n_levels * F) + level * F + feature[None, :]
        grad = tl.load(grad_out_ptr + out_index, mask=valid[:, None], other=0.0)
        for corner in tl.static_range(8):
            c0, c1, c2, w0, w1, w2 = _corner_weights(corner, f0, f1, f2)
            rows = _corner_rows(i0 + c0, i1 + c1, i2 + c2, res, size, offset, hashed)
            values = tl.load(table_ptr + rows[:, None] * F + feature[None, :], mask=valid[:, None], other=0.0)
            dot = tl.sum(values * grad, axis=1) * scale
            g0 += dot * (2.0 * c0 - 1.0) * w1 * w2
            g1 += dot * (2.0 * c1 - 1.0) * w0 * w2
            g2 += dot * (2.0 * c2 - 1.0) * w0 * w1
    # clamp(x, 0, 1) passes the gradient only inside [0, 1], as torch.clamp does
    tl.store(grad_x_ptr + points * 3 + 0, g0 * _inside(r0), mask=valid)
    tl.store(grad_x_ptr + points * 3 + 1, g1 * _inside(r1), mask=valid)
    tl.store(grad_x_ptr + points * 3 + 2, g2 * _inside(r2), mask=valid)


@triton.jit
def scatter_kernel(
    x_ptr, grad_out_ptr, grad_ptr, v_ptr, grad_dir_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    n_points, n_directional, n_levels, n_active, table_rows, n_private_levels, private_rows, copies,
    F: tl.constexpr, BLOCK_P: tl.constexpr, FIRST: tl.constexpr, DIRECTIONAL: tl.constexpr,
):
    """grad[row_c] += w_c grad_out[p, l] (FIRST) + (dw_c/dx . v_p) grad_dir[p, l] (DIRECTIONAL, the first
    ``n_directional`` points only) for every point, level and corner, in one relaxed atomic add each.

    ``grad`` is (table_rows + copies * private_rows, F): the table's gradient, then ``copies`` replicas
    of its first ``private_rows`` rows (the levels below ``n_private_levels``), which this program adds
    into instead (replica ``program_id % copies``; the caller sums them into the table's rows).
    The first term is the encoding's table gradient; the second, with v (n_directional, 3), the table
    gradient of <v, dL/dx> for dL/dfeatures = grad_dir (n_directional, L * F) (analytic normals). Both
    together add the two table gradients of a normal-trained field in one pass over the atomics.
    """
    pid = tl.program_id(0)
    points = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    feature = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    if DIRECTIONAL:
        directional = points < n_directional
        v0, v1, v2 = _load_unit_points(v_ptr, points, directional)
        v0, v1, v2 = v0 * _inside(r0), v1 * _inside(r1), v2 * _inside(r2)
    replica = table_rows + (pid % copies).to(tl.int64) * private_rows
    for level in range(n_active):
        scale, res, offset, size, hashed = _level(scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level)
        i0, f0 = _cell(r0, scale)
        i1, f1 = _cell(r1, scale)
        i2, f2 = _cell(r2, scale)
        out_index = points[:, None] * (n_levels * F) + level * F + feature[None, :]
        if FIRST:
            grad = tl.load(grad_out_ptr + out_index, mask=valid[:, None], other=0.0)
        if DIRECTIONAL:
            grad_dir = tl.load(grad_dir_ptr + out_index, mask=directional[:, None], other=0.0)
        shift = tl.where(level < n_private_levels, replica, 0)
        for corner in tl.static_range(8):
            c0, c1, c2, w0, w1, w2 = _corner_weights(corner, f0, f1, f2)
            rows = _corner_rows(i0 + c0, i1 + c1, i2 + c2, res, size, offset, hashed)
            if FIRST:
                add = (w0 * w1 * w2)[:, None] * grad
                if DIRECTIONAL:
                    add += _directional_weight(c0, c1, c2, w0, w1, w2, v0, v1, v2, scale)[:, None] * grad_dir
            else:
                add = _directional_weight(c0, c1, c2, w0, w1, w2, v0, v1, v2, scale)[:, None] * grad_dir
            index = (rows + shift)[:, None] * F + feature[None, :]
            tl.atomic_add(grad_ptr + index, add, mask=valid[:, None], sem="relaxed")


@triton.jit
def _rounded(x, HALF: tl.constexpr):
    """x rounded to the half type ``HALF`` names (1 = bfloat16, 2 = float16), back in float32.

    Both round to nearest, ties to even, as PyTorch's casts do. bfloat16 is rounded on the float32 bits
    (keep the top 16): Triton's interpreter truncates in ``.to(tl.bfloat16)``, which would make its
    results differ from the compiled kernel's by up to one bfloat16 step per layer.
    """
    if HALF == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _matmul(a, b, HALF: tl.constexpr):
    """a @ b as a linear layer under autocast computes it: the inputs rounded to the half type ``HALF`` (see
    :func:`_rounded`), then tf32 tile dots accumulated in float32 (bfloat16 and float16 values are exact in
    tf32)."""
    return tl.dot(_rounded(a, HALF), _rounded(b, HALF), input_precision="tf32")


@triton.jit
def mlp_channel_kernel(
    x_ptr, table_ptr, out_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr,
    w_first_ptr, b_first_ptr, w_hidden_ptr, b_hidden_ptr, w_last_ptr, b_last_ptr,
    n_points, n_active, n_hidden,
    F: tl.constexpr, IN: tl.constexpr, WIDTH: tl.constexpr, BLOCK_P: tl.constexpr, HALF: tl.constexpr,
):
    """out (P,) = one output of a ReLU MLP on the point's features, in registers (the features never reach memory).

    The features f are the forward gather's over the first ``n_active`` levels, padded with zeros to
    ``IN`` (a power of two >= 16) columns. The MLP is h = relu(f W_first + b_first) (``w_first`` (IN,
    WIDTH), input by output; rows of masked levels and of the padding zero), then ``n_hidden`` layers
    h = relu(h W + b) (``w_hidden`` (n_hidden, WIDTH, WIDTH), input by output, ``b_hidden`` (n_hidden,
    WIDTH)), then out = h . w_last + b_last (``w_last`` (WIDTH,), ``b_last`` (1,)). ``HALF`` is the
    autocast type of the reference MLP, 1 = bfloat16 or 2 = float16: each layer's inputs, weights, biases
    and the output are rounded to it, with float32 accumulation.
    """
    points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = points < n_points
    unit = tl.arange(0, WIDTH)
    column = tl.arange(0, IN)
    features = tl.arange(0, F)
    r0, r1, r2 = _load_unit_points(x_ptr, points, valid)
    f = tl.zeros((BLOCK_P, IN), dtype=tl.float32)
    for level in range(n_active):
        acc = _level_gather(table_ptr, scales_ptr, res_ptr, offsets_ptr, sizes_ptr, hashed_ptr, level, r0, r1, r2, r0, r1, r2, valid, F, False)
        for feature in tl.static_range(F):
            value = tl.sum(tl.where(features[None, :] == feature, acc, 0.0), axis=1)
            f = tl.where(column[None, :] == level * F + feature, value[:, None], f)
    w_first = tl.load(w_first_ptr + column[:, None] * WIDTH + unit[None, :])
    h = tl.maximum(_matmul(f, w_first, HALF) + _rounded(tl.load(b_first_ptr + unit), HALF)[None, :], 0.0)
    square = unit[:, None] * WIDTH + unit[None, :]
    for layer in range(n_hidden):
        w = tl.load(w_hidden_ptr + layer * WIDTH * WIDTH + square)
        h = tl.maximum(_matmul(h, w, HALF) + _rounded(tl.load(b_hidden_ptr + layer * WIDTH + unit), HALF)[None, :], 0.0)
    w_last = _rounded(tl.load(w_last_ptr + unit), HALF)
    out = _rounded(tl.sum(_rounded(h, HALF) * w_last[None, :], axis=1) + _rounded(tl.load(b_last_ptr), HALF), HALF)
    tl.store(out_ptr + points, out, mask=valid)
