"""Staged optimisation of a radiance field from one image: reference-view losses + SDS on random views.

A fit runs its stages in order (``coarse`` then ``fine`` by default). Each
step renders the reference camera (RGB + mask losses) and a batch of random
cameras, scored by the guidance (SDS) and regularised (opacity entropy,
sparsity, normal orientation and smoothness). Every loss weight, and the
number of active hash-grid levels, is a schedule (:mod:`recon.schedule`)
whose steps count from the start of its stage. Checkpoints hold the field,
the occupancy grid, the optimiser and every RNG, so a resumed fit retraces
an uninterrupted one step for step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from recon.cameras import Cameras, ViewSampler, generate_rays
from recon.config import resolve
from recon.errors import ReconError, TrainingDivergedError
from recon.exports.config import ExportConfig
from recon.field import FieldConfig, RadianceField
from recon.guidance.config import GuidanceConfig
from recon.guidance.protocol import Guidance
from recon.imageio import composite, resize_rgba
from recon.preprocess import ReferenceView
from recon.render import RendererConfig, VolumeRenderer
from recon.runs import RunDir, StepReporter
from recon.runtime import to_device
from recon.schedule import Schedule, validate_schedule, value_at
from recon.systems import losses
from recon.systems.checkpoint import load_latest, save_checkpoint, wait_for_checkpoints

LOSS_NAMES = ("sds", "rgb", "mask", "normal_smooth_2d", "normal_smooth_3d", "orientation", "sparsity", "opacity")


@dataclass
class LossWeights:
    """Weight of each loss term: a schedule (a number, ``[start_step, v0, v1, end_step]`` or ``{step: value}``) in stage steps."""

    sds: Schedule = 0.1
    """Score distillation on random views."""
    rgb: Schedule = 500.0
    """Mean squared colour error on the reference view."""
    mask: Schedule = 50.0
    """Silhouette error (rendered opacity vs the reference alpha) on the reference view."""
    normal_smooth_2d: Schedule = 0.0
    """Squared difference of neighbouring pixels of rendered normal maps (random views)."""
    normal_smooth_3d: Schedule = 0.0
    """Squared difference of field normals at surface points and at jittered points."""
    orientation: Schedule = 0.0
    """Penalty on visible normals facing away from the camera (random views)."""
    sparsity: Schedule = 0.0
    """sqrt(opacity^2 + 0.01) of random-view rays: less occupied area."""
    opacity: Schedule = 0.1
    """Binary entropy of random-view opacity: rays fully empty or fully opaque."""


@dataclass
class StageConfig:
    """One stage of the optimisation: steps, render sizes, learning rate, loss weights.

    Render sizes, the batch size, the active hash levels and every loss
    weight are schedules (a number, ``[start_step, v0, v1, end_step]`` or
    ``{step: value}``) counted in steps from the start of the stage.
    """

    steps: int = 200
    """Optimisation steps of this stage (0 skips it)."""
    resolution: Schedule = 64
    """Side of the random-view renders scored by the guidance, pixels (a schedule, e.g. {0: 128, 200: 256})."""
    batch_size: Schedule = 8
    """Random views per step (a schedule)."""
    reference_resolution: Schedule = 128
    """Side of the reference-view render compared with the input image, pixels (a schedule)."""
    active_levels: Schedule = 16
    """Hash-grid levels in use (a schedule; opened progressively for coarse-to-fine; capped at the grid's levels)."""
    lr: float = 0.01
    """Adam learning rate of the field in this stage."""
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    """Loss weights (schedules in stage steps)."""
    normal_views: int = 0
    """Views per step (the first of the batch) whose rays get normals for the normal_smooth_2d and orientation
    losses; 0 = every view. Each such ray costs a second-order pass through the field (the normals are the
    density's gradient, trained through), so fewer views make steps cheaper; both losses are means over the
    views that have normals."""
    normal_points: int = 4096
    """Surface points per step for the 3D normal smoothness loss."""
    normal_jitter: float = 0.01
    """Standard deviation of the jitter of the 3D normal smoothness loss, world units."""

    def sizes(self, local_step: int) -> tuple[int, int, int]:
        """(random-view resolution, views per step, reference resolution) at ``local_step`` of the stage."""
        return tuple(round(value_at(s, local_step)) for s in (self.resolution, self.batch_size, self.reference_resolution))


def _default_stages() -> dict[str, StageConfig]:
    return {
        "coarse": StageConfig(
            steps=200,
            resolution=64,
            batch_size=12,
            reference_resolution=128,
            active_levels=[0, 8, 16, 150],
            weights=LossWeights(sds=0.1, rgb=500.0, mask=50.0, opacity=0.1, sparsity=0.1),
        ),
        "fine": StageConfig(
            steps=400,
            resolution={0: 128, 200: 256},
            batch_size={0: 4, 200: 2},
            reference_resolution=256,
            lr=0.005,
            normal_views=1,
            weights=LossWeights(
                sds=0.1,
                rgb=500.0,
                mask=50.0,
                normal_smooth_2d=[0, 0.0, 8.0, 100],
                normal_smooth_3d=[0, 0.0, 8.0, 100],
                orientation=1.0,
                sparsity=0.1,
                opacity=0.1,
            ),
        ),
    }


@dataclass
class PreprocessConfig:
    """How the input photo becomes the reference view (recon.preprocess.load_reference)."""

    size: int = 256
    """Side of the square reference image, pixels."""
    foreground_ratio: float | None = None
    """Longer side of the object's bounding box as a fraction of the image side; None = the framing the guidance
    weights record (guidance.checkpoints.recorded_foreground_ratio: the shipped tiny prior's training images),
    else 0.85. config.yaml holds the number used."""
    remove_bg: bool = True
    """Remove the background of images without transparency (else the whole frame is the object)."""


@dataclass
class CameraConfig:
    """The input photo's camera and the random views for score distillation (recon.cameras.ViewSampler)."""

    reference_elevation_deg: float = 0.0
    """Elevation of the input photo's camera, degrees (`recon fit --elevation`): where the reference view is
    rendered from and the conditioning camera of both pose encodings and of the cascade's nearby views."""

    elevation_range: list[float] = dataclasses.field(default_factory=lambda: [-10.0, 80.0])
    """Elevation range of random views, degrees."""
    azimuth_range: list[float] = dataclasses.field(default_factory=lambda: [-180.0, 180.0])
    """Azimuth range of random views, degrees (0 = the input camera)."""
    radius: float | None = None
    """Camera distance of random views; None = the reference camera's."""
    fovy_deg: float | None = None
    """Vertical field of view of random views, degrees; None = the reference camera's (Zero123 uses a fixed one)."""


@dataclass
class FitConfig:
    """Everything a `recon fit` run does, saved as the run folder's config.yaml."""

    seed: int = 0
    """Seed of every random choice (views, noise, initialisation)."""
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    """Radiance field (hash grid + MLP)."""
    renderer: RendererConfig = dataclasses.field(default_factory=RendererConfig)
    """Volume renderer."""
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    """Score distillation guidance (model, timestep schedule, cascade)."""
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=_default_stages)
    """Stages in order, by name; `--set stages.fine.steps=100` edits one."""
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    """Input image -> reference view."""
    cameras: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    """Random-view camera sampling."""
    background: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Background colour of every render (RGB in [0, 1]); Zero123 was trained on white."""
    mask_loss: Literal["mse", "bce"] = "mse"
    """Silhouette loss: squared error or binary cross-entropy."""
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    """Mesh export after training."""
    turntable: bool = True
    """Render a turntable video (exports/turntable.mp4, GIF without ffmpeg); settings in export.turntable_*."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end of each stage)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    preview_every: int = 100
    """Write a preview PNG (reference view + three turns) every this many steps; 0 = never."""
    preview_resolution: int = 128
    """Side of each preview tile, pixels."""
    mixed_precision: bool = True
    """bfloat16 autocast for rendering and guidance on CUDA (ignored on the CPU)."""
    batched_render: bool = True
    """Render the reference view and the random views as one ray set per step (one sampling pass and one
    field evaluation); false renders them one after the other (the reference path, same losses)."""
    nan_policy: Literal["rollback", "stop"] = "rollback"
    """On a NaN/inf loss: roll back to the last checkpoint with half the learning rate, or stop."""
    max_rollbacks: int = 3
    """Rollbacks allowed per run before a NaN loss stops it."""

    def __post_init__(self) -> None:
        if not any(stage.steps > 0 for stage in self.stages.values()):
            raise ReconError("config: every stage has 0 steps; nothing to optimise")
        for name, stage in self.stages.items():
            if stage.steps < 0 or stage.lr <= 0:
                raise ReconError(f"stages.{name}: steps must be >= 0 and lr > 0, got {stage.steps} and {stage.lr}")
            for key in ("resolution", "batch_size", "reference_resolution", "active_levels"):
                validate_schedule(getattr(stage, key), f"stages.{name}.{key}")
            for step in range(max(stage.steps, 1)):
                resolution, batch, reference = stage.sizes(step)
                if resolution < 8 or reference < 8 or batch < 1:
                    raise ReconError(f"stages.{name}: resolution and reference_resolution must stay >= 8 and batch_size >= 1")
            for loss in LOSS_NAMES:
                validate_schedule(getattr(stage.weights, loss), f"stages.{name}.weights.{loss}")
        if len(self.background) != 3:
            raise ReconError(f"background must be 3 numbers (RGB), got {self.background}")
        if self.checkpoint_every < 1 or self.preview_every < 0:
            raise ReconError("checkpoint_every must be >= 1 and preview_every >= 0")

    @property
    def total_steps(self) -> int:
        """Steps over all stages."""
        return sum(stage.steps for stage in self.stages.values())


