"""Score distillation sampling (SDS) on diffusion latents.

For latents z (B, 4, h, w): draw t ~ U{min_step..max_step} and noise eps,
form z_t = sqrt(a_t) z + sqrt(1 - a_t) eps (a = alpha_bar), ask the guided
model for eps_hat(z_t, t) and take grad = w(t) (eps_hat - eps) with
w(t) = 1 - a_t. The loss 0.5 ||z - sg(z - grad)||^2 / B has
d loss / d z_b = grad_b / B: the per-sample SDS gradient, batch-averaged.
Everything after the UNet runs in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

# eps_fn(noisy (B, 4, h, w), t (B,) long) -> guided eps_hat (B, 4, h, w); called without grad.
EpsFn = Callable[[Tensor, Tensor], Tensor]


class Diagnostics(MutableMapping[str, float]):
    """Read-outs as plain floats, some still 0-d device tensors: all of those are copied to the host
    together (one device sync) on the first read, so producing them does not stall the training step."""

    def __init__(self, pending: dict[str, Tensor], ready: dict[str, float] | None = None) -> None:
        self._pending = dict(pending)
        self._ready = dict(ready or {})

    def _resolve(self) -> dict[str, float]:
        if self._pending:
            names = list(self._pending)
            values = torch.stack([self._pending[name].detach().float().reshape(()) for name in names]).tolist()
            self._ready.update(zip(names, values, strict=True))
            self._pending = {}
        return self._ready

    def __getitem__(self, key: str) -> float:
        return self._resolve()[key]

    def __setitem__(self, key: str, value: float) -> None:
        self._pending.pop(key, None)
        self._ready[key] = value

    def __delitem__(self, key: str) -> None:
        del self._resolve()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._pending) + len(self._ready)


@dataclass
class SDSOutput:
    """``loss``: scalar with grad to the latents / pixels; ``diagnostics``: plain floats for logs (read lazily)."""

    loss: Tensor
    diagnostics: MutableMapping[str, float] = field(default_factory=dict)


def timestep_range(num_train_timesteps: int, min_percent: float, max_percent: float) -> tuple[int, int]:
    """Integer bounds [min_step, max_step] of the timestep draw (fractions of ``num_train_timesteps``)."""
    min_step = int(num_train_timesteps * min_percent)
    max_step = int(num_train_timesteps * max_percent)
    min_step = min(max(min_step, 0), num_train_timesteps - 1)
    max_step = min(max(max_step, min_step), num_train_timesteps - 1)
    return min_step, max_step


def sample_timesteps(
    count: int, min_step: int, max_step: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """``count`` timesteps uniform in {min_step, ..., max_step} (long, on ``device``)."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(min_step, max_step + 1, (count,), generator=generator, device=gen_device)
    return t.to(device)


def timestep_weight(alphas_cumprod: Tensor, t: Tensor, weighting: str = "sds") -> Tensor:
    """w(t) per sample (B,), fp32: 'sds' = 1 - alpha_bar_t, 'uniform' = 1."""
    alpha_bar = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    if weighting == "sds":
        return 1.0 - alpha_bar
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    raise ValueError(f"unknown SDS weighting {weighting!r}; expected 'sds' or 'uniform'")


def add_noise(latents: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion z_t = sqrt(a_t) z + sqrt(1 - a_t) noise, in the dtype of ``latents``."""
    alpha_bar = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents.float() + (1.0 - alpha_bar).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def sds_gradient(eps_hat: Tensor, noise: Tensor, weight: Tensor, clip: float | None = None) -> tuple[Tensor, Tensor]:
    """grad = w (eps_hat - noise) in fp32; samples with any NaN/inf get a zero gradient.

    Returns the gradient (B, ...) and the number of samples zeroed (a 0-d
    tensor, so that no device sync happens here). ``clip`` clamps each
    element to [-clip, clip] (None = no clipping).
    """
    grad = weight.view(-1, *([1] * (eps_hat.ndim - 1))) * (eps_hat.float() - noise.float())
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    grad = torch.where(finite.view(-1, *([1] * (grad.ndim - 1))), grad, torch.zeros_like(grad))
    bad = (~finite).sum()
    if clip is not None:
        grad = grad.clamp(-clip, clip)
    return grad, bad


def sds_loss_from_gradient(latents: Tensor, grad: Tensor) -> Tensor:
    """0.5 ||z - sg(z - grad)||^2 / B, whose gradient w.r.t. ``latents`` is ``grad / B``."""
    latents = latents.float()
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum() / latents.shape[0]


def score_distillation(
    latents: Tensor,
    eps_fn: EpsFn,
    alphas_cumprod: Tensor,
    min_step: int,
    max_step: int,
    weighting: str = "sds",
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> SDSOutput:
    """One SDS evaluation on ``latents`` (B, 4, h, w) with grad.

    ``t`` and ``noise`` may be given (tests, fixed-noise studies); otherwise
    they are drawn from ``generator`` (default: the global torch RNG of the
    latents' device). Diagnostics: ``sds_loss``, ``sds_t_mean``,
    ``sds_grad_norm`` (mean per-sample L2 norm), ``sds_nonfinite`` (samples
    whose gradient was zeroed), ``sds_min_step``, ``sds_max_step``.
    """
    batch = latents.shape[0]
    device = latents.device
    if t is None:
        t = sample_timesteps(batch, min_step, max_step, device, generator)
    t = t.to(device=device, dtype=torch.long)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    with torch.no_grad():
        noisy = add_noise(latents.detach(), noise, t, alphas_cumprod)
        eps_hat = eps_fn(noisy, t)
    weight = timestep_weight(alphas_cumprod, t, weighting)
    grad, bad = sds_gradient(eps_hat, noise, weight, grad_clip)
    loss = sds_loss_from_gradient(latents, grad)
    # Device tensors until first read: one sync for all of them, and none inside the training step.
    pending = {
        "sds_loss": loss.detach(),
        "sds_t_mean": t.float().mean(),
        "sds_grad_norm": grad.flatten(1).norm(dim=1).mean(),
        "sds_nonfinite": bad.float(),
    }
    return SDSOutput(loss=loss, diagnostics=Diagnostics(pending, {"sds_min_step": float(min_step), "sds_max_step": float(max_step)}))
