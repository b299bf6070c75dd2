"""Where along each ray the field is evaluated.

* :func:`stratified_samples`: plain PyTorch (CPU and GPU), a fixed number of
  equal bins between the ray's entry into and exit from the box.
* :class:`OccupancyGridSampler`: nerfacc's ``OccGridEstimator`` (CUDA only for
  sampling), which skips empty space using an occupancy grid refreshed from
  the field's density during training. Its grid lives in the module state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from recon.errors import ReconError


class PackedSamples(NamedTuple):
    """An occupancy-grid sampler's samples, sorted by ray: ``ray_indices`` (M,) long, ``t_starts``, ``t_ends``
    (M,) world units along the unit directions; ``prefix``: how many of them belong to the first ``prefix_rays``
    rays when the sampler was asked (else None)."""

    ray_indices: Tensor
    t_starts: Tensor
    t_ends: Tensor
    prefix: int | None = None


def nerfacc_available() -> bool:
    """True when nerfacc imports (it does not need CUDA to import)."""
    try:
        import nerfacc  # noqa: F401
    except ImportError:
        return False
    return True


def ray_aabb_intersect(origins: Tensor, directions: Tensor, aabb: Tensor, near: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays (R, 3) against the box ``aabb`` (2, 3).

    Returns ``t_near``, ``t_far`` (R,) clamped to start at ``near`` and
    ``hit`` (R,) bool; for missed rays ``t_near == t_far``.
    """
    tiny = torch.full_like(directions, 1e-12)
    safe = torch.where(directions.abs() < 1e-12, torch.where(directions < 0, -tiny, tiny), directions)
    inv = 1.0 / safe
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    hit = t_far > t_near
    t_far = torch.where(hit, t_far, t_near)
    return t_near, t_far, hit


def stratified_samples(
    origins: Tensor, directions: Tensor, aabb: Tensor, n_samples: int, jitter: bool, near: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``n_samples`` equal bins per ray across the box.

    Returns ``t_starts``, ``t_ends`` (bin edges) and ``t_points`` (where the
    field is evaluated), each (R, S) in world units along the unit
    directions. Points are bin midpoints, or uniformly jittered inside their
    bin when ``jitter`` (drawn from torch's global RNG on the rays' device).
    Missed rays get zero-length bins.
    """
    t_near, t_far, _ = ray_aabb_intersect(origins, directions, aabb, near)
    steps = torch.linspace(0.0, 1.0, n_samples + 1, device=origins.device, dtype=origins.dtype)
    edges = t_near[:, None] + (t_far - t_near)[:, None] * steps
    t_starts, t_ends = edges[:, :-1], edges[:, 1:]
    if jitter:
        u = torch.rand(t_starts.shape, device=origins.device, dtype=origins.dtype)
    else:
        u = torch.full_like(t_starts, 0.5)
    return t_starts, t_ends, t_starts + (t_ends - t_starts) * u


class OccupancyGridSampler(nn.Module):
    """nerfacc 0.5.3 ``OccGridEstimator`` over the field's box (one level).

    The grid buffers (``estimator.occs``, ``estimator.binaries``) are part of
    the state dict. Building the module and :meth:`update` run anywhere;
    :meth:`sample` needs CUDA tensors.
    """

    def __init__(self, aabb: Tensor, resolution: int) -> None:
        super().__init__()
        try:
            from nerfacc import OccGridEstimator
        except ImportError as exc:
            raise ReconError(f"renderer.sampler 'nerfacc': nerfacc failed to import ({exc}); pip install nerfacc==0.5.3 or use stratified") from exc
        self.estimator = OccGridEstimator(roi_aabb=aabb.reshape(-1).float().cpu(), resolution=resolution, levels=1)

    @torch.no_grad()
    def sample(
        self,
        origins: Tensor,
        directions: Tensor,
        density_fn: Callable[[Tensor], Tensor],
        step_size: float,
        alpha_threshold: float,
        early_stop_eps: float,
        stratified: bool,
        near: float = 0.0,
        prefix_rays: int | None = None,
        two_rounds: bool = True,
    ) -> PackedSamples:
        """:class:`PackedSamples` of rays (R, 3) (CUDA only), ``prefix`` counted when ``prefix_rays`` is given.

        ``density_fn`` (world points (M, 3) -> (M,)) lets nerfacc drop samples
        that are transparent or hidden behind opaque ones. ``two_rounds`` is the
        PyTorch grid's option (:meth:`recon.render.occupancy.TorchOccupancyGrid.sample`);
        nerfacc marches each ray in its own kernel and ignores it.
        """
        if not origins.is_cuda:
            raise ReconError("renderer.sampler 'nerfacc' needs CUDA tensors; use sampler stratified on the CPU")

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            ray_indices = ray_indices.long()
            t_mid = 0.5 * (t_starts + t_ends)
            return density_fn(origins[ray_indices] + directions[ray_indices] * t_mid[:, None])

        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins.contiguous(),
            directions.contiguous(),
            sigma_fn=sigma_fn,
            near_plane=near,
            render_step_size=step_size,
            alpha_thre=alpha_threshold,
            early_stop_eps=early_stop_eps,
            stratified=stratified,
        )
        ray_indices = ray_indices.long()
        prefix = None if prefix_rays is None else int(torch.searchsorted(ray_indices, prefix_rays))
        return PackedSamples(ray_indices, t_starts, t_ends, prefix)

    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[Tensor], Tensor], step_size: float, threshold: float, every: int, warmup_steps: int) -> None:
        """Every ``every`` steps, refreshes the grid with occupancy = density * step_size (EMA, then threshold)."""
        self.estimator.update_every_n_steps(
            step=step,
            occ_eval_fn=lambda x: density_fn(x) * step_size,
            occ_thre=threshold,
            warmup_steps=warmup_steps,
            n=every,
        )

    @property
    def occupied_fraction(self) -> float:
        """Fraction of grid cells currently marked occupied."""
        return float(self.estimator.binaries.float().mean().item())
