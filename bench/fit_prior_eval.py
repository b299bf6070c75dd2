"""Does the shipped tiny prior help `recon fit`? SDS with it vs the reference view alone, on held-out objects.

    PYTHONPATH=. python3 bench/fit_prior_eval.py --out prior_eval.json [--objects 8] [--preset fast]
        [--max-minutes 8] [--set key.path=value ...]
    PYTHONPATH=. python3 bench/fit_prior_eval.py --merge shard_0.json shard_1.json --out all.json

For each of N held-out objects (:func:`recon.data.primitives.random_object`)
the script renders the input view and K held-out views, fits the input view
twice through ``recon.api.fit_image`` (the code behind ``recon fit``)
and scores both runs:

* ``sds``: the preset as it is, guidance model ``--model`` (default ``tiny``);
* ``no-sds``: the same config with ``stages.<every stage>.weights.sds=0`` (so
  ``config.yaml`` of that run records it); every other loss, the random-view
  regularisers included, is unchanged, and so are the seed, the views drawn
  and the initialisation. The guidance is *not loaded* for it: the run gets a
  stand-in whose ``prepare`` does nothing and whose ``sds`` raises, so the
  run proves that no score distillation happened.

Objects. The prior was trained on ``object_seed(0, i)`` = 0..999 (its
recipe.json ``data.train``) and evaluated on ``object_seed(1, i)`` =
1000003.. (``data.heldout``); this benchmark uses dataset seed 2, i.e.
``random_object(2 * 1000003 + seed_offset + i)`` = 2000006 + offset + i,
disjoint from both (checked against recipe.json at start). Shading is the
recipe's (Lambert, world-fixed light, 2x2 supersampling), so the colours the
field learns agree across views.

Frame. ``recon fit`` recentres its input (recon.preprocess.recentre): the
foreground's bounding box is centred and scaled to ``foreground_ratio`` of
the image (the config's, which defaults to the framing the guidance weights
record: 0.711 for the shipped prior; ``--set preprocess.foreground_ratio=F``
for another), and the fit then assumes the camera at elevation 0, azimuth 0,
radius 3.8, fovy 20 deg looks at that image. Rather than undo that 2-D
crop afterwards, each object is first moved into the frame the fit assumes:
uniformly scaled about the origin and shifted in the image plane (a 3-D
similarity, a few weak-perspective iterations) until its input render
already has a centred bounding box of the right size, so the recentring is
the identity (JSON ``frame.recentre``: the crop that preprocessing applies,
``identity`` true when it is exactly a no-op; else it is a sub-pixel shift
or a <1 % zoom). The ground-truth surface, the held-out views and both fits
then share recon's world frame; exported meshes are in that frame too
(exports/frame.py is the identity and a single-image run has no ``scene``
transform), so Chamfer distance is taken directly, in world units (the
object spans about 2 x 0.57 units; ``frame.scale`` is the similarity's
scale). Held-out views: K cameras at radius 3.8, fovy 20, elevations
alternating 15 / 30 deg, azimuths 22.5 + k 360/K deg (never the input view).
PSNR / SSIM are over white, at ``--eval-size`` pixels.

Budget. ``--max-minutes`` is checked before each object: an object starts
only if the time used so far plus the slowest object yet fits, so the run
ends after a whole object with the table written (the JSON is also rewritten
after every object).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.cameras import Cameras
from recon.data.primitives import PrimitiveObject, random_object, render_object
from recon.data.synth import object_seed
from recon.errors import ReconError
from recon.fileio import read_json, write_json
from recon.imageio import composite
from recon.systems.evaluation import bootstrap_interval

HELDOUT_DATASET_SEED = 2
"""Dataset seed of the evaluated objects (the prior's recipe trained on 0 and evaluated on 1)."""
RECIPE = Path(__file__).resolve().parents[1] / "recon" / "assets" / "tiny-zero123" / "recipe.json"
METHODS = ("sds", "no-sds")
BENCH_OVERRIDES = ("export.formats=[ply]", "turntable=false", "preview_every=0")
"""Applied to both methods before the user's --set: a PLY (no UV atlas / texture bake) is all Chamfer needs."""
SUPERSAMPLE = 2
MAX_FRAME_ITERATIONS = 8


class _NoGuidance:
    """Stand-in guidance of the no-SDS run: nothing to prepare, and any SDS call is an error."""

    def prepare(self, reference: Any, cache_dir: Any = None) -> dict[str, float]:
        """Nothing to condition on."""
        return {}

    def sds(self, *args: Any, **kwargs: Any) -> Any:
        """Never called while every SDS weight is 0."""
        raise ReconError("no-sds run: the trainer asked for an SDS loss although every stages.*.weights.sds is 0")


class _NoGuidanceModels:
    """The ``models`` argument of ``fit_image`` for the reference-only run (loads no weights)."""

    def get(self, cfg: Any, timer: Any) -> _NoGuidance:
        """The stand-in guidance, whatever ``cfg.guidance`` says."""
        return _NoGuidance()


def heldout_seeds(count: int, offset: int) -> list[int]:
    """random_object seeds of the evaluated objects; :class:`ReconError` if any was a training object of the prior."""
    seeds = [object_seed(HELDOUT_DATASET_SEED, offset + i) for i in range(count)]
    if RECIPE.is_file():
        train = read_json(RECIPE).get("data", {}).get("train", {})
        trained = {object_seed(int(train.get("seed", 0)), i) for i in range(int(train.get("objects", 0)))}
        clash = sorted(trained.intersection(seeds))
        if clash:
            raise ReconError(f"{RECIPE}: object seeds {clash[:3]} were training objects of the prior; change --seed-offset")
    return seeds


def reference_camera(size: int, radius: float = 3.8, fovy_deg: float = 20.0) -> Cameras:
    """The input camera of ``recon fit`` (elevation 0, azimuth 0) at ``size`` pixels."""
    return Cameras.from_spherical(torch.zeros(1), torch.zeros(1), torch.tensor([radius]), fovy_deg, size)


def heldout_cameras(count: int, size: int, radius: float = 3.8, fovy_deg: float = 20.0) -> tuple[Cameras, list[tuple[float, float]]]:
    """``count`` held-out cameras (elevations 15 / 30 deg alternating, azimuths 22.5 + k 360/count); also their (elevation, azimuth)."""
    azimuth = 22.5 + torch.arange(count, dtype=torch.float32) * (360.0 / count)
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    elevation = torch.where(torch.arange(count) % 2 == 0, 15.0, 30.0)
    cameras = Cameras.from_spherical(elevation, azimuth, torch.full((count,), radius), fovy_deg, size)
    return cameras, [(float(e), float(a)) for e, a in zip(elevation, azimuth)]


def _bbox(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """(height, width, centre row, centre column) in pixel-edge units of ``alpha > 0.5``'s bounding box."""
    from recon.preprocess import foreground_bbox

    top, left, bottom, right = foreground_bbox(alpha)
    return float(bottom - top), float(right - left), (top + bottom) / 2, (left + right) / 2


def recentre_crop(alpha: np.ndarray, foreground_ratio: float) -> dict[str, Any]:
    """The square crop recon.preprocess.recentre takes from an (S, S) alpha; ``identity`` when it is a no-op."""
    from recon.preprocess import recentre_window

    side, top, left = recentre_window(alpha, foreground_ratio)
    crop = {"side": side, "top": top, "left": left}
    crop["identity"] = crop == {"side": alpha.shape[0], "top": 0, "left": 0}
    return crop


def _target_extent(size: int, foreground_ratio: float) -> int:
    """Whole-pixel extent of the longer bounding-box side that recentre crops to exactly ``size`` (nearest if none does)."""
    goal = foreground_ratio * size
    candidates = [n for n in range(math.floor(goal) - 1, math.ceil(goal) + 2) if round(n / foreground_ratio) == size]
    return min(candidates or [round(goal)], key=lambda n: abs(n - goal))


def place_object(obj: PrimitiveObject, size: int, foreground_ratio: float, radius: float = 3.8, fovy_deg: float = 20.0) -> tuple[PrimitiveObject, dict[str, Any]]:
    """``obj`` scaled about the origin and shifted in the image plane so its input-view render at ``size`` px needs no recentring.

    Weak-perspective updates measured on a render of at least 512 px (4x or more): the
    longer side of the silhouette's box becomes a whole number of pixels of
    the ``size`` image with its edges on pixel boundaries (edge pixels then
    have coverage near 0 or 1, so the alpha > 0.5 box is stable), centred on
    the image centre or half a pixel past it, as recentre's zero crop needs;
    the shorter side is centred half a pixel past the centre (the middle of
    the accepted range). Returns the placed object and ``{"scale", "offset"
    (3,), "bounding_radius", "recentre"}`` (recentre: the crop preprocessing
    will take from the ``size`` px render; ``identity`` when it is a no-op).
    """
    factor = max(4, math.ceil(512 / size))
    tolerance = 0.5 / factor  # final-image pixels; the measurement's resolution
    fine = factor * size
    focal = 0.5 * fine / math.tan(math.radians(fovy_deg) / 2)
    extent = _target_extent(size, foreground_ratio)
    long_centre = size / 2 + (0.5 if (size - extent) % 2 else 0.0)
    scale, offset = 1.0, torch.zeros(3)
    placed = obj
    for _ in range(MAX_FRAME_ITERATIONS):
        alpha = render_object(placed, reference_camera(fine, radius, fovy_deg))["rgba"][0, ..., 3].numpy()
        height, width, row, col = (v / factor for v in _bbox(alpha))
        k = extent / max(height, width)
        row_goal = long_centre if height >= width else size / 2 + 0.5
        col_goal = long_centre if width > height else size / 2 + 0.5
        du = (col_goal - size / 2) - k * (col - size / 2)
        dv = (row_goal - size / 2) - k * (row - size / 2)
        if abs(k - 1.0) * extent < tolerance and abs(du) < tolerance and abs(dv) < tolerance:
            break
        step = torch.tensor([du * factor * radius / focal, -dv * factor * radius / focal, 0.0])
        scale, offset = scale * k, offset * k + step
        placed = PrimitiveObject([p.transformed(scale, offset) for p in obj.primitives], obj.name)
    alpha = render_object(placed, reference_camera(size, radius, fovy_deg), supersample=SUPERSAMPLE)["rgba"][0, ..., 3].numpy()
    return placed, {
        "scale": scale,
        "offset": [float(v) for v in offset],
        "bounding_radius": placed.bounding_radius(),
        "recentre": recentre_crop(alpha, foreground_ratio),
    }


def method_configs(preset: str, overrides: list[str], model: str, steps: int | None = None) -> dict[str, Any]:
    """{"sds": FitConfig, "no-sds": FitConfig}: the second is the first with every stage's SDS weight at 0.

    ``steps`` rescales every stage and schedule to that many steps in all (as ``recon fit --steps``).
    """
    from recon.api import build_config

    overrides = [*BENCH_OVERRIDES, *overrides]
    sds = build_config(preset, overrides, model=model, steps=steps)
    zero = [f"stages.{name}.weights.sds=0.0" for name in sds.stages]
    return {"sds": sds, "no-sds": build_config(preset, [*overrides, *zero], model=model, steps=steps)}


@torch.no_grad()
def render_run(run_dir: Path, cameras: Cameras, device: torch.device) -> torch.Tensor:
    """RGB (N, H, W, 3) over white of the run's newest checkpoint (field + occupancy grid) at ``cameras``."""
    from recon.systems.checkpoint import load_renderer_from_run
    from recon.systems.fit_views import render_views

    renderer, _ = load_renderer_from_run(run_dir, device)
    white = torch.ones(3, device=device)
    return render_views(renderer, cameras.to(device), white).float().clamp(0, 1).cpu()


def mesh_points(path: Path, count: int, seed: int) -> np.ndarray:
    """``count`` points uniform on the mesh at ``path`` (trimesh.sample.sample_surface); world frame."""
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    if len(mesh.faces) == 0:
        raise ReconError(f"{path}: the exported mesh has no faces")
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points)


def score_run(run_dir: Path, mesh: Path, truth: dict[str, Any], device: torch.device, chamfer_points: int) -> dict[str, float]:
    """Held-out PSNR / SSIM, input-view PSNR and Chamfer distance of one finished run against ``truth``."""
    from recon.metrics import chamfer_distance, psnr, ssim

    views = render_run(run_dir, truth["cameras"], device)
    reference = render_run(run_dir, truth["reference_camera"], device)
    points = mesh_points(mesh, chamfer_points, seed=0)
    return {
        "psnr": psnr(views, truth["views"]),
        "ssim": ssim(views, truth["views"]),
        "input_psnr": psnr(reference, truth["reference"]),
        "chamfer": chamfer_distance(points, truth["points"]),
    }


def ground_truth(obj: PrimitiveObject, views: int, eval_size: int, chamfer_points: int) -> dict[str, Any]:
    """Held-out cameras and renders over white (N, H, W, 3), the input view at ``eval_size``, true surface points."""
    cameras, poses = heldout_cameras(views, eval_size)
    reference_camera_ = reference_camera(eval_size)
    return {
        "cameras": cameras,
        "poses": poses,
        "views": composite(render_object(obj, cameras, supersample=SUPERSAMPLE)["rgba"], 1.0, dim=-1),
        "reference_camera": reference_camera_,
        "reference": composite(render_object(obj, reference_camera_, supersample=SUPERSAMPLE)["rgba"], 1.0, dim=-1),
        "points": obj.sample_surface(chamfer_points, seed=1)[0].numpy(),
    }


def evaluate_object(seed: int, configs: dict[str, Any], args: argparse.Namespace, work: Path, device: torch.device, models: Any) -> dict[str, Any]:
    """Renders object ``seed``, fits it with each method, scores both runs; one JSON row."""
    from recon.api import fit_image
    from recon.imageio import save_rgba_png

    pre = configs["sds"].preprocess
    obj, frame = place_object(random_object(seed), pre.size, pre.foreground_ratio)
    image = work / f"object-{seed}.png"
    save_rgba_png(image, render_object(obj, reference_camera(pre.size), supersample=SUPERSAMPLE)["rgba"][0].numpy())
    truth = ground_truth(obj, args.views, args.eval_size, args.chamfer_points)
    row: dict[str, Any] = {"seed": seed, "primitives": len(obj.primitives), "frame": frame, "views": truth["poses"], "results": {}}
    for method in METHODS:
        run_dir = work / method / f"object-{seed}"
        start = time.perf_counter()
        try:
            outcome = fit_image(image, run_dir, configs[method], device, models if method == "sds" else _NoGuidanceModels(), overwrite=True)
            result = score_run(run_dir, Path(outcome["exports"]["ply"]), truth, device, args.chamfer_points)
            result["timings_s"] = outcome["timings_s"]
        except ReconError as exc:
            result = {"error": str(exc)}
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["run_dir"] = str(run_dir)
        row["results"][method] = result
    return row


PAIRED_KEYS = ("chamfer", "psnr", "ssim", "input_psnr")
"""Scores compared per object, sds - no-sds (Chamfer: lower is better; the rest: higher)."""


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: means over objects of chamfer, psnr, ssim, input_psnr (finite values), counts; and paired
    sds - no-sds per score: mean, 95 % bootstrap interval over objects, objects where sds is better."""
    out: dict[str, dict[str, Any]] = {}
    keys = (*PAIRED_KEYS, "seconds")
    for method in METHODS:
        results = [row["results"][method] for row in rows if method in row["results"]]
        stats: dict[str, Any] = {"objects": len(results), "failed": sum("error" in r for r in results)}
        for key in keys:
            values = [r[key] for r in results if isinstance(r.get(key), float) and math.isfinite(r[key])]
            stats[key] = float(np.mean(values)) if values else None
        out[method] = stats
    paired = [row["results"] for row in rows if all("chamfer" in row["results"].get(m, {}) for m in METHODS)]
    diff: dict[str, Any] = {"objects": len(paired)}
    for key in PAIRED_KEYS:
        values = torch.tensor([r["sds"][key] - r["no-sds"][key] for r in paired], dtype=torch.float64)
        diff[key] = float(values.mean()) if paired else None
        diff[f"{key}_ci95"] = list(bootstrap_interval(values)) if paired else None
        lower_is_better = key == "chamfer"
        diff[f"sds_better_{key}"] = int(((values < 0) if lower_is_better else (values > 0)).sum())
    out["sds_minus_no_sds"] = diff
    return out


def _fmt(value: Any, digits: int) -> str:
    return "-" if not isinstance(value, float) or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    """The summary table (per method) and the per-object table."""
    summary = record["summary"]
    lines = [
        f"# Tiny prior vs reference view only ({record['objects_done']} held-out objects, preset {record['preset']}, steps {record['steps']}, model {record['model']})",
        "",
        "| method | objects | Chamfer (world units) | held-out PSNR (dB) | SSIM | input-view PSNR (dB) | s / fit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        s = summary[method]
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append(
            f"| {method} | {s['objects']}{failed} | {_fmt(s['chamfer'], 4)} | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'], 4)} "
            f"| {_fmt(s['input_psnr'], 2)} | {_fmt(s['seconds'], 1)} |"
        )
    d = summary["sds_minus_no_sds"]
    lines += ["", f"sds - no-sds, paired over {d['objects']} objects (95 % bootstrap interval over objects):", "",
              "| score | sds - no-sds | 95 % CI | objects where sds is better |", "|---|---:|---|---:|"]
    for key, digits in zip(PAIRED_KEYS, (4, 2, 4, 2)):
        ci = d[f"{key}_ci95"] or [None, None]
        lines.append(f"| {key} | {_fmt(d[key], digits)} | [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}] | {d[f'sds_better_{key}']} |")
    lines += [
        "",
        "| object seed | method | Chamfer | PSNR (dB) | SSIM | input PSNR (dB) | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in record["objects"]:
        for method in METHODS:
            r = row["results"].get(method, {})
            if "error" in r:
                lines.append(f"| {row['seed']} | {method} | failed: {r['error']} | | | | {_fmt(r.get('seconds'), 1)} |")
                continue
            lines.append(
                f"| {row['seed']} | {method} | {_fmt(r.get('chamfer'), 4)} | {_fmt(r.get('psnr'), 2)} | {_fmt(r.get('ssim'), 4)} "
                f"| {_fmt(r.get('input_psnr'), 2)} | {_fmt(r.get('seconds'), 1)} |"
            )
    if record["stopped_early"]:
        lines += ["", f"Stopped after {record['objects_done']} of {record['objects_requested']} objects: --max-minutes {record['max_minutes']}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=6, help="held-out objects (default 6)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first object index in the held-out set (object seed 2000006 + offset + i)")
    parser.add_argument("--preset", default=None, help="fit preset (default: fast on CUDA, cpu on the CPU)")
    parser.add_argument("--model", default="tiny", help="guidance model of the sds method (default: tiny, the shipped prior)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value for both methods (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="total fit steps, every stage and schedule rescaled (default: the preset's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--views", type=int, default=8, help="held-out views per object (default 8)")
    parser.add_argument("--eval-size", type=int, default=128, help="side of the held-out renders, pixels (>= 11 for SSIM; default 128)")
    parser.add_argument("--chamfer-points", type=int, default=20000, help="points sampled on each surface (default 20000)")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="no new object starts unless it is expected to finish within this (default 8)")
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars from the fits")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, metavar="JSON",
        help="fit nothing: combine these --out records (shards of one benchmark, e.g. one per GPU) into one table and --out",
    )
    args = parser.parse_args(argv)
    if args.objects < 1 or args.views < 1 or args.eval_size < 11 or args.chamfer_points < 1:
        parser.error("--objects, --views and --chamfer-points must be >= 1 and --eval-size >= 11")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the Markdown tables, writes JSON to --out, returns the record."""
    from recon.progress import quiet_while

    args = parse_args(argv)
    if args.merge:
        record = merge(args.merge)
        if args.out is not None:
            write_json(args.out, record)
        print(markdown(record))
        return record
    with quiet_while(args.quiet):
        return run(args)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One record from shard records of the same benchmark (same preset, model, steps, views; distinct objects)."""
    shards = [read_json(path) for path in paths]
    same = ("preset", "model", "overrides", "steps", "views", "eval_size", "chamfer_points")
    for path, shard in zip(paths[1:], shards[1:]):
        differs = [key for key in same if shard.get(key) != shards[0].get(key)]
        if differs:
            raise ReconError(f"{path}: not a shard of {paths[0]}'s benchmark (differs in {', '.join(differs)})")
    rows = [row for shard in shards for row in shard["objects"]]
    seeds = [row["seed"] for row in rows]
    if len(set(seeds)) < len(seeds):
        raise ReconError(f"{', '.join(map(str, paths))}: an object is in more than one shard")
    record = {key: shards[0].get(key) for key in (*same, "device", "gpu", "heldout", "max_minutes")}
    record.update(
        shards=[str(path) for path in paths], seeds=seeds, objects=rows, objects_requested=sum(s["objects_requested"] for s in shards),
        objects_done=len(rows), stopped_early=any(s["stopped_early"] for s in shards), summary=summarise(rows),
        wall_s=max(s["wall_s"] for s in shards),
    )
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark for parsed ``args`` (see :func:`main`)."""
    from recon.api import Models
    from recon.runtime import resolve_device

    start = time.perf_counter()
    device = resolve_device(args.device)
    preset = args.preset or ("fast" if device.type == "cuda" else "cpu")
    configs = method_configs(preset, args.overrides, args.model, args.steps)
    seeds = heldout_seeds(args.objects, args.seed_offset)
    record: dict[str, Any] = {
        "preset": preset,
        "model": args.model,
        "overrides": [*BENCH_OVERRIDES, *args.overrides],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "steps": {name: stage.steps for name, stage in configs["sds"].stages.items()},
        "heldout": f"random_object(object_seed({HELDOUT_DATASET_SEED}, {args.seed_offset} + i)); prior trained on object_seed(0, i)",
        "seeds": seeds,
        "views": args.views,
        "eval_size": args.eval_size,
        "chamfer_points": args.chamfer_points,
        "max_minutes": args.max_minutes,
        "objects_requested": args.objects,
        "objects": [],
    }
    models = Models(device)
    slowest = 0.0
    with tempfile.TemporaryDirectory(prefix="recon-prior-eval-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            used = time.perf_counter() - start
            if record["objects"] and used + slowest > 60.0 * args.max_minutes:
                break
            began = time.perf_counter()
            record["objects"].append(evaluate_object(seed, configs, args, work, device, models))
            slowest = max(slowest, time.perf_counter() - began)
            _finish(record, start, args)
    _finish(record, start, args)
    print(markdown(record))
    return record


def _finish(record: dict[str, Any], start: float, args: argparse.Namespace) -> None:
    """Fills in the summary and timings and rewrites --out (called after every object)."""
    record["objects_done"] = len(record["objects"])
    record["stopped_early"] = record["objects_done"] < record["objects_requested"]
    record["summary"] = summarise(record["objects"])
    record["wall_s"] = round(time.perf_counter() - start, 2)
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
