"""Triton kernels of the channels-last GroupNorm (+ SiLU) in recon.guidance.groupnorm.

Imported only when that path runs, so Triton stays optional. Every kernel
reads a (B, C, H, W) tensor stored channels-last, i.e. (B, H*W, C) rows of
C contiguous channels. A program covers ``TILES`` tiles of ``BLOCK_HW`` rows
x ``BLOCK_C`` channels of one image; the grid is (row chunks, channel
blocks, batch). The kernels work per channel with per-(image, channel)
coefficients: the group statistics are merged from their per-chunk sums in
PyTorch, on tensors a thousand times smaller than the activations.

* :func:`groupnorm_moments_kernel`: per chunk and channel, the sum and sum of squares
  of x minus the chunk's first row (a shift that keeps the variance free of
  cancellation when the mean is large);
* :func:`groupnorm_forward_kernel`: y = act(x * s + t);
* :func:`groupnorm_backward_sums_kernel`: per chunk and channel, sum(da) and
  sum(da * xhat), where da = dy * act'(x * s + t) and xhat = x * r + q;
* :func:`groupnorm_backward_kernel`: dx = da * alpha + x * beta + gamma.

``act`` is SiLU when ``SILU`` is set, else the identity.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(row0, tile, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (BLOCK_HW, BLOCK_C) of one tile within an image, and its in-bounds mask."""
    rows = row0 + tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offsets = rows[:, None] * C + cols[None, :]
    return offsets, (rows < HW)[:, None] & (cols < C)[None, :]


@triton.jit
def _program(HW, C, BLOCK_HW: tl.constexpr, TILES: tl.constexpr):
    """This program's image's first element and its first row."""
    return tl.program_id(2).to(tl.int64) * HW * C, tl.program_id(0) * BLOCK_HW * TILES


@triton.jit
def _channel_values(ptr, C, BLOCK_C: tl.constexpr):
    """This program's image's per-channel coefficients (BLOCK_C,) from a (B, C) float32 array."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.load(ptr + tl.program_id(2) * C + cols, mask=cols < C, other=0.0)


@triton.jit
def _input_and_da(x_ptr, dy_ptr, offsets, inside, s, t, SILU: tl.constexpr):
    """x and da = dy * act'(x * s + t) on one tile (float32; 0 outside it)."""
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    a = x * s[None, :] + t[None, :]
    if SILU:
        sig = tl.sigmoid(a)
        return x, dy * sig * (1.0 + a * (1.0 - sig))
    return x, dy


@triton.jit
def _store_chunk(ptr, value, n_chunks, C, BLOCK_C: tl.constexpr):
    """Writes (BLOCK_C,) per-channel values of this program's chunk into a (B, n_chunks, C) array."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    index = (tl.program_id(2) * n_chunks + tl.program_id(0)) * C + cols
    tl.store(ptr + index, value, mask=cols < C)


@triton.jit(do_not_specialize=["n_chunks"])  # one build for every chunk count
def groupnorm_moments_kernel(
    x_ptr, shift_ptr, sum_ptr, squares_ptr, HW, C, n_chunks,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """Per chunk and channel: the shift (the chunk's first row), sum(x - shift) and sum((x - shift)^2)."""
    start, row0 = _program(HW, C, BLOCK_HW, TILES)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = tl.load(x_ptr + start + row0 * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    # elementwise accumulators, reduced across rows once at the end (a reduction per tile costs more than the loads)
    total = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    squares = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for tile in tl.static_range(TILES):
        offsets, inside = _tile(row0, tile, HW, C, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + start + offsets, mask=inside, other=0.0).to(tl.float32)
        d = tl.where(inside, x - shift[None, :], 0.0)
        total += d
        squares += d * d
    _store_chunk(shift_ptr, shift, n_chunks, C, BLOCK_C)
    _store_chunk(sum_ptr, tl.sum(total, axis=0), n_chunks, C, BLOCK_C)
    _store_chunk(squares_ptr, tl.sum(squares, axis=0), n_chunks, C, BLOCK_C)


@triton.jit
def groupnorm_forward_kernel(
    x_ptr, y_ptr, s_ptr, t_ptr, HW, C,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """y = act(x * s + t), s and t per (image, channel); y in x's dtype and layout."""
    start, row0 = _program(HW, C, BLOCK_HW, TILES)
    s = _channel_values(s_ptr, C, BLOCK_C)
    t = _channel_values(t_ptr, C, BLOCK_C)
    for tile in tl.static_range(TILES):
        offsets, inside = _tile(row0, tile, HW, C, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + start + offsets, mask=inside, other=0.0).to(tl.float32)
        a = x * s[None, :] + t[None, :]
        if SILU:
            a = a * tl.sigmoid(a)
        tl.store(y_ptr + start + offsets, a.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["n_chunks"])
def groupnorm_backward_sums_kernel(
    x_ptr, dy_ptr, s_ptr, t_ptr, r_ptr, q_ptr, da_sum_ptr, da_xhat_sum_ptr, HW, C, n_chunks,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """Per chunk and channel: sum(da) and sum(da * xhat), da = dy * act'(x * s + t), xhat = x * r + q."""
    start, row0 = _program(HW, C, BLOCK_HW, TILES)
    s = _channel_values(s_ptr, C, BLOCK_C)
    t = _channel_values(t_ptr, C, BLOCK_C)
    r = _channel_values(r_ptr, C, BLOCK_C)
    q = _channel_values(q_ptr, C, BLOCK_C)
    da_sum = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    da_xhat_sum = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for tile in tl.static_range(TILES):
        offsets, inside = _tile(row0, tile, HW, C, BLOCK_HW, BLOCK_C)
        x, da = _input_and_da(x_ptr + start, dy_ptr + start, offsets, inside, s, t, SILU)  # da = 0 outside the tile
        da_sum += da
        da_xhat_sum += da * (x * r[None, :] + q[None, :])
    _store_chunk(da_sum_ptr, tl.sum(da_sum, axis=0), n_chunks, C, BLOCK_C)
    _store_chunk(da_xhat_sum_ptr, tl.sum(da_xhat_sum, axis=0), n_chunks, C, BLOCK_C)


@triton.jit
def groupnorm_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, s_ptr, t_ptr, alpha_ptr, beta_ptr, gamma_ptr, HW, C,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """dx = da * alpha + x * beta + gamma with da = dy * act'(x * s + t); all coefficients per (image, channel)."""
    start, row0 = _program(HW, C, BLOCK_HW, TILES)
    s = _channel_values(s_ptr, C, BLOCK_C)
    t = _channel_values(t_ptr, C, BLOCK_C)
    alpha = _channel_values(alpha_ptr, C, BLOCK_C)
    beta = _channel_values(beta_ptr, C, BLOCK_C)
    gamma = _channel_values(gamma_ptr, C, BLOCK_C)
    for tile in tl.static_range(TILES):
        offsets, inside = _tile(row0, tile, HW, C, BLOCK_HW, BLOCK_C)
        x, da = _input_and_da(x_ptr + start, dy_ptr + start, offsets, inside, s, t, SILU)
        dx = da * alpha[None, :] + x * beta[None, :] + gamma[None, :]
        tl.store(dx_ptr + start + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