def resolve_config(*layers: dict[str, Any] | None, overrides: Sequence[str] = ()) -> FitConfig:
    """Defaults <- each layer (a preset, flags) <- ``key.path=value`` overrides, as a validated :class:`FitConfig`.

    :func:`recon.config.resolve`: a schedule given as ``{step: value}``
    replaces the previous schedule instead of merging its steps into it;
    unknown keys and wrong types raise :class:`ReconError` naming the key.
    """
    return resolve(FitConfig, *layers, overrides=tuple(overrides))


def _scale_schedule(schedule: Any, factor: float) -> Any:
    """A schedule with its step positions multiplied by ``factor`` (values unchanged)."""
    if isinstance(schedule, dict):
        return {round(int(k) * factor): v for k, v in schedule.items()}
    if isinstance(schedule, (list, tuple)) and len(schedule) == 4:
        start, v0, v1, end = schedule
        return [round(start * factor), v0, v1, round(end * factor)]
    return schedule


def scale_steps(cfg: FitConfig, total: int) -> FitConfig:
    """``cfg`` with ``total`` steps overall: stage lengths and every schedule's step positions scale alike.

    Stage schedules count stage steps; the guidance's schedules (guidance
    scale, timestep range, gradient clip) count global steps. Each active
    stage keeps at least one step.
    """
    if total < 1:
        raise ReconError(f"--steps must be >= 1, got {total}")
    factor = total / cfg.total_steps
    for stage in cfg.stages.values():
        if stage.steps == 0:
            continue
        stage.steps = max(1, round(stage.steps * factor))
        for key in ("resolution", "batch_size", "reference_resolution", "active_levels"):
            setattr(stage, key, _scale_schedule(getattr(stage, key), factor))
        for loss in LOSS_NAMES:
            setattr(stage.weights, loss, _scale_schedule(getattr(stage.weights, loss), factor))
    for name in ("guidance_scale", "min_step_percent", "max_step_percent", "grad_clip"):
        setattr(cfg.guidance, name, _scale_schedule(getattr(cfg.guidance, name), factor))
    return cfg


