"""Novel-view evaluation of Zero-1-to-3 (Base) and Cascade-Zero123 against ground-truth renders.

For every object of a held-out multi-view dataset, one view is the input and
every other view is a target. Methods:

* ``base``: the Base generates each target view from the input (DDIM + CFG);
* ``cascade``: the Base self-prompts the nearby views, its own target view is
  the coarse token, and the Refiner samples the target with the multi-token
  conditioning of :func:`guidance.cascade.refiner_tokens`;
* ``copy-input``: the input image itself (a model that ignores the pose);
* ``mean-image``: the mean of all ground-truth target images of the evaluated
  set (the best constant prediction under MSE);
* ``base-mean`` (with ``mean_samples``): the pixel mean of that many Base
  samples of each target (the first is ``base``'s), a Monte-Carlo estimate of
  the Base's posterior mean, the prediction with the least expected squared
  error under the model. Its gap to ``base`` is what the samples' spread
  costs in PSNR; its gap to ``mean-image`` what the model knows beyond the
  average view.

Scores: PSNR and SSIM (torchmetrics, images composited over white, at the
model's size), overall and per |delta azimuth| bin; and a multi-view
consistency score for the generative methods: the PSNR between the views
generated for the same target from two different inputs (the input and its
angularly nearest other view). A ``recon data synth --orbit`` held-out set
gives fixed relative poses (k * 360 / V deg of azimuth at one elevation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from recon.data.multiview import MultiViewDataset, ObjectViews
from recon.fileio import write_json, write_text
from recon.guidance.cascade import (
    Conditions,
    angular_distance_deg,
    generate_views_many,
    in_chunks,
    nearby_poses,
    refiner_tokens,
)
from recon.guidance.config import NEARBY_VIEWS
from recon.guidance.sampling import ddim_sample
from recon.imageio import composite
from recon.metrics import psnr_per_image, ssim_per_image

if TYPE_CHECKING:
    from recon.guidance.model import Zero123Model

METHODS = ("base", "cascade", "copy-input", "mean-image")
MEAN_METHOD = "base-mean"
"""The extra method scored when ``EvalConfig.mean_samples`` > 0."""
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
    batch: int = 64
    """Views per UNet batch (and images per CLIP / VAE encoder batch)."""
    group: int = 16
    """Objects whose views are sampled together (fuller UNet batches: faster on a GPU; results do not change)."""
    seed: int = 0
    """Seed of the samplers' initial noise."""
    mean_samples: int = 0
    """Also score ``base-mean``: the mean of this many Base samples per target (each beyond the first costs one
    more Base evaluation without consistency); 0 = not scored."""


def _pose(poses: tuple[Tensor, Tensor, Tensor], index: int) -> tuple[float, float, float]:
    return tuple(float(p[index]) for p in poses)  # type: ignore[return-value]


