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
mean points per step that the PyTorch occupancy grid's sampler tests for visibility (``candidates``: the lattice
points in occupied cells), whose density it evaluates (``sampled``: fewer where rays become opaque within
their first candidates, the rest then left unevaluated) and
that the renderer shades with gradients (``shaded``; a gradient-checkpointed
chunk, as in the low-vram preset, is shaded twice and counted twice). Prints Markdown
tables; writes the same numbers as JSON to ``--out``.

The wall time is the ``recon.api.fit`` call, after this process has imported
``torch`` and ``recon``; ``--command`` instead times the whole ``recon fit``
command in a new process, as a user sees it (interpreter start-up, every
import, the fit, exit), with per-phase seconds but no per-step parts. Imports
are timed as they are in the environment: the record's ``bytecode`` says
whether the main libraries' compiled bytecode was there. A pip install
compiles it; an image that has none and sets ``PYTHONDONTWRITEBYTECODE``
compiles every module from source at every import (a warning says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from recon.fileio import read_json, write_json

PARTS = ("grid", "render", "sds", "backward", "optimiser")
COUNTS = ("rays", "candidates", "sampled", "shaded")
CLI = "import sys; from recon.cli.main import run; sys.exit(run())"  # what the console script runs
BYTECODE_PACKAGES = ("torch", "diffusers", "transformers", "recon")
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
            sizes = stage.sizes(local_step) if hasattr(stage, "sizes") else None  # older Trainers: no segments
            segment = None if sizes is None else f"{sizes[0]} px x {sizes[1]}, reference {sizes[2]} px"
            timer.steps[stage_name].append({**trainer._bench_events, **trainer._bench_counts, "segment": segment})
            timer.training_peak = torch.cuda.max_memory_allocated()  # a host-side allocator statistic: no sync
            return loss

        Trainer.train_step = train_step

    @staticmethod
    def _count_points(trainer: Any) -> None:
        """Counts rays, sampler candidates and density points and shaded samples of each step (tensor shapes: no sync)."""
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
        if hasattr(renderer.occupancy, "_visible"):  # the PyTorch grid (nerfacc's has no such test)
            visible = renderer.occupancy._visible

            def counted_visible(origins: Any, directions: Any, ray_ids: Any, *a: Any, **k: Any) -> Any:
                counts()["candidates"] += ray_ids.shape[0]
                return visible(origins, directions, ray_ids, *a, **k)

            renderer.occupancy._visible = counted_visible

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: mean ms per step and per part over the steps after the warm-up, and (``segments_ms``) the
        mean ms per step of each render-size segment of the stage's schedule (each segment's first steps left out)."""
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
            segments: dict[str, list[float]] = defaultdict(list)
            seen: Counter = Counter()
            for e in steps:  # each segment's first steps left out too: a new render size captures new graphs
                seen[e["segment"]] += 1
                if e["segment"] is not None and seen[e["segment"]] > WARMUP_STEPS:
                    segments[e["segment"]].append(e["start"].elapsed_time(e["end"]))
            first = [round(e["start"].elapsed_time(e["end"]), 1) for e in steps[:WARMUP_STEPS]]
            every = sum(e["start"].elapsed_time(e["end"]) for e in steps) / 1000
            result[stage] = {name: round(value / len(counted), 2) for name, value in totals.items()} | {
                "steps_timed": len(counted),
                "warmup_steps_ms": first,  # one-off costs: graph captures, first kernel loads, cuDNN plans
                "all_steps_s": round(every, 3),
                "segments_ms": {name: round(sum(ms) / len(ms), 2) for name, ms in segments.items()},
            }
        return result


def run(
    image: Path, preset: str, device: str, overrides: list[str], model: str, output: Path, timer: StepTimer | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Fits ``image`` once in this process and returns the benchmark record (phases, rates, parts, memory, config
    summary); ``wall_seconds`` starts after ``torch`` and ``recon.api`` are imported."""
    from recon.api import fit

    start = time.perf_counter()
    results = fit(image, output, preset, overrides, model=model, device=device, overwrite=True, batch=False, steps=steps)
    wall = time.perf_counter() - start
    parts = timer.summary() if timer is not None and timer.steps else {}
    return record_of(image, preset, overrides, model, steps, results[0].run_dir, wall, parts, timer)


