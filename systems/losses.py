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
) -> Tensor:
    """Squared difference of field normals at ``points`` (P, 3) and at the same points moved by N(0, jitter^2) (world units).

    ``normals_fn(points) -> (P, 3)`` unit normals. Returns 0 (with a graph) for no points.
    """
    if points.shape[0] == 0:
        return points.sum() * 0.0
    offsets = torch.randn(points.shape, generator=generator, dtype=points.dtype).to(points.device) * jitter
    both = normals_fn(torch.cat([points, points + offsets], dim=0)).float()
    here, there = both.chunk(2, dim=0)
    return F.mse_loss(here, there)


def surface_points(origins: Tensor, directions: Tensor, depth: Tensor, opacity: Tensor, count: int, threshold: float = 0.5) -> Tensor:
    """Up to ``count`` world points (P, 3) on the rendered surface: ``o + depth * d`` for rays with opacity > ``threshold``.

    All inputs are per ray with a trailing channel dim ((..., 3) or (..., 1)),
    detached; the points are evenly strided over the qualifying rays, so the
    choice consumes no random numbers.
    """
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    z, a = depth.reshape(-1).detach(), opacity.reshape(-1).detach()
    keep = torch.nonzero(a > threshold).squeeze(-1)
    if keep.numel() > count:
        keep = keep[torch.linspace(0, keep.numel() - 1, count, device=keep.device).long()]
    return (o[keep] + d[keep] * (z[keep] / a[keep].clamp_min(_EPS))[:, None]).detach()