@torch.no_grad()
def cascade_views_many(
    base: Zero123Model, refiner: Zero123Model, images: Tensor, poses: Sequence[tuple[float, float, float]],
    targets: Sequence[tuple[Tensor, Tensor, Tensor]], base_views: Sequence[Tensor], cfg: EvalConfig,
    seeds: Sequence[int],
) -> list[Tensor]:
    """Cascade novel views of G inputs at once: one (N_g, 3, S, S) tensor in [0, 1] per input.

    ``images`` (G, 3, S, S) were taken from ``poses[g]`` (elevation deg,
    azimuth deg, radius); ``targets[g]`` are input g's N_g absolute target
    cameras and ``base_views[g]`` (N_g, 3, S, S) the Base's views there (the
    coarse tokens). The Base self-prompts every input's nearby views (seed
    ``seeds[g] + 1``), then the Refiner samples all targets in shared UNet
    batches of ``cfg.batch``, input g's initial noise drawn from a CPU
    generator seeded with ``seeds[g] + 2``.
    """
    near = [nearby_poses(*pose, cfg.nearby_views) for pose in poses]
    nearby_views = generate_views_many(
        base, images, poses, near, cfg.steps, cfg.guidance_scale, [seed + 1 for seed in seeds], cfg.batch
    )
    device = refiner.device
    conditions = [torch.cat([image[None], n, b]) for image, n, b in zip(images, nearby_views, base_views, strict=True)]
    clips = in_chunks(refiner.clip_embed, torch.cat(conditions).to(device), cfg.batch).split([len(c) for c in conditions])
    latents = in_chunks(refiner.cond_latent, images.to(device), cfg.batch)
    embeds, token_poses, noise = [], [], []
    n = len(cfg.nearby_views)
    for clip, pose, nearby_pose, target, seed in zip(clips, poses, near, targets, seeds, strict=True):
        inputs = Conditions(clip[:1], *(torch.tensor([v]) for v in pose))
        nearby = Conditions(clip[1 : 1 + n], *nearby_pose)
        bank = Conditions(clip[1 + n :], *target)
        # Every target gets the same K = 2 + n tokens, so all inputs' contexts concatenate.
        e, p = refiner_tokens(target, inputs, nearby, bank, refiner.pose_encoding)
        embeds.append(e)
        token_poses.append(p)
        noise.append(torch.randn((e.shape[0], *latents.shape[1:]), generator=torch.Generator().manual_seed(seed + 2)))
    counts = [e.shape[0] for e in embeds]
    owner = torch.repeat_interleave(torch.tensor(counts)).to(device)  # the input of every target
    context = refiner.context(torch.cat(embeds), torch.cat(token_poses))
    views = ddim_sample(refiner, context, latents[owner], torch.cat(noise), cfg.steps, cfg.guidance_scale, cfg.batch)
    return list(views.split(counts))


def cascade_views(
    base: Zero123Model, refiner: Zero123Model, image: Tensor, pose: tuple[float, float, float],
    targets: tuple[Tensor, Tensor, Tensor], base_views: Tensor, cfg: EvalConfig, seed: int,
) -> Tensor:
    """Cascade novel views (T, 3, S, S) of ``image`` (3, S, S) at the ``targets`` cameras, with the
    Base's views there (``base_views``) as coarse tokens: :func:`cascade_views_many` for one input."""
    return cascade_views_many(base, refiner, image[None], [pose], [targets], [base_views], cfg, [seed])[0]


def base_means(
    base: Zero123Model, images: Tensor, poses: Sequence[tuple[float, float, float]], targets: Sequence[tuple[Tensor, Tensor, Tensor]],
    first_samples: Sequence[Tensor], cfg: EvalConfig, seeds: Sequence[int], count: int,
) -> list[Tensor]:
    """The pixel mean of ``cfg.mean_samples`` Base samples of every target of the first ``count`` inputs: one
    (N_g, 3, S, S) tensor per input. ``first_samples`` are the Base's views already made (seed ``seeds[g]``);
    sample j > 0 is drawn with seed ``seeds[g] + 2 + j`` (``+ 1`` and ``+ 2`` are the cascade's)."""
    draws = [list(first_samples[:count])]
    for j in range(1, cfg.mean_samples):
        draws.append(generate_views_many(
            base, images[:count], poses[:count], targets[:count], cfg.steps, cfg.guidance_scale, [s + 2 + j for s in seeds[:count]], cfg.batch
        ))  # fmt: skip
    return [torch.stack([d[g] for d in draws]).mean(dim=0) for g in range(count)]