def oom_message(stage: str, cfg: StageConfig, local_step: int) -> str:
    """What to turn down when a stage runs out of GPU memory at ``local_step``."""
    resolution, batch, _ = cfg.sizes(local_step)
    return (
        f"out of GPU memory in stage {stage!r} ({batch} views of {resolution} px per step): "
        f"lower --set stages.{stage}.batch_size={max(1, batch // 2)} or "
        f"stages.{stage}.resolution={max(32, resolution // 2)}, or renderer.chunk_rays, "
        "or guidance.cfg_chunk=1, or use --preset fast"
    )


@dataclass
class QueuedStep:
    """A training step queued on the device, its loss not read yet (reading waits for that step's work only).

    ``values`` (2 + terms,) float32 on the host: the total loss, the gradient norm, then each loss term's
    unweighted value in ``names``' order; on CUDA an asynchronous copy fills it, done when ``ready`` is.
    """

    step: int
    values: Tensor
    names: list[str]
    ready: Any = None

    @classmethod
    def copying(cls, step: int, values: Tensor, names: list[str]) -> QueuedStep:
        """Starts the copy of ``values`` (on any device) to pinned host memory; no wait."""
        if not values.is_cuda:
            return cls(step, values, names)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(step, host, names, ready)

    def read(self) -> tuple[float, float, dict[str, float]]:
        """(total loss, gradient norm, {term: value}) once the step's device work is done."""
        if self.ready is not None:
            self.ready.synchronize()
        loss, grad_norm, *terms = self.values.tolist()
        return loss, grad_norm, dict(zip(self.names, terms, strict=True))


