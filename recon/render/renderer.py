"""Volume renderer: cameras or rays -> composited colour, opacity, depth (and normals).

One interface over three samplers: an occupancy grid in plain PyTorch
(:mod:`recon.render.occupancy`, the default on CUDA), nerfacc's CUDA version
of the same grid (optional, needs its one-time build) and a stratified
PyTorch sampler (:mod:`recon.render.samplers`, the default on the CPU). Rays are
processed in chunks; with gradients enabled and more than one chunk each
chunk is gradient-checkpointed, so memory is bounded by one chunk's graph
whatever the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recon.cameras import Cameras, generate_rays
from recon.errors import ReconError
from recon.field import RadianceField
from recon.render.compositing import accumulate, compositing_weights, over_background
from recon.render.occupancy import TorchOccupancyGrid, accumulate_packed, packed_weights
from recon.render.samplers import OccupancyGridSampler, stratified_samples


@dataclass
class RendererConfig:
    """Volume rendering: sampler, sample counts, occupancy grid, chunking."""

    sampler: Literal["auto", "grid", "nerfacc", "stratified"] = "auto"
    """Ray sampler: auto (grid on CUDA, stratified on the CPU), grid (occupancy grid in PyTorch: no
    compiler), nerfacc (the same grid with nerfacc's CUDA kernels, built on first use) or stratified."""
    samples_per_ray: int = 128
    """Samples per ray of the stratified sampler."""
    step_size: float | None = None
    """Occupancy-grid marching step in world units; None = 2 * sqrt(3) * bound / 512."""
    grid_resolution: int = 64
    """Cells per axis of the occupancy grid (grid, nerfacc)."""
    occupancy_threshold: float = 0.01
    """A grid cell is occupied when density * step_size exceeds this (grid, nerfacc)."""
    alpha_threshold: float = 0.01
    """The grid samplers drop samples whose alpha (1 - exp(-density * step)) is below this, capped at the
    grid's mean occupancy as nerfacc does (threestudio's 0.01: near-empty samples are never shaded); 0 keeps all."""
    early_stop_eps: float = 1e-4
    """The grid samplers stop marching a ray once its transmittance falls below this."""
    update_every: int = 16
    """Refresh the occupancy grid every this many training steps."""
    grid_warmup_steps: int = 256
    """Before this step every grid cell is re-evaluated on refresh; after it, a random quarter."""
    chunk_rays: int | None = None
    """Rays rendered at once; bounds memory at any image size. None = with an occupancy-grid sampler 262144
    while training (a whole training step in one chunk: nothing recomputed) and 65536 without gradients
    (previews, turntable: a quarter of the transient memory, same pixels); 8192 with the stratified one."""
    checkpoint_chunks: bool = True
    """With gradients and several chunks, recompute each chunk in backward instead of storing its graph."""
    near: float = 0.0
    """Samples start at least this far from the ray origin (world units)."""

    def __post_init__(self) -> None:
        if self.samples_per_ray < 1 or (self.chunk_rays is not None and self.chunk_rays < 1) or self.update_every < 1 or self.grid_resolution < 1:
            raise ReconError("renderer: samples_per_ray, chunk_rays, update_every and grid_resolution must be >= 1")
        if self.step_size is not None and self.step_size <= 0:
            raise ReconError(f"renderer.step_size must be > 0, got {self.step_size}")


class VolumeRenderer(nn.Module):
    """Renders a :class:`RadianceField`; ``field`` is a submodule, so the state dict holds both.

    Outputs (per ray or per pixel): ``rgb`` over the background, ``opacity``,
    ``depth`` (sum of w_i t_i, not divided by opacity), and with
    ``normals=True`` ``normal`` (sum of w_i n_i, world frame) and
    ``orientation`` (sum of w_i relu(n_i . d)^2 with the weights detached,
    so that term shapes the normals rather than the opacity).
    """

    def __init__(self, field: RadianceField, cfg: RendererConfig) -> None:
        super().__init__()
        self.field = field
        self.cfg = cfg
        self.occupancy: TorchOccupancyGrid | OccupancyGridSampler | None = None
        if cfg.sampler == "nerfacc":
            self.occupancy = OccupancyGridSampler(field.aabb.cpu(), cfg.grid_resolution)
        elif cfg.sampler == "grid" or (cfg.sampler == "auto" and torch.cuda.is_available()):
            self.occupancy = TorchOccupancyGrid(field.aabb.cpu(), cfg.grid_resolution)
        self.register_load_state_dict_pre_hook(_match_occupancy_keys)

    @property
    def step_size(self) -> float:
        """Occupancy-grid marching step (world units)."""
        if self.cfg.step_size is not None:
            return self.cfg.step_size
        return 2.0 * math.sqrt(3.0) * self.field.cfg.bound / 512

    def chunk_rays(self, device: torch.device) -> int:
        """Rays per chunk on ``device`` (``cfg.chunk_rays``, or its default for the sampler in use)."""
        if self.cfg.chunk_rays is not None:
            return self.cfg.chunk_rays
        if self.uses_grid(device):
            return 262144 if torch.is_grad_enabled() else 65536
        return 8192

    def uses_grid(self, device: torch.device) -> bool:
        """Whether rays on ``device`` go through an occupancy grid (grid or nerfacc sampler)."""
        if self.cfg.sampler == "nerfacc" and device.type != "cuda":
            raise ReconError("renderer.sampler 'nerfacc' needs CUDA; use sampler grid, stratified or auto on the CPU")
        if self.cfg.sampler == "nerfacc":
            return True
        return self.occupancy is not None and (self.cfg.sampler == "grid" or device.type == "cuda")

    @torch.no_grad()
    def update_occupancy(self, step: int) -> None:
        """Refreshes the occupancy grid every ``update_every`` steps while training (no-op otherwise)."""
        if self.occupancy is None or not self.training:
            return
        self.occupancy.update(
            step,
            self.field.density,
            self.step_size,
            self.cfg.occupancy_threshold,
            self.cfg.update_every,
            self.cfg.grid_warmup_steps,
        )

    def render(self, cameras: Cameras, background: Tensor, normals: bool = False) -> dict[str, Tensor]:
        """Renders every pixel of ``cameras``: values (N, H, W, C) (see the class docstring).

        ``background`` is one colour (3,) or an image per camera (N, H, W, 3).
        """
        return self.render_images(*generate_rays(cameras), background, normals)

    def render_images(self, origins: Tensor, directions: Tensor, background: Tensor, normals: bool = False) -> dict[str, Tensor]:
        """Renders images of rays: ``origins`` and unit ``directions`` (N, H, W, 3), as
        :func:`recon.cameras.generate_rays` makes them; values (N, H, W, C), ``background`` as in :meth:`render`."""
        n, h, w = origins.shape[:3]
        background = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
        if background.shape == (n, h, w, 3):
            background = background.reshape(-1, 3)
        elif background.shape != (3,):
            raise ValueError(f"background must be (3,) or {(n, h, w, 3)}, got {tuple(background.shape)}")
        out = self.render_rays(origins.reshape(-1, 3), directions.reshape(-1, 3), background, normals)
        return {key: value.view(n, h, w, -1) for key, value in out.items()}

    def render_rays(
        self, origins: Tensor, directions: Tensor, background: Tensor, normals: bool = False, normal_rays: int | None = None
    ) -> dict[str, Tensor]:
        """Renders rays (R, 3) with unit directions; ``background`` (3,) or (R, 3); values (R, C).

        ``normal_rays``: with ``normals``, only the first this many rays get normals (the field computes
        none for the others' samples; their ``normal`` and ``orientation`` are 0); None = every ray.
        """
        background = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
        if background.shape not in ((3,), (origins.shape[0], 3)):
            raise ValueError(f"background must be (3,) or ({origins.shape[0]}, 3), got {tuple(background.shape)}")
        n_rays, chunk = origins.shape[0], self.chunk_rays(origins.device)
        use_checkpoint = self.cfg.checkpoint_chunks and torch.is_grad_enabled() and n_rays > chunk
        pieces: list[dict[str, Tensor]] = []
        for start in range(0, max(n_rays, 1), chunk):  # no rays: one empty chunk, (0, C) values
            end = min(start + chunk, n_rays)
            bg = background if background.ndim == 1 else background[start:end]
            wanted = None if normal_rays is None else min(max(normal_rays - start, 0), end - start)
            pieces.append(self._render_chunk(origins[start:end], directions[start:end], bg, normals, use_checkpoint, wanted))
        if len(pieces) == 1:
            return pieces[0]
        return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}

    def _render_chunk(
        self, origins: Tensor, directions: Tensor, background: Tensor, normals: bool, use_checkpoint: bool, normal_rays: int | None = None
    ) -> dict[str, Tensor]:
        if self.uses_grid(origins.device):
            # training: one round of density queries (on the GPU a fit's field stays semi-transparent, so a second
            # round would evaluate all the first left, after two more waits for the device; docs/SPEED.md)
            ray_indices, t_starts, t_ends, split = self.occupancy.sample(
                origins,
                directions,
                self.field.density,
                self.step_size,
                self.cfg.alpha_threshold,
                self.cfg.early_stop_eps,
                stratified=self.training,
                near=self.cfg.near,
                prefix_rays=normal_rays if normals else None,  # samples come sorted by ray: theirs are a prefix
                two_rounds=not self.training,
            )

            def shade(o: Tensor, d: Tensor, bg: Tensor) -> tuple[Tensor, ...]:
                return self._shade_packed(o, d, bg, ray_indices, t_starts, t_ends, normals, split)
        else:
            t_starts, t_ends, t_points = stratified_samples(
                origins, directions, self.field.aabb.to(origins.dtype), self.cfg.samples_per_ray, self.training, self.cfg.near
            )

            split = None if normal_rays is None else normal_rays * t_points.shape[1]

            def shade(o: Tensor, d: Tensor, bg: Tensor) -> tuple[Tensor, ...]:
                return self._shade_dense(o, d, bg, t_starts, t_ends, t_points, normals, split)

        if use_checkpoint:
            values = checkpoint(shade, origins, directions, background, use_reentrant=False, preserve_rng_state=False)
        else:
            values = shade(origins, directions, background)
        keys = ("rgb", "opacity", "depth", "normal", "orientation") if normals else ("rgb", "opacity", "depth")
        return dict(zip(keys, values, strict=True))

    def _shade_dense(
        self,
        origins: Tensor,
        directions: Tensor,
        background: Tensor,
        t_starts: Tensor,
        t_ends: Tensor,
        t_points: Tensor,
        normals: bool,
        split: int | None = None,
    ) -> tuple[Tensor, ...]:
        n_rays, n_samples = t_points.shape
        points = origins[:, None] + directions[:, None] * t_points[..., None]
        field = self.field(points.reshape(-1, 3), with_normals=normals, normal_points=split)
        weights, _, _ = compositing_weights(field.density.view(n_rays, n_samples), t_ends - t_starts)
        opacity = accumulate(weights)
        rgb = over_background(accumulate(weights, field.albedo.view(n_rays, n_samples, 3)), opacity, background)
        depth = accumulate(weights, t_points[..., None])
        if not normals:
            return rgb, opacity, depth
        n = field.normal.view(n_rays, n_samples, 3)
        facing = F.relu((n * directions[:, None]).sum(-1, keepdim=True)) ** 2
        return rgb, opacity, depth, accumulate(weights, n), accumulate(weights.detach(), facing)

    def _shade_packed(
        self,
        origins: Tensor,
        directions: Tensor,
        background: Tensor,
        ray_indices: Tensor,
        t_starts: Tensor,
        t_ends: Tensor,
        normals: bool,
        split: int | None = None,
    ) -> tuple[Tensor, ...]:
        n_rays = origins.shape[0]
        t_mid = 0.5 * (t_starts + t_ends)
        ray_dirs = directions[ray_indices]
        field = self.field(origins[ray_indices] + ray_dirs * t_mid[:, None], with_normals=normals, normal_points=split)
        weights = packed_weights(t_starts, t_ends, field.density, ray_indices)
        opacity = accumulate_packed(weights, None, ray_indices, n_rays)
        rgb = over_background(accumulate_packed(weights, field.albedo, ray_indices, n_rays), opacity, background)
        depth = accumulate_packed(weights, t_mid[:, None], ray_indices, n_rays)
        if not normals:
            return rgb, opacity, depth
        facing = F.relu((field.normal * ray_dirs).sum(-1, keepdim=True)) ** 2
        normal = accumulate_packed(weights, field.normal, ray_indices, n_rays)
        return rgb, opacity, depth, normal, accumulate_packed(weights.detach(), facing, ray_indices, n_rays)


def _match_occupancy_keys(module: VolumeRenderer, state_dict: dict, prefix: str, *_args) -> None:
    """Lets a checkpoint load whether or not it (or this renderer) has an occupancy grid.

    The grid and nerfacc samplers keep the grid under the same keys
    (``occupancy.estimator.occs`` and ``binaries``), so either loads the other's
    grid (nerfacc's other buffers, its resolution and box, come from the
    loading renderer's config); a stratified renderer drops it; a grid renderer
    loading a checkpoint without a grid keeps its current grid (the next
    refresh rebuilds it).
    """
    grid_prefix = prefix + "occupancy."
    if module.occupancy is None:
        for key in [k for k in state_dict if k.startswith(grid_prefix)]:
            del state_dict[key]
        return
    own = module.occupancy.state_dict()
    for name, value in own.items():
        state_dict.setdefault(grid_prefix + name, value)
    for key in [k for k in state_dict if k.startswith(grid_prefix) and k[len(grid_prefix):] not in own]:
        del state_dict[key]  # nerfacc's extra estimator.resolution / aabbs, loading into the PyTorch grid