def image_scores(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM of (N, 3, H, W) images, both clamped to [0, 1] first."""
    pred, target = pred.float().clamp(0, 1), target.float().clamp(0, 1)
    return psnr_per_image(pred, target), ssim_per_image(pred, target)


def _second_input(elevation: Tensor, azimuth: Tensor, first: int) -> int:
    distance = angular_distance_deg(elevation, azimuth, elevation[first], azimuth[first])
    distance[first] = float("inf")
    return int(distance.argmin())


def _roles(item: ObjectViews, cfg: EvalConfig) -> tuple[int, list[int], int | None]:
    """An object's input view, its target views and the consistency's second input (None if not scored)."""
    count = item.images.shape[0]
    first = cfg.input_view % count
    targets = [v for v in range(count) if v != first]
    second = _second_input(item.elevation_deg, item.azimuth_deg, first) if cfg.consistency and count >= 3 else None
    return first, targets, second


def evaluate(
    dataset: MultiViewDataset, base: Zero123Model, refiner: Zero123Model | None, cfg: EvalConfig,
    progress: Any = None,
) -> dict[str, Any]:
    """Scores every method on ``dataset`` (images already at the model's size); returns the JSON report.

    ``refiner=None`` leaves out the cascade. The views of ``cfg.group``
    objects are sampled together; every object's noise has its own seed, so
    the report does not depend on ``cfg.group`` or ``cfg.batch`` (up to float
    rounding). ``progress(done, total)`` is called after each group of objects.
    """
    count = len(dataset) if cfg.max_objects <= 0 else min(cfg.max_objects, len(dataset))
    methods = [m for m in METHODS if m != "cascade" or refiner is not None] + ([MEAN_METHOD] if cfg.mean_samples > 0 else [])
    per_view: list[dict[str, Any]] = []
    predictions: dict[str, list[Tensor]] = {m: [] for m in methods if m != "mean-image"}
    truths: list[Tensor] = []
    consistency: dict[str, list[Tensor]] = {m: [] for m in ("base", "cascade") if m in methods}
    consistency_objects: list[str] = []
    for start in range(0, count, cfg.group):
        indices = range(start, min(start + cfg.group, count))
        items = [dataset[index] for index in indices]
        views = [composite(item.images, cfg.background) for item in items]
        roles = [_roles(item, cfg) for item in items]
        # Sampling jobs (object, input view, target views): every object's input with all its
        # targets, then each second input with the targets it shares with the first.
        jobs = [(k, first, targets) for k, (first, targets, _) in enumerate(roles)]
        second_job: dict[int, int] = {}  # object -> its second input's job
        for k, (_, targets, second) in enumerate(roles):
            if second is not None:
                second_job[k] = len(jobs)
                jobs.append((k, second, [v for v in targets if v != second]))
        poses = [(item.elevation_deg, item.azimuth_deg, item.radius) for item in items]
        images = torch.stack([views[k][v] for k, v, _ in jobs])
        job_poses = [_pose(poses[k], v) for k, v, _ in jobs]
        job_targets = [tuple(p[ids] for p in poses[k]) for k, _, ids in jobs]
        seeds = [cfg.seed * 1_000_003 + indices[k] * 1009 for k, _, _ in jobs]
        generated = {"base": generate_views_many(base, images, job_poses, job_targets, cfg.steps, cfg.guidance_scale, seeds, cfg.batch)}
        if refiner is not None:
            generated["cascade"] = cascade_views_many(base, refiner, images, job_poses, job_targets, generated["base"], cfg, seeds)
        if cfg.mean_samples > 0:
            predictions[MEAN_METHOD] += base_means(base, images, job_poses, job_targets, generated["base"], cfg, seeds, len(items))
        for k, (item, (first, target_ids, second)) in enumerate(zip(items, roles, strict=True)):
            for name, outputs in generated.items():
                predictions[name].append(outputs[k])
            predictions["copy-input"].append(views[k][first][None].expand(len(target_ids), -1, -1, -1))
            truths.append(views[k][target_ids])
            for view in target_ids:
                d_az = float(torch.remainder(item.azimuth_deg[view] - item.azimuth_deg[first] + 180.0, 360.0) - 180.0)
                per_view.append({
                    "object": item.object_id, "input_view": first, "target_view": view,
                    "delta_elevation_deg": round(float(item.elevation_deg[view] - item.elevation_deg[first]), 3),
                    "delta_azimuth_deg": round(d_az, 3),
                })
            if second is not None:
                shared = [t for t, v in enumerate(target_ids) if v != second]
                consistency_objects.append(item.object_id)
                for name, outputs in generated.items():
                    consistency[name].append(image_scores(outputs[second_job[k]], outputs[k][shared])[0])
        if progress is not None:
            progress(indices.stop, count)
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
    by_object = {name: {o: round(float(v.mean()), 4) for o, v in zip(consistency_objects, scores, strict=True)} for name, scores in consistency.items()}
    return {
        "objects": count, "target_views": len(per_view), "config": asdict(cfg), "consistency_by_object": by_object,
        "base_model": base.description, "refiner_model": refiner.description if refiner is not None else None,
        "summary": summary, "views": per_view,
    }


# ------------------------------------------------------------------ paired statistics
PAIRED_METRICS = ("psnr", "ssim", "consistency_psnr")


def per_object(report: dict[str, Any], method: str, metric: str) -> dict[str, float]:
    """{object id: score} of ``method``: the mean of ``metric`` (psnr, ssim) over the object's target views, or its
    consistency PSNR (``consistency_psnr``, generative methods only)."""
    if metric == "consistency_psnr":
        return dict(report.get("consistency_by_object", {}).get(method, {}))
    values: dict[str, list[float]] = {}
    for row in report["views"]:
        values.setdefault(row["object"], []).append(row[f"{method}_{metric}"])
    return {obj: sum(v) / len(v) for obj, v in values.items()}


def bootstrap_interval(values: Tensor, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (N,), seeded."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values.double()[index].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return low, high


def paired_comparison(
    first: dict[str, Any], first_method: str, second: dict[str, Any], second_method: str,
    metrics: Sequence[str] = PAIRED_METRICS, resamples: int = 10_000, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per-object paired comparison of ``second_method`` (in report ``second``) against ``first_method`` (in
    ``first``) on the objects both scored: for every metric the two means, the mean difference (second - first)
    with a 95 % bootstrap interval over objects, and the fraction of objects where the second is higher."""
    result: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        a, b = per_object(first, first_method, metric), per_object(second, second_method, metric)
        common = sorted(set(a) & set(b))
        if not common:
            continue
        va = torch.tensor([a[o] for o in common], dtype=torch.float64)
        vb = torch.tensor([b[o] for o in common], dtype=torch.float64)
        diff = vb - va
        low, high = bootstrap_interval(diff, resamples, seed=seed)
        result[metric] = {
            "objects": len(common), "first": float(va.mean()), "second": float(vb.mean()), "mean_diff": float(diff.mean()),
            "ci95": [low, high], "win_fraction": float((diff > 0).double().mean()),
        }
    return result


def paired_markdown(rows: Sequence[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """A Markdown table of labelled :func:`paired_comparison` results (one row per label and metric)."""
    lines = [
        "| comparison (B vs A) | metric | objects | A | B | B - A | 95 % CI | B wins |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    digits = {"ssim": 4}
    for label, comparison in rows:
        for metric, r in comparison.items():
            d = digits.get(metric, 2)
            lines.append(
                f"| {label} | {metric} | {r['objects']} | {r['first']:.{d}f} | {r['second']:.{d}f} | {r['mean_diff']:+.{d + 1}f} "
                f"| [{r['ci95'][0]:+.{d + 1}f}, {r['ci95'][1]:+.{d + 1}f}] | {100 * r['win_fraction']:.0f} % |"
            )
    return "\n".join(lines) + "\n"


def grouped_summary(report: dict[str, Any], groups: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each method's mean PSNR and SSIM over the target views of each group of objects (as the summary averages
    all views): ``{group: {"objects": n, "views": m, method: {"psnr", "ssim"}}}``. ``groups`` maps object ids to
    group names (e.g. a synthetic object's shape family); objects it does not name are left out."""
    methods = [key.removesuffix("_psnr") for key in (report["views"] or [{}])[0] if key.endswith("_psnr")]
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in report["views"]:
        if row["object"] in groups:
            rows.setdefault(groups[row["object"]], []).append(row)
    grouped: dict[str, dict[str, Any]] = {}
    for name, members in sorted(rows.items()):
        entry: dict[str, Any] = {"objects": len({r["object"] for r in members}), "views": len(members)}
        for method in methods:
            entry[method] = {metric: sum(r[f"{method}_{metric}"] for r in members) / len(members) for metric in ("psnr", "ssim")}
        grouped[name] = entry
    return grouped


def grouped_markdown(grouped: dict[str, dict[str, Any]], label: str = "group") -> str:
    """A Markdown table of :func:`grouped_summary`: one row per group, each method's PSNR (dB) / SSIM."""
    methods = [k for k in next(iter(grouped.values()), {}) if k not in ("objects", "views")]
    lines = [
        f"| {label} | objects | " + " | ".join(f"{m} PSNR / SSIM" for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for name, entry in grouped.items():
        cells = [f"{entry[m]['psnr']:.2f} / {entry[m]['ssim']:.4f}" for m in methods]
        lines.append(f"| {name} | {entry['objects']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