class Trainer:
    """Optimises a radiance field for one reference view with a guidance; writes checkpoints, previews, progress.

    ``guidance`` (any :class:`recon.guidance.Guidance`) has been prepared for
    ``reference``; its ``sds`` scores the renders every step.
    """

    def __init__(self, cfg: FitConfig, guidance: Guidance, reference: ReferenceView, run: RunDir, device: torch.device) -> None:
        self.cfg = cfg
        self.guidance = guidance
        self.reference = reference
        self.run = run
        self.device = device
        torch.manual_seed(cfg.seed)
        self.field = RadianceField(cfg.field).to(device)
        self.renderer = VolumeRenderer(self.field, cfg.renderer).to(device)
        self.stages = [(name, stage) for name, stage in cfg.stages.items() if stage.steps > 0]
        first_lr = self.stages[0][1].lr
        # fused: one kernel for every parameter (CUDA); the CPU keeps the foreach implementation
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.field.parameters(), lr=first_lr, betas=(0.9, 0.99), eps=1e-15, fused=fused)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
        self.sampler = ViewSampler(
            elevation_range=tuple(cfg.cameras.elevation_range),
            azimuth_range=tuple(cfg.cameras.azimuth_range),
            radius=reference.radius if cfg.cameras.radius is None else cfg.cameras.radius,
            fovy_deg=reference.fovy_deg if cfg.cameras.fovy_deg is None else cfg.cameras.fovy_deg,
        )
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.step = 0
        self.last_loss = float("nan")
        self.last_losses: dict[str, float] = {}
        self.last_diagnostics: MutableMapping[str, float] = {}
        self._targets: dict[int, tuple[Tensor, Tensor]] = {}
        self._reference_cameras: dict[int, Cameras] = {}
        self._reference_rays: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------ state
    def _modules(self) -> dict[str, Any]:
        renderer_state = {k: v for k, v in self.renderer.state_dict().items() if not k.startswith("field.")}
        return {"field": self.field, "renderer": renderer_state}

    def save(self, stage: str) -> None:
        """Checkpoints the current step (field, occupancy grid, optimiser, RNGs, view generator)."""
        extra = {
            "generator": self.generator.get_state(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
        }
        # written in a background thread; every checkpoint reader waits for it
        save_checkpoint(self.run, self.step, stage, self._modules(), {"adam": self.optimizer}, extra, keep=self.cfg.keep_checkpoints, background=True)

    def restore_latest(self) -> bool:
        """Loads the run's newest checkpoint; False if it has none."""
        checkpoint = load_latest(self.run, map_location="cpu")
        if checkpoint is None:
            return False
        checkpoint.restore({"field": self.field}, {"adam": self.optimizer})
        self.renderer.load_state_dict({**self.field_state_prefixed(), **checkpoint.modules["renderer"]})
        self.generator.set_state(checkpoint.extra["generator"].cpu())
        self.lr_scale = float(checkpoint.extra["lr_scale"])
        self.rollbacks = int(checkpoint.extra["rollbacks"])
        self.step = checkpoint.step
        return True

    def field_state_prefixed(self) -> dict[str, Tensor]:
        """The field's state under the renderer's ``field.`` prefix."""
        return {f"field.{k}": v for k, v in self.field.state_dict().items()}

    # ------------------------------------------------------------ data
    def reference_cameras(self, resolution: int) -> Cameras:
        """The input camera rendered at ``resolution`` pixels (made once per resolution)."""
        if resolution not in self._reference_cameras:
            ref = self.reference
            self._reference_cameras[resolution] = Cameras.from_spherical(
                torch.tensor([ref.elevation_deg]), torch.tensor([ref.azimuth_deg]), torch.tensor([ref.radius]), ref.fovy_deg, resolution
            ).to(self.device)
        return self._reference_cameras[resolution]

    def reference_rays(self, resolution: int) -> tuple[Tensor, Tensor]:
        """Origins and directions (1, R, R, 3) of the input camera's pixels at ``resolution`` (made once per resolution)."""
        if resolution not in self._reference_rays:
            self._reference_rays[resolution] = generate_rays(self.reference_cameras(resolution))
        return self._reference_rays[resolution]

    def targets(self, resolution: int) -> tuple[Tensor, Tensor]:
        """Reference colour over the background (1, R, R, 3) and alpha (1, R, R, 1) at ``resolution``."""
        if resolution not in self._targets:
            rgba = self.reference.rgba[None].float()
            if rgba.shape[-1] != resolution:
                rgba = resize_rgba(rgba, resolution)
            alpha = rgba[:, 3:]
            rgb = composite(rgba, self.background.cpu())
            self._targets[resolution] = (rgb.permute(0, 2, 3, 1).to(self.device), alpha.permute(0, 2, 3, 1).to(self.device))
        return self._targets[resolution]

    def _autocast(self) -> Any:
        enabled = self.cfg.mixed_precision and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------ one step
    def losses(self, stage: StageConfig, local_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of one step and each term's unweighted value (0-d tensors: read them after backward)."""
        weights = {name: value_at(getattr(stage.weights, name), local_step) for name in LOSS_NAMES}
        resolution, batch_size, reference_resolution = stage.sizes(local_step)
        terms: dict[str, Tensor] = {}
        with_reference = weights["rgb"] > 0 or weights["mask"] > 0
        random_terms = ("sds", "normal_smooth_2d", "normal_smooth_3d", "orientation", "sparsity", "opacity")
        view_rays = None
        if any(weights[name] > 0 for name in random_terms):
            cameras, elevation, azimuth = self.sampler.sample(batch_size, resolution, self.generator)
            view_rays = generate_rays(cameras.to(self.device))
        with_normals = weights["normal_smooth_2d"] > 0 or weights["orientation"] > 0
        normal_views = batch_size if stage.normal_views <= 0 else min(stage.normal_views, batch_size)
        reference = self.reference_rays(reference_resolution) if with_reference else None
        ref, out = self.render_views(reference, view_rays, with_normals, normal_views)
        if ref is not None:
            target_rgb, target_mask = self.targets(reference_resolution)
            if weights["rgb"] > 0:
                terms["rgb"] = losses.rgb_loss(ref["rgb"], target_rgb)
            if weights["mask"] > 0:
                terms["mask"] = losses.mask_loss(ref["opacity"], target_mask, self.cfg.mask_loss)
        if out is not None:
            if weights["sds"] > 0:
                # outside autocast: the guidance runs its models in their own dtype
                radius = torch.full_like(elevation, self.sampler.radius)
                images = out["rgb"].permute(0, 3, 1, 2).float()
                # the cameras stay on the CPU: the guidance builds its pose tokens there (no device round trip)
                sds = self.guidance.sds(images, elevation, azimuth, radius, self.step)
                terms["sds"] = sds.loss.float()
                self.last_diagnostics = sds.diagnostics  # read lazily: copying it now would sync mid-step
            if weights["opacity"] > 0:
                terms["opacity"] = losses.opacity_entropy(out["opacity"])
            if weights["sparsity"] > 0:
                terms["sparsity"] = losses.sparsity(out["opacity"])
            if weights["normal_smooth_2d"] > 0:
                terms["normal_smooth_2d"] = losses.normal_smoothness_2d(out["normal"][:normal_views])
            if weights["orientation"] > 0:
                terms["orientation"] = losses.orientation(out["orientation"][:normal_views])
            if weights["normal_smooth_3d"] > 0:
                points, point_weights = losses.surface_points(
                    *view_rays, out["depth"].float(), out["opacity"].float(), stage.normal_points
                )
                terms["normal_smooth_3d"] = losses.normal_smoothness_3d(
                    self.field.normals, points, stage.normal_jitter, self.generator, point_weights
                )
        if not terms:
            raise ReconError("every loss weight is 0 at this step; nothing to optimise")
        # one weighted sum over the stacked terms: three kernels instead of a multiply and an add per term
        scale = to_device(torch.tensor([weights[name] for name in terms]), self.device)
        total = (torch.stack([value.float() for value in terms.values()]) * scale).sum()
        return total, terms

    def render_views(
        self, reference: tuple[Tensor, Tensor] | None, views: tuple[Tensor, Tensor] | None, normals: bool, normal_views: int | None = None
    ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """Renders the reference view's rays (without normals) and the random views' rays (with ``normals``): each
        a pair (origins, directions) of (N, H, W, 3), as :func:`recon.cameras.generate_rays` makes them; values
        (N, H, W, C).

        With ``batched_render`` both go through the renderer as one ray set (one sampling pass; the field
        computes normals only for the samples of the first ``normal_views`` random views, None = all; the
        other views' normal and orientation maps are 0); otherwise one render each, with normals for every
        random view (the reference path).
        """
        with self._autocast():
            if not self.cfg.batched_render or reference is None or views is None:
                ref = None if reference is None else self.renderer.render_images(*reference, self.background)
                out = None if views is None else self.renderer.render_images(*views, self.background, normals)
                return ref, out
            # the random views first: only their rays need normals
            rays = (views, reference)
            origins = torch.cat([o.reshape(-1, 3) for o, _ in rays])
            directions = torch.cat([d.reshape(-1, 3) for _, d in rays])
            split = views[0].shape[:3].numel()
            normal_rays = views[0][:normal_views].shape[:3].numel()
            both = self.renderer.render_rays(origins, directions, self.background, normals, normal_rays=normal_rays)
        shapes = [o.shape[:3] for o, _ in rays]
        # split, not two slices: the backward joins a key's two gradients in one kernel
        parts = {key: value.split([split, value.shape[0] - split]) for key, value in both.items()}
        out = {key: views_part.view(*shapes[0], -1) for key, (views_part, _) in parts.items()}
        ref = {key: parts[key][1].view(*shapes[1], -1) for key in ("rgb", "opacity", "depth")}
        return ref, out

    def train_step(self, stage_name: str, stage: StageConfig, local_step: int) -> QueuedStep:
        """Queues one optimisation step, the update included, without waiting for the device; returns its
        :class:`QueuedStep`, whose loss is read later (:meth:`QueuedStep.read`).

        The update is applied whatever the loss: a step whose loss or gradient turns out NaN/inf is found when
        :meth:`fit` reads it, before anything is saved, and the fit then rolls back to the last checkpoint (or
        stops), which discards it and any step queued after it.
        """
        levels = round(value_at(stage.active_levels, local_step))
        self.field.set_active_levels(max(1, min(levels, self.cfg.field.encoding.n_levels)))
        self.renderer.train()
        self.renderer.update_occupancy(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = stage.lr * self.lr_scale
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, terms = self.losses(stage, local_step)
            loss.backward()
        except torch.cuda.OutOfMemoryError as exc:
            raise ReconError(oom_message(stage_name, stage, local_step)) from exc
        grads = [p.grad for p in self.field.parameters() if p.grad is not None]
        grad_norm = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else loss.new_zeros(())
        values = torch.stack([loss.detach().float(), grad_norm, *(v.detach().float() for v in terms.values())])
        self.optimizer.step()
        return QueuedStep.copying(self.step, values, list(terms))

    def _read(self, steps: Sequence[QueuedStep]) -> int | None:
        """Reads queued ``steps`` in order into ``last_loss`` / ``last_losses``; the step number of the first whose
        loss or gradient is NaN/inf (the rest unread), else None."""
        for queued in steps:
            loss, grad_norm, terms = queued.read()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                return queued.step
            self.last_loss, self.last_losses = loss, terms
        return None

    def _diverged(self, stage_name: str) -> None:
        """Rolls back to the last checkpoint with half the learning rate, or raises TrainingDivergedError."""
        where = f"loss became NaN/inf at step {self.step} (stage {stage_name!r})"
        if self.cfg.nan_policy == "stop" or self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDivergedError(
                f"{where}; stopped without exporting. Lower the learning rate (--set stages.{stage_name}.lr=...), "
                "set mixed_precision=false, or resume from the last checkpoint with --resume"
            )
        rollbacks = self.rollbacks + 1
        if not self.restore_latest():
            raise TrainingDivergedError(f"{where} and there is no checkpoint to roll back to; nothing exported")
        self.rollbacks = rollbacks
        self.lr_scale *= 0.5
        # a different random stream after the rollback, so the same views and noise do not recur
        self.generator.manual_seed(self.cfg.seed + 7919 * self.rollbacks)
        torch.manual_seed(self.cfg.seed + 7919 * self.rollbacks)
        from recon.progress import warn

        warn(f"{where}; rolled back to step {self.step} with learning rate x{self.lr_scale:g} ({self.rollbacks}/{self.cfg.max_rollbacks})")

    # ------------------------------------------------------------ previews
    @torch.no_grad()
    def write_preview(self) -> None:
        """previews/step_XXXXXX.png: the reference view and three quarter turns side by side."""
        from PIL import Image

        from recon.fileio import atomic_path

        ref = self.reference
        azimuth = torch.tensor([0.0, 90.0, 180.0, 270.0]) + ref.azimuth_deg
        elevation = torch.full((4,), float(ref.elevation_deg))
        cameras = Cameras.from_spherical(elevation, azimuth, torch.full((4,), float(ref.radius)), ref.fovy_deg, self.cfg.preview_resolution)
        was_training = self.renderer.training
        self.renderer.eval()
        rgb = self.renderer.render(cameras.to(self.device), self.background)["rgb"].float().clamp(0, 1)
        self.renderer.train(was_training)
        strip = torch.cat(list(rgb), dim=1).cpu().numpy()
        with atomic_path(self.run.file(f"previews/step_{self.step:06d}.png")) as tmp:
            Image.fromarray((strip * 255.0 + 0.5).astype("uint8")).save(tmp, format="PNG")

    # ------------------------------------------------------------ the loop
    def fit(self, timer: Any = None) -> None:
        """Runs every stage from the current step (0, or the restored checkpoint's) to the end.

        ``timer`` is an optional :class:`recon.progress.PhaseTimer`; each stage is one phase.
        """
        import contextlib

        if self.step == 0 and load_latest(self.run) is None:
            self.save(self.stages[0][0])  # step 0: a rollback target before the first update
        try:
            begin = 0
            for name, stage in self.stages:
                end = begin + stage.steps
                if self.step >= end:
                    begin = end
                    continue
                phase = timer.phase(name) if timer is not None else contextlib.nullcontext()
                with phase, StepReporter(self.run, name, stage.steps, start_step=self.step - begin) as reporter:
                    unread: list[QueuedStep] = []
                    while self.step < end:
                        unread.append(self.train_step(name, stage, self.step - begin))
                        self.step += 1
                        preview = bool(self.cfg.preview_every) and self.step % self.cfg.preview_every == 0
                        checkpoint = self.step % self.cfg.checkpoint_every == 0 or self.step == end
                        # the step just queued is read one step late (its device work overlaps the next step's host
                        # work), or now when a preview or checkpoint is due: nothing saved was made by a diverged step
                        count = len(unread) if preview or checkpoint else len(unread) - 1
                        diverged, unread = self._read(unread[:count]), unread[count:]
                        if diverged is not None:
                            unread, self.step = [], diverged
                            self._diverged(name)
                            continue
                        if preview:
                            self.write_preview()
                        if checkpoint:
                            self.save(name)
                        read = math.isfinite(self.last_loss)  # nan until the first step is read
                        reporter.update(self.step - begin, status=f"loss {self.last_loss:.4g}" if read else "")
                begin = end
        except BaseException:
            # a write still in flight finishes before the caller may reuse or remove the run folder; its own
            # failure must not hide the error that stopped the fit
            with contextlib.suppress(ReconError):
                wait_for_checkpoints(self.run, release_buffers=True)
            raise
        wait_for_checkpoints(self.run, release_buffers=True)  # the last checkpoint is on disk (or its write failed: raised here)
        broken = [name for name, p in self.field.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise TrainingDivergedError(f"field parameters {', '.join(broken)} are NaN/inf after training; nothing exported")
        self.renderer.eval()
