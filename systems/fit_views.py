"""Multi-view NeRF fitting: a radiance field optimised to reproduce posed RGBA images.

Each step draws a random batch of rays over all training pixels, renders
them through :class:`recon.render.VolumeRenderer` and minimises the squared
error to the images composited over a background (a random colour per ray by
default, which forces empty space to become transparent). Adam with separate
learning rates for the hash table and the MLP, decayed exponentially.
Checkpoints, previews and progress go to the run folder (:mod:`recon.runs`);
a resumed run continues bit-for-bit from its newest checkpoint.

The scene is mapped into the field's box by :class:`SceneConfig`
(``field = (world - center) * scale``), recorded in config.yaml ``scene`` so
exports come back in the transforms.json's own units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.cameras import Cameras, pixel_rays
from recon.config import resolve, to_plain
from recon.data.transforms_json import (
    PosedImages,
    estimate_scene,
    read_transforms,
    scene_scale,
    transforms_file,
)
from recon.errors import InputError, TrainingDivergedError
from recon.exports.config import ExportConfig
from recon.exports.frame import dominant_up_axis
from recon.field import FieldConfig, RadianceField
from recon.fileio import write_json
from recon.imageio import composite, save_rgba_png
from recon.metrics import psnr, ssim
from recon.progress import PhaseTimer, info
from recon.render import RendererConfig, VolumeRenderer
from recon.runs import RunDir, StepReporter
from recon.runtime import peak_memory_gib, reset_peak_memory
from recon.systems.checkpoint import (
    Checkpoint,
    SceneTransform,
    load_latest,
    save_checkpoint,
)
from recon.systems.run_export import camera_record, cameras_from_record

STAGE = "fit-views"


@dataclass
class SceneConfig:
    """How the transforms.json's world maps into the field's box: field = (world - center) * scale."""

    center: list[float] | None = None
    """Scene centre in the JSON's units; None = the point the cameras look at (least squares)."""
    scale: float = 0.0
    """World -> field scale; 0 = automatic (the region the cameras see at the centre fills the field box)."""
    margin: float = 1.0
    """Automatic scale only: the seen region fills this fraction of the box (< 1 leaves room)."""


