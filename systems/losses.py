"""Loss terms of the staged optimisation: reference-view losses and geometry regularisers.

Shapes follow the renderer: images are channels-last, (N, H, W, C). Every loss
returns a scalar tensor (mean over its elements unless stated) in float32,
so the weighted sum is well conditioned under mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from recon.runtime import to_device

_EPS = 1e-5


def rgb_loss(rgb: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between a render (N, H, W, 3) and the target composited over the same background."""
    return F.mse_loss(rgb.float(), target.float())


def mask_loss(opacity: Tensor, mask: Tensor, kind: Literal["bce", "mse"] = "mse") -> Tensor:
    """Silhouette loss between rendered opacity (N, H, W, 1) and the reference alpha (N, H, W, 1), both in [0, 1].

    ``bce`` is binary cross-entropy (opacity clamped away from 0 and 1 so its
    gradient stays finite); ``mse`` is the squared error (threestudio's choice).
    """
    opacity, mask = opacity.float(), mask.float()
    if kind == "bce":
        return F.binary_cross_entropy(opacity.clamp(_EPS, 1.0 - _EPS), mask)
    if kind == "mse":
        return F.mse_loss(opacity, mask)
    raise ValueError(f"unknown mask loss {kind!r}; expected 'bce' or 'mse'")


def opacity_entropy(opacity: Tensor) -> Tensor:
    """Mean binary entropy of the per-ray opacity: pushes every ray to fully empty or fully opaque."""
    o = opacity.float().clamp(_EPS, 1.0 - _EPS)
    return -(o * torch.log(o) + (1.0 - o) * torch.log(1.0 - o)).mean()


def sparsity(opacity: Tensor, eps: float = 0.01) -> Tensor:
    """Smooth L1-like penalty ``mean(sqrt(o^2 + eps))`` on per-ray opacity: less total occupied area."""
    return torch.sqrt(opacity.float() ** 2 + eps).mean()


def orientation(orientation_map: Tensor) -> Tensor:
    """Mean over rays of the renderer's orientation term ``sum_i w_i relu(n_i . d)^2`` (N, H, W, 1).

    It penalises visible normals that face away from the camera (Ref-NeRF's
    orientation loss); the renderer computes it per ray, this only reduces it.
    """
    return orientation_map.float().mean()


def normal_smoothness_2d(normal: Tensor) -> Tensor:
    """Squared difference between neighbouring pixels of a rendered normal map (N, H, W, 3), both axes."""
    normal = normal.float()
    vertical = F.mse_loss(normal[:, 1:], normal[:, :-1])
    horizontal = F.mse_loss(normal[:, :, 1:], normal[:, :, :-1])
    return vertical + horizontal


def normal_smoothness_3d(
    normals_fn: Callable[[Tensor], Tensor],
    points: Tensor,
    jitter: float,
    generator: torch.Generator | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Squared difference of field normals at ``points`` (P, 3) and at the same points moved by N(0, jitter^2) (world units),
    averaged over the points with ``weights`` (P,) (default all 1; a point of weight 0 does not count).

    ``normals_fn(points) -> (P, 3)`` unit normals. Returns 0 (with a graph) when no point counts.
    The jitter is drawn from ``generator`` on the host and sent without waiting for the GPU.
    """
    if points.shape[0] == 0:
        return points.sum() * 0.0
    offsets = to_device(torch.randn(points.shape, generator=generator, dtype=points.dtype), points.device) * jitter
    both = normals_fn(torch.cat([points, points + offsets], dim=0)).float()
    here, there = both.chunk(2, dim=0)
    per_point = (here - there).square().mean(dim=1)
    if weights is None:
        return per_point.mean()
    return (weights * per_point).sum() / weights.sum().clamp_min(1.0)


def surface_points(
    origins: Tensor,
    directions: Tensor,
    depth: Tensor,
    opacity: Tensor,
    count: int,
    threshold: float = 0.5,
    fixed_shape: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """World points (P, 3) ``o + depth * d`` on the rendered surface and their weights (P,).

    Of the N rays with opacity > ``threshold``: ``count`` of them evenly
    strided when N > count, else all N. With ``fixed_shape`` (default: on
    CUDA) P = count, the last count - N points being fillers of weight 0, so
    choosing the points never waits for the GPU; without it the fillers are
    dropped (P = min(N, count), all of weight 1), which on the CPU saves
    their normals. Consumes no random numbers. All inputs are per ray with a
    trailing channel dim ((..., 3) or (..., 1)), detached.
    """
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    z, a = depth.reshape(-1).detach(), opacity.reshape(-1).detach()
    if a.numel() == 0:
        return o.new_zeros(0, 3), a.new_zeros(0)
    rank = torch.cumsum(a > threshold, dim=0)  # qualifying rays up to and including each ray
    total = rank[-1]
    slot = torch.arange(count, device=a.device)
    strided = (slot.double() * (total - 1).clamp_min(0).double() / max(count - 1, 1)).long()
    position = torch.where(total > count, strided, slot)  # the qualifying ray (0-based) that each slot takes
    ray = torch.searchsorted(rank, position + 1).clamp_max(a.numel() - 1)
    points = (o[ray] + d[ray] * (z[ray] / a[ray].clamp_min(_EPS))[:, None]).detach()
    weights = (position < total).to(a.dtype)
    fixed = a.is_cuda if fixed_shape is None else fixed_shape
    if fixed:
        return points, weights
    used = weights > 0  # the fillers come last
    return points[used], weights[used]
