"""Times `recon fit` end to end (load + coarse + fine + export + turntable) with full-size Zero123 weights.

    python bench/fit.py IMAGE [--preset default] [--device auto] [--steps N] [--out bench-fit.json] [--set key=value ...]

By default the full-size random models (random weights cost exactly what
real Zero123 weights cost: same shapes, same kernels) are first saved once
as a diffusers folder of fp16 safetensors (``--weights-dir``), and the run
loads them from there as a user's run loads its weights;
``--no-weights-from-disk`` initialises them in memory instead. The run goes
into a scratch output folder; then the run's meta.json gives wall seconds
per phase and peak CUDA memory, and CUDA events inside every training step
give ms per step and its parts per stage: grid (occupancy refresh), render
(sampling + field + compositing), SDS (VAE encode + UNet), backward (the
losses, backward pass and the step's one sync) and optimiser; the first
steps of each stage are also listed one by one (their one-off costs: graph
captures, first kernel loads). The sizes of the packed sample sets (read from tensor shapes, no sync) give the
mean points per step whose density the sampler evaluates (``sampled``) and
that the renderer shades with gradients (``shaded``; a gradient-checkpointed
chunk, as in the low-vram preset, is shaded twice and counted twice). Prints Markdown
tables; writes the same numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from recon.fileio import read_json, write_json

PARTS = ("grid", "render", "sds", "backward", "optimiser")
COUNTS = ("rays", "sampled", "shaded")
WARMUP_STEPS = 5  # per stage, left out of the ms/step means (kernel compiles, CUDA-graph captures)


def save_weights(folder: Path) -> Path:
    """Saves the full-size random Zero123 (fp16) as a diffusers folder once; later calls reuse it."""
    import torch

    from recon.guidance.checkpoints import random_model, save_diffusers

    if not (folder / "model_index.json").is_file():
        # initialised on the GPU when there is one (seconds instead of ~20 s of CPU init); random either way
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = random_model("full")
        save_diffusers(model.to(dtype=torch.float16), folder, overwrite=True)
    return folder


class StepTimer:
    """CUDA events around the parts of every training step, read once at the end (no extra syncs).

    Installs itself by wrapping ``Trainer.train_step`` and, per trainer, the
    renderer's occupancy update, ``render_views``, the guidance's ``sds`` and
    the optimiser's ``step``; each part is the stream time between two events.
    """

    def __init__(self) -> None:
        self.steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.training_peak = 0  # bytes: peak allocated GPU memory up to the end of the last training step

    def install(self) -> None:
        """Wraps the trainer class (for this process)."""
        import torch

        from recon.systems.fit import Trainer

        timer, original = self, Trainer.train_step

        def event() -> torch.cuda.Event:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def train_step(trainer: Trainer, stage_name: str, stage: Any, local_step: int) -> float:
            if not getattr(trainer, "_bench_wrapped", False):
                trainer._bench_wrapped = True
                for obj, name in ((trainer.renderer, "update_occupancy"), (trainer, "render_views"), (trainer.guidance, "sds")):
                    inner = getattr(obj, name, None)
                    if inner is None:  # an older Trainer (before/after comparisons): that part merges into the next
                        continue

                    def wrapped(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
                        out = _inner(*a, **k)
                        trainer._bench_events[_name] = event()
                        return out

                    setattr(obj, name, wrapped)
                step = trainer.optimizer.step

                def optimiser_step(*a: Any, **k: Any) -> Any:
                    trainer._bench_events["before_optimiser"] = event()
                    return step(*a, **k)

                trainer.optimizer.step = optimiser_step
                timer._count_points(trainer)
            trainer._bench_events = {"start": event()}
            trainer._bench_counts = dict.fromkeys(COUNTS, 0)
            loss = original(trainer, stage_name, stage, local_step)
            trainer._bench_events["end"] = event()
            timer.steps[stage_name].append({**trainer._bench_events, **trainer._bench_counts})
            timer.training_peak = torch.cuda.max_memory_allocated()  # a host-side allocator statistic: no sync
            return loss

        Trainer.train_step = train_step

    @staticmethod
    def _count_points(trainer: Any) -> None:
        """Counts rays, sampler density points and shaded samples of each step (tensor shapes: no sync)."""
        renderer, counts = trainer.renderer, lambda: trainer._bench_counts
        render_rays, shade, density = renderer.render_rays, renderer._shade_packed, trainer.field.density

        def counted_render_rays(origins: Any, *a: Any, **k: Any) -> Any:
            counts()["rays"] += origins.shape[0]
            counts()["in_render"] = True
            try:
                return render_rays(origins, *a, **k)
            finally:
                counts()["in_render"] = False

        def counted_shade(origins: Any, directions: Any, background: Any, ray_indices: Any, *a: Any, **k: Any) -> Any:
            counts()["shaded"] += ray_indices.shape[0]
            return shade(origins, directions, background, ray_indices, *a, **k)

        def counted_density(points: Any) -> Any:
            if counts().get("in_render"):
                counts()["sampled"] += points.shape[0]
            return density(points)

        renderer.render_rays, renderer._shade_packed, trainer.field.density = counted_render_rays, counted_shade, counted_density

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: mean ms per step and per part over the steps after the warm-up."""
        import torch

        torch.cuda.synchronize()
        result = {}
        for stage, steps in self.steps.items():
            totals = dict.fromkeys(("step", *PARTS), 0.0)
            counted = steps[WARMUP_STEPS:] or steps
            for e in counted:
                grid = e.get("update_occupancy", e["start"])
                render = e.get("render_views", grid)
                sds = e.get("sds", render)
                before = e.get("before_optimiser", e["end"])
                marks = [("grid", e["start"], grid), ("render", grid, render), ("sds", render, sds), ("backward", sds, before), ("optimiser", before, e["end"])]
                for name, a, b in marks:
                    totals[name] += a.elapsed_time(b)
                totals["step"] += e["start"].elapsed_time(e["end"])
                for name in COUNTS:
                    totals[name] = totals.get(name, 0.0) + e[name]
            first = [round(e["start"].elapsed_time(e["end"]), 1) for e in steps[:WARMUP_STEPS]]
            every = sum(e["start"].elapsed_time(e["end"]) for e in steps) / 1000
            result[stage] = {name: round(value / len(counted), 2) for name, value in totals.items()} | {
                "steps_timed": len(counted),
                "warmup_steps_ms": first,  # one-off costs: graph captures, first kernel loads, cuDNN plans
                "all_steps_s": round(every, 3),
            }
        return result