def run_command(image: Path, preset: str, device: str, overrides: list[str], model: str, output: Path, steps: int | None = None) -> dict[str, Any]:
    """Runs ``recon fit`` as a user does, in a new Python process (this interpreter, with ``-S`` if this one has it),
    and returns the benchmark record; ``wall_seconds`` is the whole process, from interpreter start (imports
    included) to exit. No per-step parts: the steps run in the other process."""
    argv = [sys.executable, *(["-S"] if sys.flags.no_site else []), "-c", CLI, "fit", str(image), "--preset", preset]
    argv += ["--device", device, "--model", model, "-o", str(output), "--overwrite", "--quiet"]
    argv += [f"--set={override}" for override in overrides] + ([] if steps is None else ["--steps", str(steps)])
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"recon fit exited with code {done.returncode}: {last}")
    return record_of(image, preset, overrides, model, steps, output / image.stem, wall, {}, None)


def bytecode_state() -> dict[str, Any]:
    """Whether this environment's imports read compiled bytecode: ``cached`` per main library (its package's
    ``__init__`` has a .pyc where this interpreter looks for one) and ``dont_write`` (``PYTHONDONTWRITEBYTECODE``).

    A pip install compiles every module's bytecode; an environment that has none and may not write it compiles
    every module from source at every import, which multiplies the import phases (docs/SPEED.md)."""
    cached = {}
    for name in BYTECODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        cached[name] = bool(origin) and Path(importlib.util.cache_from_source(origin)).is_file()
    return {"cached": cached, "dont_write": sys.dont_write_bytecode}


def record_of(
    image: Path, preset: str, overrides: list[str], model: str, steps: int | None, run_dir: Path, wall: float,
    parts: dict[str, Any], timer: StepTimer | None,
) -> dict[str, Any]:
    """The benchmark record of the run in ``run_dir`` (its meta.json), timed at ``wall`` seconds."""
    import torch

    from recon.api import build_config

    cfg = build_config(preset, overrides, model=model, steps=steps)
    meta = read_json(run_dir / "meta.json")
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
        "outside_phases_s": round(wall - sum(timings.values()), 3),
        "phases_s": timings,
        "stages": stages,
        "peak_gpu_memory_gib": meta.get("peak_gpu_memory_gib"),
        "peak_gpu_memory_until_end_of_training_gib": round(timer.training_peak / 2**30, 3) if timer is not None and timer.steps else None,
        "exports": meta.get("exports", {}).get("files", {}),
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
    lines.append(f"| outside the phases | {record['outside_phases_s']:.1f} |")
    lines += ["", "| stage | steps | render px | views/step | seconds | ms/step (wall) | " + " | ".join(f"{p} ms" for p in ("step", *PARTS)) + " |"]
    lines.append("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(PARTS) + 1))
    for name, s in record["stages"].items():
        seconds = "n/a" if s["seconds"] is None else f"{s['seconds']:.1f}"
        per_step = "n/a" if s["ms_per_step"] is None else f"{s['ms_per_step']:.1f}"
        parts = s.get("parts_ms") or {}
        cells = " | ".join("n/a" if parts.get(p) is None else f"{parts[p]:.1f}" for p in ("step", *PARTS))
        lines.append(f"| {name} | {s['steps']} | {s['resolution']} | {s['batch_size']} | {seconds} | {per_step} | {cells} |")
    segments = [(name, segment, ms) for name, s in record["stages"].items() for segment, ms in ((s.get("parts_ms") or {}).get("segments_ms") or {}).items()]
    if segments:
        lines += ["", "| stage | render sizes | ms/step (GPU stream) |", "|---|---|---:|"]
        lines += [f"| {name} | {segment} | {ms:.1f} |" for name, segment, ms in segments]
    lines += ["", "| stage | rays / step | sampler candidates / step | sampler density points / step | shaded samples / step |",
              "|---|---:|---:|---:|---:|"]
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
    parser.add_argument(
        "--command", action="store_true",
        help="time the whole `recon fit` command in a new Python process (start-up and every import included); no per-step parts",
    )
    args = parser.parse_args()
    import torch

    model = args.model
    if model == "random-full" and args.weights_from_disk:
        model = str(save_weights(args.weights_dir))
    timer = StepTimer() if torch.cuda.is_available() and args.device != "cpu" and not args.command else None
    if timer is not None:
        timer.install()
    with tempfile.TemporaryDirectory(prefix="recon-bench-fit-") as scratch:
        output = args.output or Path(scratch)
        if args.command:
            record = run_command(args.image, args.preset, args.device, args.overrides, model, output, args.steps)
        else:
            record = run(args.image, args.preset, args.device, args.overrides, model, output, timer, args.steps)
    record["weights_from_disk"] = model != args.model
    record["timed"] = "command" if args.command else "fit call"
    record["bytecode"] = bytecode_state()
    print(markdown(record))
    if not all(record["bytecode"]["cached"].values()) and record["bytecode"]["dont_write"]:
        print("warning: no cached bytecode and PYTHONDONTWRITEBYTECODE is set: every import compiled its modules from source "
              "(a pip install compiles them once); the import times above are not a user's", file=sys.stderr)
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