@dataclass
class FitViewsConfig:
    """Fitting a radiance field to posed images (``recon fit-views``)."""

    field: FieldConfig = dataclass_field(default_factory=FieldConfig)
    """Radiance field (hash grid + MLP)."""
    renderer: RendererConfig = dataclass_field(default_factory=RendererConfig)
    """Volume renderer and sampler."""
    scene: SceneConfig = dataclass_field(default_factory=SceneConfig)
    """World -> field box mapping."""
    steps: int = 5000
    """Optimisation steps."""
    rays_per_batch: int = 4096
    """Rays per step, drawn uniformly over all training pixels."""
    lr_encoding: float = 1e-2
    """Adam learning rate of the hash table."""
    lr_mlp: float = 1e-2
    """Adam learning rate of the MLP."""
    lr_final_ratio: float = 0.1
    """Learning rates decay exponentially to this fraction of their start by the last step."""
    betas: list[float] = dataclass_field(default_factory=lambda: [0.9, 0.99])
    """Adam betas."""
    eps: float = 1e-15
    """Adam epsilon (tiny, as hash tables have many rarely-updated rows)."""
    eval_every: int = 1000
    """Steps between previews (held-out renders) and held-out PSNR read-outs; 0 = only at the end."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    holdout_split: str = "test"
    """Held-out views: transforms_{split}.json beside the input, when it exists."""
    holdout_fraction: float = 0.1
    """Without that file: hold out this fraction of the frames (evenly spaced); 0 = none."""
    max_eval_views: int = 25
    """At most this many held-out views are evaluated (evenly spaced)."""
    preview_views: int = 4
    """Held-out views shown in each preview grid."""
    background: list[float] = dataclass_field(default_factory=lambda: [1.0, 1.0, 1.0])
    """RGB in [0, 1] behind the object in evaluation renders and previews."""
    random_background: bool = True
    """Train over a random background colour per ray (makes empty space transparent)."""
    seed: int = 0
    """Random seed (ray batches, initialisation)."""
    export: ExportConfig = dataclass_field(default_factory=lambda: ExportConfig(formats=["glb", "obj"], up_axis="auto"))
    """Mesh export after training (up_axis auto: +z when the cameras' mean up vector leans more to world +Z
    than to +Y, as in Blender / NeRF-synthetic captures, else +y)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.rays_per_batch < 1:
            raise InputError("fit-views: steps must be >= 0 and rays_per_batch >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise InputError(f"fit-views: holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if len(self.betas) != 2 or len(self.background) != 3:
            raise InputError("fit-views: betas needs 2 values and background 3")


@dataclass
class ViewData:
    """Training and held-out views, cameras already in the field frame."""

    train: PosedImages
    held_out: PosedImages | None


def _evenly_spaced(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted({round(float(i)) for i in np.linspace(0, count - 1, limit)})


def load_views(transforms: str | Path, cfg: FitViewsConfig) -> ViewData:
    """Reads the training views and picks the held-out ones (cameras in the JSON's units)."""
    transforms = Path(transforms)
    train = read_transforms(transforms)
    held_path = transforms_file(transforms, cfg.holdout_split)
    if held_path.is_file() and held_path.resolve() != transforms_file(transforms).resolve():
        held = read_transforms(held_path)
        return ViewData(train, held.subset(_evenly_spaced(len(held), cfg.max_eval_views)))
    if cfg.holdout_fraction <= 0 or len(train) < 2:
        return ViewData(train, None)
    every = max(2, round(1.0 / cfg.holdout_fraction))
    held = list(range(every // 2, len(train), every))
    kept = [i for i in range(len(train)) if i not in set(held)]
    return ViewData(train.subset(kept), train.subset(held).subset(_evenly_spaced(len(held), cfg.max_eval_views)))


def training_photos(run: RunDir, transforms: str | Path) -> PosedImages:
    """The training views of the fit-views ``run`` re-read from its dataset ``transforms`` (as :func:`load_views`
    picked them, in the output frame), for a later export's photo bake. Raises :class:`InputError` when the run is
    not a fit-views run or the dataset's training cameras are not the run's (another or an edited dataset)."""
    record = run.read_meta().get("train_cameras")
    if not isinstance(record, dict):
        raise InputError(f"{run.root}: no training cameras in meta.json (not a finished recon fit-views run); photos need one")
    train = load_views(transforms, resolve(FitViewsConfig, run.read_config())).train
    recorded = cameras_from_record(record)
    same = len(train) == len(recorded) and torch.allclose(train.cameras.c2w[:, :3], recorded.c2w[:, :3], atol=1e-4, rtol=1e-4)
    if not same:
        raise InputError(f"{transforms}: its training views are not those run {run.root} was fitted to ({len(train)} views, the run has {len(recorded)})")
    return train


def resolve_scene(cfg: FitViewsConfig, cameras: Cameras) -> FitViewsConfig:
    """``cfg`` with an automatic scene centre/scale and export up axis replaced by values estimated from ``cameras``."""
    center, radius = estimate_scene(cameras)
    scene = cfg.scene
    new_center = scene.center if scene.center is not None else [round(float(c), 6) for c in center]
    new_scale = scene.scale if scene.scale > 0 else round(scene_scale(radius, cfg.field.bound, scene.margin), 6)
    up_axis = cfg.export.up_axis
    if up_axis == "auto":
        up_axis = dominant_up_axis(cameras.c2w[:, :3, 1].cpu().numpy())
    return replace(cfg, scene=replace(scene, center=new_center, scale=new_scale), export=replace(cfg.export, up_axis=up_axis))


def to_field_frame(views: PosedImages, transform: SceneTransform) -> PosedImages:
    """The same views with camera centres mapped by ``transform`` (rotations are unchanged)."""
    c2w = views.cameras.c2w.clone()
    c2w[:, :3, 3] = transform.to_field(c2w[:, :3, 3])
    cameras = Cameras(c2w, views.cameras.fovy, views.cameras.height, views.cameras.width)
    return PosedImages(views.images, cameras, views.paths)


def make_optimizer(field_module: RadianceField, cfg: FitViewsConfig) -> torch.optim.Adam:
    """Adam with two groups: ``encoding`` (hash table, lr_encoding) and ``mlp`` (everything else, lr_mlp)."""
    encoding = list(field_module.encoding.parameters())
    encoding_ids = {id(p) for p in encoding}
    rest = [p for p in field_module.parameters() if id(p) not in encoding_ids]
    groups = [
        {"params": encoding, "lr": cfg.lr_encoding, "name": "encoding", "base_lr": cfg.lr_encoding},
        {"params": rest, "lr": cfg.lr_mlp, "name": "mlp", "base_lr": cfg.lr_mlp},
    ]
    return torch.optim.Adam(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def _set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: FitViewsConfig) -> None:
    factor = cfg.lr_final_ratio ** (step / max(cfg.steps, 1))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _renderer_state(renderer: VolumeRenderer) -> dict[str, Tensor]:
    """The renderer's own state (occupancy grid) without its field's weights, which are saved once as ``field``."""
    return {k: v for k, v in renderer.state_dict().items() if not k.startswith("field.")}


def _restore_renderer(renderer: VolumeRenderer, state: dict[str, Tensor]) -> None:
    full = renderer.state_dict()
    unknown = set(state) - set(full)
    if unknown:
        raise InputError(f"checkpoint renderer state has unknown keys: {sorted(unknown)[:3]}")
    full.update(state)
    renderer.load_state_dict(full)


@torch.no_grad()
def render_views(renderer: VolumeRenderer, cameras: Cameras, background: Tensor) -> Tensor:
    """RGB renders (N, H, W, 3) of ``cameras``, one view at a time."""
    return torch.cat([renderer.render(cameras[i], background=background)["rgb"] for i in range(len(cameras))])


def evaluate(renderer: VolumeRenderer, views: PosedImages, background: Tensor) -> tuple[dict[str, float], Tensor, Tensor]:
    """Held-out PSNR/SSIM of the renders against the images over ``background``; also returns (renders, targets)."""
    device = background.device
    renders = render_views(renderer, views.cameras.to(device), background).clamp(0, 1)
    targets = composite(views.images.to(device), background, dim=-1)
    metrics = {"psnr": psnr(renders, targets), "ssim": ssim(renders, targets), "views": len(views)}
    return metrics, renders, targets


def write_preview(path: Path, renders: Tensor, targets: Tensor) -> None:
    """A PNG grid: ground truth on the top row, renders below (N, H, W, 3) each."""
    top = torch.cat(list(targets), dim=1)
    bottom = torch.cat(list(renders), dim=1)
    grid = torch.cat([top, bottom], dim=0).clamp(0, 1).cpu()
    save_rgba_png(path, torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1).numpy())


@dataclass
class FitResult:
    """What a fit produced: the final step, held-out metrics (empty without held-out views), the field."""

    step: int
    metrics: dict[str, float]
    field: RadianceField
    renderer: VolumeRenderer


class FitViewsTrainer:
    """Fits a radiance field to posed images in a run folder; :meth:`fit` resumes from the newest checkpoint.

    ``cfg.scene`` must already be resolved (see :func:`resolve_scene`);
    ``views`` are in the JSON's units and are mapped into the field frame here.
    """

    def __init__(self, run: RunDir, cfg: FitViewsConfig, views: ViewData, device: torch.device) -> None:
        self.run, self.cfg, self.device = run, cfg, device
        transform = SceneTransform.from_config(to_plain(cfg))
        self.train = to_field_frame(views.train, transform)
        self.held_out = None if views.held_out is None else to_field_frame(views.held_out, transform)
        self.field = RadianceField(cfg.field).to(device)
        self.renderer = VolumeRenderer(self.field, cfg.renderer).to(device)
        self.optimizer = make_optimizer(self.field, cfg)
        self.background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
        self.timer = PhaseTimer()
        n, h, w = len(self.train), self.train.cameras.height, self.train.cameras.width
        self.shape = (n, h, w)
        self.pixels = self.train.images.reshape(n * h * w, 4).to(device)
        self.c2w = self.train.cameras.c2w.to(device)
        self.focal = self.train.cameras.focal.to(device)

    def _resume(self) -> int:
        checkpoint: Checkpoint | None = load_latest(self.run, map_location=self.device)
        if checkpoint is None:
            return 0
        checkpoint.restore({"field": self.field}, {"adam": self.optimizer})
        _restore_renderer(self.renderer, checkpoint.modules.get("renderer", {}))
        info(f"resuming from {checkpoint.path.name} (step {checkpoint.step})")
        return checkpoint.step

    def save(self, step: int) -> Path:
        """Writes the checkpoint of ``step`` (field, renderer occupancy state, Adam, RNG)."""
        return save_checkpoint(
            self.run,
            step,
            STAGE,
            {"field": self.field, "renderer": _renderer_state(self.renderer)},
            {"adam": self.optimizer},
            keep=self.cfg.keep_checkpoints,
        )

    def train_step(self, step: int) -> Tensor:
        """One optimisation step on a random ray batch; returns the (detached) loss."""
        n, h, w = self.shape
        self.renderer.train()
        self.renderer.update_occupancy(step)
        index = torch.randint(0, n * h * w, (self.cfg.rays_per_batch,), device=self.device)
        image = index // (h * w)
        pixel = index % (h * w)
        origins, directions = pixel_rays(self.c2w[image], self.focal[image], pixel // w, pixel % w, h, w)
        if self.cfg.random_background:
            background = torch.rand(len(index), 3, device=self.device)
        else:
            background = self.background.expand(len(index), 3)
        target = composite(self.pixels[index], background, dim=-1)
        _set_lr(self.optimizer, step, self.cfg)
        out = self.renderer.render_rays(origins, directions, background)
        loss = torch.nn.functional.mse_loss(out["rgb"], target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def preview(self, step: int) -> dict[str, float]:
        """Renders the first held-out views into previews/step_XXXXXX.png; returns their PSNR/SSIM."""
        if self.held_out is None:
            return {}
        self.renderer.eval()
        views = self.held_out.subset(_evenly_spaced(len(self.held_out), self.cfg.preview_views))
        metrics, renders, targets = evaluate(self.renderer, views, self.background)
        write_preview(self.run.file(f"previews/step_{step:06d}.png"), renders, targets)
        return metrics

    def fit(self) -> FitResult:
        """Runs (or resumes) the optimisation to ``cfg.steps``; returns the final step and held-out metrics."""
        cfg = self.cfg
        reset_peak_memory(self.device)
        step = self._resume()
        start = time.perf_counter()
        loss_value = float("nan")
        history = self.run.read_meta().get("eval_history", [])
        try:
            with self.timer.phase("fit views"), StepReporter(self.run, STAGE, cfg.steps, start_step=step) as reporter:
                while step < cfg.steps:
                    loss = self.train_step(step)
                    step += 1
                    if step % 25 == 0 or step == cfg.steps:
                        loss_value = float(loss)
                        if not math.isfinite(loss_value):
                            raise TrainingDivergedError(
                                f"loss became {loss_value} at step {step}; lower --set lr_encoding/lr_mlp "
                                f"(the last checkpoint is kept in {self.run.checkpoints})"
                            )
                        reporter.update(step, f"loss {loss_value:.4f}")
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        history.append({"step": step, **self.preview(step)})
                        self.run.update_meta(eval_history=history)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                        self.save(step)
            self.save(step)
        except KeyboardInterrupt:
            self.run.set_status("interrupted")
            raise
        except Exception:
            self.run.set_status("failed")
            raise
        train_seconds = time.perf_counter() - start
        with self.timer.phase("evaluate"):
            metrics = self._final_metrics(step)
        peak = peak_memory_gib(self.device)
        self.run.record_timings(self.timer.seconds)
        self.run.update_meta(
            peak_memory_gib=None if peak is None else round(peak, 3),
            train_seconds_this_session=round(train_seconds, 3),
            final_loss=loss_value,
            metrics=metrics,
            train_cameras=camera_record(self.train.cameras, SceneTransform.from_config(to_plain(self.cfg))),
        )
        self.run.write_progress(STAGE, step, cfg.steps, 0.0, "finished")
        return FitResult(step, metrics, self.field, self.renderer)

    def _final_metrics(self, step: int) -> dict[str, float]:
        if self.held_out is None:
            return {}
        self.renderer.eval()
        metrics, renders, targets = evaluate(self.renderer, self.held_out, self.background)
        shown = _evenly_spaced(len(renders), self.cfg.preview_views)
        write_preview(self.run.file(f"previews/step_{step:06d}.png"), renders[shown], targets[shown])
        record = {"step": step, **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}
        write_json(self.run.file("metrics.json"), record)
        info(f"held-out views: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} ({metrics['views']} views)")
        return record
