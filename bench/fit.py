"""Times `recon fit` end to end (coarse + fine + export + turntable) with full-size random-weight models.

    python bench/fit.py IMAGE [--preset default] [--device auto] [--out bench-fit.json] [--set key=value ...]

Runs the preset on the current device with ``--model random-full`` (random
weights cost exactly what real Zero123 weights cost: same shapes, same
kernels) into a scratch output folder, then reads the run's meta.json:
wall seconds per phase, it/s per stage and peak CUDA memory. Prints a
Markdown table; writes the same numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from recon.fileio import read_json, write_json


def run(image: Path, preset: str, device: str, overrides: list[str], model: str, output: Path) -> dict[str, Any]:
    """Fits ``image`` once and returns the benchmark record (phases, rates, memory, config summary)."""
    import torch

    from recon.api import build_config, fit

    cfg = build_config(preset, overrides, model=model)
    start = time.perf_counter()
    results = fit(image, output, preset, overrides, model=model, device=device, overwrite=True, batch=False)
    wall = time.perf_counter() - start
    meta = read_json(results[0].run_dir / "meta.json")
    timings = meta.get("timings_s", {})
    stages = {
        name: {
            "steps": stage.steps,
            "resolution": stage.resolution,
            "batch_size": stage.batch_size,
            "seconds": timings.get(name),
            "it_per_s": None if not timings.get(name) else round(stage.steps / timings[name], 3),
        }
        for name, stage in cfg.stages.items()
        if stage.steps > 0
    }
    return {
        "image": str(image),
        "preset": preset,
        "model": model,
        "overrides": overrides,
        "device": meta.get("device"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and meta.get("device", "").startswith("cuda") else None,
        "host": platform.node(),
        "versions": meta.get("versions", {}),
        "wall_seconds": round(wall, 3),
        "phases_s": timings,
        "stages": stages,
        "peak_gpu_memory_gib": meta.get("peak_gpu_memory_gib"),
        "exports": results[0].exports,
    }


def markdown(record: dict[str, Any]) -> str:
    """The record as a Markdown report: one table of phases, one of stages."""
    peak = record["peak_gpu_memory_gib"]
    memory = "n/a" if peak is None else f"{peak:.2f} GiB"
    lines = [
        f"## recon fit benchmark: preset `{record['preset']}`, model `{record['model']}`",
        "",
        f"device: {record['device']} {record['gpu'] or ''}  |  wall time: {record['wall_seconds']:.1f} s  |  peak GPU memory: {memory}",
        "",
        "| phase | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in record["phases_s"].items()]
    lines += ["", "| stage | steps | render px | views/step | seconds | it/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in record["stages"].items():
        seconds = "n/a" if s["seconds"] is None else f"{s['seconds']:.1f}"
        rate = "n/a" if s["it_per_s"] is None else f"{s['it_per_s']:.2f}"
        lines.append(f"| {name} | {s['steps']} | {s['resolution']} | {s['batch_size']} | {seconds} | {rate} |")
    return "\n".join(lines)


def main() -> None:
    """Parses the command line, runs the benchmark, prints Markdown and writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="input image (RGBA PNG is best)")
    parser.add_argument("--preset", default="default", help="preset name or YAML path (default: default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model", default="random-full", help="guidance weights (default: random-full)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="run folder parent (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recon-bench-fit-") as scratch:
        record = run(args.image, args.preset, args.device, args.overrides, args.model, args.output or Path(scratch))
    print(markdown(record))
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
