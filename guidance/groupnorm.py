"""GroupNorm (optionally followed by SiLU) on channels-last tensors, fused in Triton, and the VAE encoder in that layout.

Why: score distillation backpropagates through the VAE encoder at 256 x 256,
where the encoder is bound by memory traffic, not arithmetic. In PyTorch's
default (NCHW) layout cuDNN transposes every convolution's input and output
to NHWC and back; in channels-last the transposes go, but PyTorch 2.11 has
no channels-last GroupNorm on CUDA, so each GroupNorm converts the layout
and back instead (a net loss, measured). :class:`ChannelsLastGroupNorm`
normalises channels-last tensors in place of that, and takes the SiLU that
follows every GroupNorm of the encoder's ResNet blocks into the same pass
(recon/guidance/groupnorm_kernels.py): forward, 2 reads and 1 write of
the activation; backward, 4 reads (input and incoming gradient, twice) and
1 write.

Only the gradient with respect to the input is computed: the module falls
back to ``F.group_norm`` (+ ``F.silu``), the reference path, whenever its
weights require grad, the input is not channels-last, or the kernels cannot
read it (a CPU tensor outside Triton's interpreter). Statistics are float32
whatever the activations' dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from recon.encoding.triton_backend import kernels_can_read, notice_first_build, triton_available

# a tile of 32 rows x 128 channels (4096 values, 4 warps); 8 tiles per program: per-chunk sums are 1/256 of the rows
BLOCK_HW = 32
BLOCK_C = 128
TILES = 8
NUM_WARPS = 4


@functools.cache
def _kernels():
    from recon.guidance import groupnorm_kernels

    notice_first_build("groupnorm_forward_kernel", "VAE encoder: compiling its Triton GroupNorm kernels")
    return groupnorm_kernels


def _launch(kernel, x: Tensor, *args, **constants) -> None:
    """Runs ``kernel`` over channels-last ``x`` (B, C, H, W): one program per chunk of rows, channel block and image."""
    batch, channels, height, width = x.shape
    grid = (_chunks(height * width), _cdiv(channels, BLOCK_C), batch)
    kernel[grid](*args, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, TILES=TILES, **constants, num_warps=NUM_WARPS)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunks(pixels: int) -> int:
    return _cdiv(pixels, BLOCK_HW * TILES)


def _per_channel(group_values: Tensor, channels: int) -> Tensor:
    """(B, G) group values -> (B, C): each group's value for each of its channels."""
    batch, groups = group_values.shape
    return group_values[:, :, None].expand(batch, groups, channels // groups).reshape(batch, channels)


def group_statistics(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and 1 / sqrt(var + eps) per (image, group), each (B, G) float32, of channels-last ``x`` (B, C, H, W).

    The kernel's per-chunk shifted sums are merged with the parallel variance formula (Chan et al.).
    """
    batch, channels, height, width = x.shape
    pixels = height * width
    n_chunks = _chunks(pixels)
    shift, total, squares = (x.new_empty((batch, n_chunks, channels), dtype=torch.float32) for _ in range(3))
    _launch(_kernels().groupnorm_moments_kernel, x, x, shift, total, squares, pixels, channels, n_chunks)
    rows = BLOCK_HW * TILES
    counts = (pixels - torch.arange(n_chunks, device=x.device) * rows).clamp(max=rows).float().view(1, n_chunks, 1, 1)
    shape = (batch, n_chunks, groups, channels // groups)
    chunk_mean = shift.view(shape) + total.view(shape) / counts
    chunk_m2 = squares.view(shape) - total.view(shape) ** 2 / counts
    n = pixels * (channels // groups)
    mean = (chunk_mean * counts).sum(dim=(1, 3)) / n
    m2 = chunk_m2.sum(dim=(1, 3)) + (counts * (chunk_mean - mean[:, None, :, None]) ** 2).sum(dim=(1, 3))
    return mean, torch.rsqrt(m2 / n + eps)


class _GroupNormActivation(torch.autograd.Function):
    """act(group_norm(x) * weight + bias) for channels-last x; gradient with respect to x only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool) -> Tensor:
        _, channels, height, width = x.shape
        mean, rstd = group_statistics(x, groups, eps)
        r = _per_channel(rstd, channels)
        q = -_per_channel(mean, channels) * r
        w = weight.float()
        s = r * w
        t = bias.float() + q * w
        y = torch.empty_like(x, memory_format=torch.channels_last)
        _launch(_kernels().groupnorm_forward_kernel, x, x, y, s, t, height * width, channels, SILU=silu)
        ctx.save_for_backward(x, weight, s, t, r, q)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, s, t, r, q = ctx.saved_tensors
        batch, channels, height, width = x.shape
        pixels = height * width
        dy = dy.contiguous(memory_format=torch.channels_last)
        n_chunks = _chunks(pixels)
        da_sum, da_xhat_sum = (x.new_empty((batch, n_chunks, channels), dtype=torch.float32) for _ in range(2))
        sums_kernel = _kernels().groupnorm_backward_sums_kernel
        _launch(sums_kernel, x, x, dy, s, t, r, q, da_sum, da_xhat_sum, pixels, channels, n_chunks, SILU=ctx.silu)
        n = pixels * (channels // ctx.groups)
        w = weight.float()
        # dxhat = da * w; dx = r (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), xhat = x r + q
        mean_dxhat = _per_channel((da_sum.sum(1) * w).view(batch, ctx.groups, -1).sum(-1) / n, channels)
        mean_dxhat_xhat = _per_channel((da_xhat_sum.sum(1) * w).view(batch, ctx.groups, -1).sum(-1) / n, channels)
        alpha = r * w
        beta = -r * r * mean_dxhat_xhat
        gamma = -r * (mean_dxhat + q * mean_dxhat_xhat)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        _launch(_kernels().groupnorm_backward_kernel, x, x, dy, dx, s, t, alpha, beta, gamma, pixels, channels, SILU=ctx.silu)
        return dx, None, None, None, None, None


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys), optionally followed by SiLU, that normalises
    channels-last 4-d inputs with the fused Triton kernels and anything else with ``F.group_norm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, silu: bool = False, **kw) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kw)
        self.silu = silu

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, silu: bool) -> ChannelsLastGroupNorm:
        """A module sharing ``norm``'s weight and bias (no copy), with ``silu`` applied after it."""
        fused = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, silu=silu, device="meta")
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the same shape, dtype and layout."""
        if self._fused(x):
            return _GroupNormActivation.apply(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def _fused(self, x: Tensor) -> bool:
        frozen = self.weight is not None and not self.weight.requires_grad and not self.bias.requires_grad
        return frozen and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and triton_available() and kernels_can_read(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu" if self.silu else "")


def channels_last_encoder(vae: nn.Module) -> int:
    """Puts a diffusers ``AutoencoderKL``'s encoder (and ``quant_conv``) in channels-last layout with
    :class:`ChannelsLastGroupNorm` in place of each GroupNorm + SiLU pair: the ResNet blocks' ``norm1`` /
    ``norm2`` (their ``nonlinearity`` becomes the identity: encoder blocks have no time embedding) and
    ``conv_norm_out`` + ``conv_act``. Returns the number of GroupNorms replaced. The function computed is the
    same; only the layout and the kernels change. The decoder is left as it is."""
    encoder = vae.encoder
    replaced = 0
    for block in list(encoder.modules()):
        pairs = ("norm1", "norm2")
        if all(isinstance(getattr(block, name, None), nn.GroupNorm) for name in pairs) and isinstance(getattr(block, "nonlinearity", None), nn.SiLU):
            if getattr(block, "time_emb_proj", None) is not None:
                continue  # the nonlinearity also acts on the time embedding there
            for name in pairs:
                setattr(block, name, ChannelsLastGroupNorm.replacing(getattr(block, name), silu=True))
            block.nonlinearity = nn.Identity()
            replaced += 2
    if isinstance(getattr(encoder, "conv_norm_out", None), nn.GroupNorm) and isinstance(encoder.conv_act, nn.SiLU):
        encoder.conv_norm_out = ChannelsLastGroupNorm.replacing(encoder.conv_norm_out, silu=True)
        encoder.conv_act = nn.Identity()
        replaced += 1
    encoder.to(memory_format=torch.channels_last)
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv.to(memory_format=torch.channels_last)
    return replaced
