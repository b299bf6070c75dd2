"""Alpha compositing along rays with a fixed number of samples per ray.

For samples i = 0..S-1 of a ray with density sigma_i over an interval of
length delta_i:  alpha_i = 1 - exp(-sigma_i delta_i),
T_i = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta_j),
w_i = T_i alpha_i. Opacity is sum_i w_i; a value is sum_i w_i v_i.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compositing_weights(sigmas: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, transmittance and alphas, each (R, S), from densities and interval lengths (R, S)."""
    optical = sigmas * deltas
    alphas = 1.0 - torch.exp(-optical)
    # exclusive cumulative sum: transmittance before each sample
    before = torch.cumsum(optical, dim=-1) - optical
    transmittance = torch.exp(-before)
    return transmittance * alphas, transmittance, alphas


def accumulate(weights: Tensor, values: Tensor | None = None) -> Tensor:
    """Sum over samples: (R, S) weights and (R, S, C) values -> (R, C); without values, opacity (R, 1)."""
    if values is None:
        return weights.sum(dim=-1, keepdim=True)
    return (weights[..., None] * values).sum(dim=-2)


def over_background(rgb: Tensor, opacity: Tensor, background: Tensor) -> Tensor:
    """Premultiplied colour (R, 3) composited over ``background`` (3,) or (R, 3)."""
    return rgb + (1.0 - opacity) * background