def run(
    image: Path, preset: str, device: str, overrides: list[str], model: str, output: Path, timer: StepTimer | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Fits ``image`` once and returns the benchmark record (phases, rates, parts, memory, config summary)."""
    import torch

    from recon.api import build_config, fit

    cfg = build_config(preset, overrides, model=model, steps=steps)
    start = time.perf_counter()
    results = fit(image, output, preset, overrides, model=model, device=device, overwrite=True, batch=False, steps=steps)
    wall = time.perf_counter() - start
    parts = timer.summary() if timer is not None and timer.steps else {}
    meta = read_json(results[0].run_dir / "meta.json")
    timings = meta.get("timings_s", {})
    stages = {
        name: {
            "steps": stage.steps,
            "resolution": stage.resolution,
            "batch_size": stage.batch_size,
            "seconds": timings.get(name),
            "it_per_s": None if not timings.get(name) else round(stage.steps / timings[name], 3),
            "ms_per_step": None if not timings.get(name) else round(1000 * timings[name] / stage.steps, 1),
            "parts_ms": parts.get(name),
        }
        for name, stage in cfg.stages.items()
        if stage.steps > 0
    }
    return {
        "image": str(image),
        "preset": preset,
        "model": model,
        "overrides": overrides,
        "steps": cfg.total_steps,
        "device": meta.get("device"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and meta.get("device", "").startswith("cuda") else None,
        "host": platform.node(),
        "versions": meta.get("versions", {}),
        "wall_seconds": round(wall, 3),
        "phases_s": timings,
        "stages": stages,
        "peak_gpu_memory_gib": meta.get("peak_gpu_memory_gib"),
        "peak_gpu_memory_until_end_of_training_gib": round(timer.training_peak / 2**30, 3) if timer is not None and timer.steps else None,
        "exports": results[0].exports,
    }


def markdown(record: dict[str, Any]) -> str:
    """The record as a Markdown report: one table of phases, one of stages."""
    peak = record["peak_gpu_memory_gib"]
    memory = "n/a" if peak is None else f"{peak:.2f} GiB"
    lines = [
        f"## recon fit benchmark: preset `{record['preset']}`, model `{record['model']}`",
        "",
        f"device: {record['device']} {record['gpu'] or ''}  |  wall time: {record['wall_seconds']:.1f} s  |  peak GPU memory: {memory} "
        + f"(until the end of training: {record.get('peak_gpu_memory_until_end_of_training_gib')} GiB)",
        "",
        "| phase | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in record["phases_s"].items()]
    lines += ["", "| stage | steps | render px | views/step | seconds | ms/step (wall) | " + " | ".join(f"{p} ms" for p in ("step", *PARTS)) + " |"]
    lines.append("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(PARTS) + 1))
    for name, s in record["stages"].items():
        seconds = "n/a" if s["seconds"] is None else f"{s['seconds']:.1f}"
        per_step = "n/a" if s["ms_per_step"] is None else f"{s['ms_per_step']:.1f}"
        parts = s.get("parts_ms") or {}
        cells = " | ".join("n/a" if parts.get(p) is None else f"{parts[p]:.1f}" for p in ("step", *PARTS))
        lines.append(f"| {name} | {s['steps']} | {s['resolution']} | {s['batch_size']} | {seconds} | {per_step} | {cells} |")
    lines += ["", "| stage | rays / step | sampler density points / step | shaded samples / step |", "|---|---:|---:|---:|"]
    for name, s in record["stages"].items():
        parts = s.get("parts_ms") or {}
        cells = " | ".join("n/a" if parts.get(c) is None else f"{parts[c] / 1e6:.2f} M" for c in COUNTS)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| stage | first steps, ms each | all steps, s | stage time outside the steps, s |", "|---|---|---:|---:|"]
    for name, s in record["stages"].items():
        parts = s.get("parts_ms") or {}
        if parts.get("all_steps_s") is not None and s["seconds"] is not None:
            first = ", ".join(f"{v:.0f}" for v in parts["warmup_steps_ms"])
            lines.append(f"| {name} | {first} | {parts['all_steps_s']:.1f} | {s['seconds'] - parts['all_steps_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Parses the command line, runs the benchmark, prints Markdown and writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="input image (RGBA PNG is best)")
    parser.add_argument("--preset", default="default", help="preset name or YAML path (default: default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model", default="random-full", help="guidance weights (default: random-full, saved to disk first)")
    parser.add_argument(
        "--weights-from-disk", action=argparse.BooleanOptionalAction, default=True,
        help="with --model random-full: save the models once as fp16 safetensors and load them from there, as a user's run does",
    )
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "recon-bench-zero123-full-fp16")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (stages and schedules scale, as `recon fit --steps`); default: the preset's")
    parser.add_argument("--output", type=Path, default=None, help="run folder parent (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    import torch

    model = args.model
    if model == "random-full" and args.weights_from_disk:
        model = str(save_weights(args.weights_dir))
    timer = StepTimer() if torch.cuda.is_available() and args.device != "cpu" else None
    if timer is not None:
        timer.install()
    with tempfile.TemporaryDirectory(prefix="recon-bench-fit-") as scratch:
        record = run(args.image, args.preset, args.device, args.overrides, model, args.output or Path(scratch), timer, args.steps)
    record["weights_from_disk"] = model != args.model
    print(markdown(record))
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
