"""Novel-view evaluation of Zero-1-to-3 (Base) and Cascade-Zero123 against ground-truth renders.

For every object of a held-out multi-view dataset, one view is the input and
every other view is a target. Methods:

* ``base``: the Base generates each target view from the input (DDIM + CFG);
* ``cascade``: the Base self-prompts the nearby views, its own target view is
  the coarse token, and the Refiner samples the target with the multi-token
  conditioning of :func:`guidance.cascade.refiner_tokens`;
* ``copy-input``: the input image itself (a model that ignores the pose);
* ``mean-image``: the mean of all ground-truth target images of the evaluated
  set (the best constant prediction under MSE).

Scores: PSNR and SSIM (torchmetrics, images composited over white, at the
model's size), overall and per |delta azimuth| bin; and a multi-view
consistency score for the generative methods: the PSNR between the views
generated for the same target from two different inputs (the input and its
angularly nearest other view). A ``recon data synth --orbit`` held-out set
gives fixed relative poses (k * 360 / V deg of azimuth at one elevation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from guidance.cascade import (
    Conditions,
    angular_distance_deg,
    generate_views,
    nearby_poses,
    refiner_tokens,
)
from guidance.config import NEARBY_VIEWS
from guidance.sampling import ddim_sample
from recon.data.multiview import MultiViewDataset, composite
from recon.fileio import write_json, write_text
from recon.metrics import psnr_per_image, ssim_per_image

if TYPE_CHECKING:
    from guidance.model import Zero123Model

METHODS = ("base", "cascade", "copy-input", "mean-image")
AZIMUTH_BINS = ((0.0, 45.0), (45.0, 90.0), (90.0, 135.0), (135.0, 180.01))


@dataclass
class EvalConfig:
    """How novel views are generated and scored."""

    steps: int = 25
    """DDIM steps of every sampler."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    input_view: int = 0
    """Index of the view used as the input image of each object."""
    max_objects: int = 0
    """Evaluate at most this many objects (0 = all)."""
    nearby_views: list[list[float]] = field(default_factory=lambda: [list(v) for v in NEARBY_VIEWS])
    """Self-prompted views of the cascade, [delta_polar_deg, delta_azimuth_deg, delta_radius] from the input."""
    consistency: bool = True
    """Also generate every target from a second input and score the agreement (doubles the cost)."""
    background: float = 1.0
    """Grey level the RGBA views are composited over."""
    batch: int = 8
    """Views generated per UNet batch."""
    seed: int = 0
    """Seed of the samplers' initial noise."""


def _pose(poses: tuple[Tensor, Tensor, Tensor], index: int) -> tuple[float, float, float]:
    return tuple(float(p[index]) for p in poses)  # type: ignore[return-value]


@torch.no_grad()
def cascade_views(
    base: Zero123Model, refiner: Zero123Model, image: Tensor, pose: tuple[float, float, float],
    targets: tuple[Tensor, Tensor, Tensor], base_views: Tensor, cfg: EvalConfig, seed: int,
) -> Tensor:
    """Cascade novel views (T, 3, S, S): the Base's nearby views and its own target views
    (``base_views``, the coarse tokens) condition the Refiner's sampling."""
    near = nearby_poses(*pose, cfg.nearby_views)
    nearby_images = generate_views(base, image, pose, near, cfg.steps, cfg.guidance_scale, seed + 1, cfg.batch)
    device = refiner.device
    clip = refiner.clip_embed(torch.cat([image[None], nearby_images, base_views]).to(device))
    n = nearby_images.shape[0]
    inputs = Conditions(clip[:1], *(torch.tensor([v]) for v in pose))
    nearby = Conditions(clip[1 : 1 + n], *near)
    bank = Conditions(clip[1 + n :], *targets)
    embeds, poses = refiner_tokens(targets, inputs, nearby, bank, refiner.pose_encoding)
    cond_latent = refiner.cond_latent(image[None].to(device))
    count = embeds.shape[0]
    # Each batch of cfg.batch targets draws its noise from its own seed (seed + 2 + first index).
    noise = torch.cat([
        torch.randn((min(cfg.batch, count - start), *cond_latent.shape[1:]), generator=torch.Generator().manual_seed(seed + 2 + start))
        for start in range(0, count, cfg.batch)
    ])
    context = refiner.context(embeds, poses)
    return ddim_sample(refiner, context, cond_latent, noise, cfg.steps, cfg.guidance_scale, cfg.batch)


def image_scores(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM of (N, 3, H, W) images, both clamped to [0, 1] first."""
    pred, target = pred.float().clamp(0, 1), target.float().clamp(0, 1)
    return psnr_per_image(pred, target), ssim_per_image(pred, target)


def _second_input(elevation: Tensor, azimuth: Tensor, first: int) -> int:
    distance = angular_distance_deg(elevation, azimuth, elevation[first], azimuth[first])
    distance[first] = float("inf")
    return int(distance.argmin())


def evaluate(
    dataset: MultiViewDataset, base: Zero123Model, refiner: Zero123Model | None, cfg: EvalConfig,
    progress: Any = None,
) -> dict[str, Any]:
    """Scores every method on ``dataset`` (images already at the model's size); returns the JSON report.

    ``refiner=None`` leaves out the cascade. ``progress(done, total)`` is
    called after each object.
    """
    count = len(dataset) if cfg.max_objects <= 0 else min(cfg.max_objects, len(dataset))
    methods = [m for m in METHODS if m != "cascade" or refiner is not None]
    per_view: list[dict[str, Any]] = []
    predictions: dict[str, list[Tensor]] = {m: [] for m in methods if m != "mean-image"}
    truths: list[Tensor] = []
    consistency: dict[str, list[Tensor]] = {m: [] for m in ("base", "cascade") if m in methods}
    for index in range(count):
        item = dataset[index]
        views = composite(item.images, cfg.background)
        first = cfg.input_view % len(views)
        poses = (item.elevation_deg, item.azimuth_deg, item.radius)
        target_ids = [v for v in range(len(views)) if v != first]
        targets = tuple(p[target_ids] for p in poses)
        seed = cfg.seed * 1_000_003 + index * 1009
        generated = {"base": generate_views(base, views[first], _pose(poses, first), targets, cfg.steps, cfg.guidance_scale, seed, cfg.batch)}
        if refiner is not None:
            generated["cascade"] = cascade_views(base, refiner, views[first], _pose(poses, first), targets, generated["base"], cfg, seed)
        generated["copy-input"] = views[first][None].expand(len(target_ids), -1, -1, -1)
        for name, images in generated.items():
            predictions[name].append(images)
        truths.append(views[target_ids])
        for k, view in enumerate(target_ids):
            d_az = float(torch.remainder(item.azimuth_deg[view] - item.azimuth_deg[first] + 180.0, 360.0) - 180.0)
            per_view.append({
                "object": item.object_id, "input_view": first, "target_view": view,
                "delta_elevation_deg": round(float(item.elevation_deg[view] - item.elevation_deg[first]), 3),
                "delta_azimuth_deg": round(d_az, 3),
            })
        if cfg.consistency and len(views) >= 3:
            second = _second_input(item.elevation_deg, item.azimuth_deg, first)
            shared = [k for k, v in enumerate(target_ids) if v != second]
            shared_targets = tuple(t[shared] for t in targets)
            other = generate_views(base, views[second], _pose(poses, second), shared_targets, cfg.steps, cfg.guidance_scale, seed, cfg.batch)
            consistency["base"].append(image_scores(other, generated["base"][shared])[0])
            if refiner is not None:
                other_cascade = cascade_views(base, refiner, views[second], _pose(poses, second), shared_targets, other, cfg, seed)
                consistency["cascade"].append(image_scores(other_cascade, generated["cascade"][shared])[0])
        if progress is not None:
            progress(index + 1, count)
    truth = torch.cat(truths)
    mean_image = truth.mean(dim=0, keepdim=True)
    all_predictions = {name: torch.cat(images) for name, images in predictions.items()}
    all_predictions["mean-image"] = mean_image.expand_as(truth)
    summary: dict[str, dict[str, Any]] = {}
    abs_az = torch.tensor([abs(v["delta_azimuth_deg"]) for v in per_view])
    for name in methods:
        psnr, ssim = image_scores(all_predictions[name], truth)
        for row, (p, s) in zip(per_view, zip(psnr.tolist(), ssim.tolist())):
            row[f"{name}_psnr"], row[f"{name}_ssim"] = round(p, 4), round(s, 5)
        entry: dict[str, Any] = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "by_azimuth": {}}
        for low, high in AZIMUTH_BINS:
            mask = (abs_az >= low) & (abs_az < high)
            if mask.any():
                entry["by_azimuth"][f"{low:.0f}-{min(high, 180):.0f}"] = {"psnr": float(psnr[mask].mean()), "ssim": float(ssim[mask].mean()), "views": int(mask.sum())}
        scores = consistency.get(name)
        entry["consistency_psnr"] = float(torch.cat(scores).mean()) if scores else None
        summary[name] = entry
    return {
        "objects": count, "target_views": len(per_view), "config": asdict(cfg),
        "base_model": base.description, "refiner_model": refiner.description if refiner is not None else None,
        "summary": summary, "views": per_view,
    }


def markdown_report(report: dict[str, Any]) -> str:
    """The report's summary as Markdown tables (overall, then PSNR per |delta azimuth| bin)."""
    lines = [
        f"# Novel-view evaluation ({report['objects']} objects, {report['target_views']} target views)",
        "",
        f"Base: {report['base_model']}  ",
        f"Refiner: {report['refiner_model'] or '(none)'}",
        "",
        "| method | PSNR (dB) | SSIM | consistency PSNR (dB) |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in report["summary"].items():
        consistency = "-" if entry["consistency_psnr"] is None else f"{entry['consistency_psnr']:.2f}"
        lines.append(f"| {name} | {entry['psnr']:.2f} | {entry['ssim']:.4f} | {consistency} |")
    bins = sorted({b for entry in report["summary"].values() for b in entry["by_azimuth"]}, key=lambda s: float(s.split("-")[0]))
    if bins:
        lines += ["", "PSNR (dB) by |delta azimuth| (degrees):", "", "| method | " + " | ".join(bins) + " |", "|---|" + "---:|" * len(bins)]
        for name, entry in report["summary"].items():
            cells = [f"{entry['by_azimuth'][b]['psnr']:.2f}" if b in entry["by_azimuth"] else "-" for b in bins]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "consistency: PSNR between the views generated for the same target from two different input views (higher = more consistent).", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Writes ``eval.json`` and ``eval.md`` into ``folder`` (atomically)."""
    folder = Path(folder)
    write_json(folder / "eval.json", report)
    write_text(folder / "eval.md", markdown_report(report))
    return folder / "eval.json", folder / "eval.md"
