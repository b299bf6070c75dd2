"""Times `recon batch --gpus N` against `--gpus 1`, and `accelerate launch` cascade training on N GPUs against 1.

    python bench/scale_out.py [--batch 2,1] [--images 8] [--model random-tiny] [--steps 100] [--data MV] [--out scale_out.json]

Batch: ``--images`` RGBA discs are reconstructed with ``--preset``, ``--steps`` and
``--set`` overrides (turntable off) by :func:`recon.fit` with ``gpus=...``, in this
process (a user's `recon batch --gpus N` minus the interpreter start). ``--model
full-disk`` (default) saves the full-size random Zero123 once as an fp16 diffusers
folder, as bench/fit.py does, so every worker loads weights from disk as a
user's run does; any other value (``random-tiny``) is passed as ``--model``.
Each ``--batch`` entry is one batch: ``2`` (2 GPUs, a worker each), ``2x2``
(2 GPUs, 2 workers each: one image's export overlaps another's fit) and a
``:nopin`` suffix (workers not given their own CPU cores and threads: GPU workers
then run as before the CPU share existed; CPU workers, ``0xN``, use torch's
default of all cores each, not the old ``cpu_count // N``), e.g. ``--batch 2,1,2:nopin``.

Reported per batch:

* ``setup_s``: start until the first image starts (spawning the workers, loading the models);
* ``processing_wall_s`` / ``images_per_min``: first image start to the end, all images;
* ``steady_images_per_min``: sum over workers of 60 / (mean seconds of its images after its first one):
  each worker's first image (CUDA context, kernel caches, allocator growth) is the warm-up, reported per
  worker as ``first_image_s`` and left out; ``speedup_steady`` is the ratio to the 1-GPU batch;
* per worker: its GPU, CPUs and threads, images, mean seconds per phase of its steady images (``fit`` =
  the training stages, ``export``, ``prepare`` = preprocess + guidance preparation, ``other`` = the rest of
  the image's wall time) and the export's own stages (density grid, marching cubes, cleanup, UV, bake, write);
* ``idle_pct``: share of the workers' processing time with no image;
* GPU utilisation (mean) and peak memory per GPU from nvidia-smi every 0.5 s, and the host's CPU busy
  share from /proc/stat, over the processing wall.

A warm-up batch (one image per GPU of the largest count) runs first and is
reported apart (``--no-warmup`` skips it): one-time builds such as Triton's
and nerfacc's kernel caches land there, not on whichever batch runs first.

Training: ``accelerate launch --num_processes N -m recon.cli.main train-cascade``
(stage cascade, ``--init random-tiny``, ``--train-steps`` steps of
``--train-batch`` samples per process, data preloaded on the GPU); samples/s
from the run's meta.json (``launches``, timed after the first step). Then the
N-GPU run is resumed on one GPU for ``--resume-steps`` more steps (resume across
a different GPU count). Without ``--data`` a small synthetic multi-view set
is made first. ``--skip-batch`` / ``--train-gpus ''`` skip a part;
``--budget-s`` skips a batch or launch that would end later than that many
seconds after the start, estimated from those before (listed under
``not_run``). Prints a line per finished image, and writes JSON to ``--out``
after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock


class Sampler:
    """A thread reading nvidia-smi (per GPU: utilisation %, memory MiB) and /proc/stat (host CPU busy %) every ``period`` s."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.gpu: list[tuple[float, int, float, float]] = []
        self.cpu: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        last = self._cpu_times()
        while not self._stop.is_set():
            now = time.perf_counter()
            try:
                out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            except OSError:  # no nvidia-smi (a CPU run)
                out = ""
            for line in out.strip().splitlines():
                index, util, memory = (float(x) for x in line.split(","))
                self.gpu.append((now, int(index), util, memory))
            times = self._cpu_times()
            if times and last and times[0] > last[0]:
                self.cpu.append((now, 100.0 * (1 - (times[1] - last[1]) / (times[0] - last[0]))))
            last = times
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:  # noqa: PYI034 - typing.Self needs Python 3.11
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Mean utilisation and peak memory per GPU, and the mean host CPU busy %, between ``start`` and ``end``."""
        per: dict[int, list[tuple[float, float]]] = {}
        for t, index, util, memory in self.gpu:
            if start <= t <= end:
                per.setdefault(index, []).append((util, memory))
        cpu = [busy for t, busy in self.cpu if start <= t <= end]
        return {
            "gpus": {f"gpu{i}": {"util_mean_pct": round(sum(u for u, _ in v) / len(v), 1), "mem_peak_mib": max(m for _, m in v), "samples": len(v)}
                     for i, v in sorted(per.items())},
            "host_cpu_busy_pct": round(sum(cpu) / len(cpu), 1) if cpu else None,
        }


def make_images(folder: Path, count: int, size: int = 256) -> None:
    """``count`` RGBA discs of different colours and sizes."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size, :size]
    for i in range(count):
        radius = size * (0.25 + 0.02 * (i % 5))
        inside = (x - size / 2) ** 2 + (y - size / 2) ** 2 < radius**2
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 2] = (40 * i) % 256, x * 255 // size, 200 - 10 * i
        rgba[..., 3] = inside * 255
        Image.fromarray(rgba, "RGBA").save(folder / f"object_{i:02d}.png")


def parse_batch(entry: str) -> tuple[int, int, bool]:
    """``2`` -> (2 GPUs, 1 worker each, pinned); ``2x2`` -> 2 workers per GPU; ``:nopin`` -> CPUs not shared out;
    ``0x2`` -> 2 CPU workers (``--device cpu --workers 2``)."""
    spec, _, flag = entry.partition(":")
    gpus, _, per_gpu = spec.partition("x")
    if flag not in ("", "nopin"):
        raise SystemExit(f"--batch {entry}: the only suffix is :nopin")
    return int(gpus), int(per_gpu or 1), flag != "nopin"


PHASES = {"fit": ("coarse", "fine", "refine", "train"), "export": ("export",), "prepare": ("preprocess", "prepare guidance", "import libraries", "load models")}
"""Per-image phases of the bench's report: which fit_image timer phases each one sums (the rest is ``other``)."""


def phase_split(timings: dict[str, float], seconds: float) -> dict[str, float]:
    """An image's ``timings_s`` summed into :data:`PHASES`, plus ``other`` (its wall ``seconds`` minus all phases)."""
    split = {name: sum(v for k, v in timings.items() if k in keys) for name, keys in PHASES.items()}
    split["other"] = seconds - sum(timings.values())
    return split


def mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of ``rows`` (keys missing from a row count as 0), rounded to ms."""
    keys = sorted({k for row in rows for k in row})
    return {k: round(sum(row.get(k, 0.0) for row in rows) / len(rows), 3) for k in keys} if rows else {}


def worker_report(summary: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Per worker (from batch_summary.json and the run folders): images, warm-up, steady phases; and the steady images/min."""
    workers: dict[str, Any] = {}
    steady_rate = 0.0
    for entry in summary.get("workers", []):
        label = entry["label"]
        mine = sorted((r for r in summary["images"] if r["worker"] == label and r["status"] == "finished"), key=lambda r: r["started_at"] or 0)
        steady = mine[1:]
        export_stages = []
        for r in steady:
            meta = Path(r["run_dir"]) / "meta.json"
            if meta.is_file():
                export_stages.append((json.loads(meta.read_text()).get("exports") or {}).get("timings_s") or {})
        mean_s = sum(r["seconds"] for r in steady) / len(steady) if steady else None
        if mean_s:
            steady_rate += 60.0 / mean_s
        workers[label] = {
            "gpu": entry.get("device"), "cpus": entry.get("cpus"), "threads": entry.get("threads"), "images": len(mine),
            "first_image_s": mine[0]["seconds"] if mine else None,
            "first_image_phases_s": mean_dicts([phase_split(r["timings_s"], r["seconds"]) for r in mine[:1]]),
            "steady_mean_s": round(mean_s, 3) if mean_s else None,
            "steady_phases_s": mean_dicts([phase_split(r["timings_s"], r["seconds"]) for r in steady]),
            "steady_export_stages_s": mean_dicts(export_stages),
        }
    return workers, round(steady_rate, 2)


def bench_batch(images: Path, model: str, entry: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One scaled-out batch through :func:`recon.fit`: walls, throughput (all and steady), per-worker phases, GPU and CPU use."""
    import recon
    from recon.systems import workers as pool

    gpus, per_gpu, pin = parse_batch(entry)
    out = work / f"out_{images.name}_{entry.replace(':', '_')}"
    overrides = ["turntable=false", *args.set]
    unpinned = mock.patch.object(pool, "share_cpus", lambda specs, cores=None: list(specs)) if not pin else nullcontext()
    summary_path = out / "batch_summary.json"
    first_start: list[float] = []

    def watch() -> None:  # when the first image starts (the summary says "running"); a line per finished image
        printed: set[str] = set()
        while not done.is_set():
            try:
                text = summary_path.read_text() if summary_path.is_file() else ""
                current = json.loads(text) if text else {}
            except (OSError, ValueError):  # being replaced
                current = {}
            if not first_start and '"running"' in text:
                first_start.append(time.perf_counter())
            for r in current.get("images", []):
                if r["status"] in ("finished", "failed") and r["image"] not in printed:
                    printed.add(r["image"])
                    phases = ", ".join(f"{k} {v:.1f}" for k, v in phase_split(r["timings_s"], r["seconds"]).items())
                    print(f"[batch {entry}] {Path(r['image']).name} {r['worker']} {r['status']} {r['seconds']:.1f} s ({phases})", flush=True)
            time.sleep(0.1)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    with Sampler() as sampler, unpinned:
        start = time.perf_counter()
        watcher.start()
        error = None
        try:
            recon.fit(images, out, args.preset, overrides, model=model, steps=args.steps, formats=["glb"], device="cuda" if gpus else "cpu",
                      gpus=str(gpus) if gpus else None, workers=(gpus * per_gpu if per_gpu > 1 else None) if gpus else per_gpu, quiet=True)
        except Exception as exc:  # noqa: BLE001 - recorded; the other measurements go on
            error = f"{type(exc).__name__}: {exc}"
        finally:
            end = time.perf_counter()
            done.set()
            watcher.join()
    if error is not None or not summary_path.is_file():
        return {"batch": entry, "error": error or "no batch_summary.json", "wall_s": round(end - start, 1)}
    summary = json.loads(summary_path.read_text())
    processing = end - (first_start[0] if first_start else start)
    workers, steady = worker_report(summary)
    busy = sum(r["seconds"] for r in summary["images"])
    return {
        "batch": entry, "gpu_count": gpus, "workers_per_gpu": per_gpu, "pinned": pin,
        "wall_s": round(end - start, 1), "setup_s": round(end - start - processing, 1),
        "processing_wall_s": round(processing, 1), "counts": summary["counts"],
        "images_per_min": round(60 * summary["counts"]["finished"] / processing, 2), "steady_images_per_min": steady,
        "idle_pct": round(100 * (1 - busy / (processing * max(1, len(workers)))), 1),
        "per_image_s": {Path(r["image"]).name: [r["worker"], r["seconds"]] for r in summary["images"]},
        "workers": workers, **sampler.summary(first_start[0] if first_start else start, end),
    }


def make_data(folder: Path) -> Path:
    """A small synthetic multi-view set for the training benchmark (16 objects x 4 views, 64 px)."""
    from recon.data.synth import SynthConfig, synthesize

    if not folder.is_dir():
        synthesize(SynthConfig(objects=16, views=4, size=64, seed=7, supersample=1), folder)
    return folder


def bench_train(data: Path, processes: int, run: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `accelerate launch` cascade training call; samples/s from meta.json."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if processes > 1:
        launch.append("--multi_gpu")
    command = [*launch, "-m", "recon.cli.main", "train-cascade", "--data", str(data), "--init", "random-tiny", "-o", str(run),
               "--stage", "cascade", "--steps", str(steps), "--batch-size", str(args.train_batch), "--prompt-steps", "2",
               "--preload", "--device", "cuda", "--checkpoint-every", "100000", "--quiet"]
    with Sampler() as sampler:
        start = time.perf_counter()
        done = subprocess.run(command, check=False)
        end = time.perf_counter()
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").is_file() else {}
    return {"command": " ".join(command[1:]), "exit_code": done.returncode, "wall_s": round(end - start, 1),
            "launch": (meta.get("launches") or [None])[-1], **sampler.summary(start, end)}


def main() -> None:
    """Parses the flags, runs the benchmarks and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="2,1", help="batches to run in order: GPU count, xK for K workers per GPU, :nopin; 0 = CPU workers")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", default="full-disk", help="full-disk (random full-size weights saved and loaded from disk) or a --model value")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], help="config override of the batch runs (repeatable)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up batch")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--data", type=Path, help="multi-view dataset for the training benchmark (default: a small synthetic one)")
    parser.add_argument("--train-gpus", default="2,1", help="process counts to train with, largest first ('' skips training)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--resume-steps", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start a batch or launch only if it should end within this many seconds of the bench's start")
    parser.add_argument("--work", type=Path, default=None, help="folder for weights, images and runs (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=Path("scale_out.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="scale-out-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"host_cpus": os.cpu_count(), "batch": {}, "train": {}, "not_run": []}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    def time_left(what: str, estimate_s: float) -> bool:
        if args.budget_s is not None and time.perf_counter() - began + estimate_s > args.budget_s:
            results["not_run"].append(f"{what} (estimated {estimate_s:.0f} s)")
            return False
        return True

    def batch_estimate(entry: str) -> float:
        """Setup plus processing time of the slowest earlier batch on as many GPUs, else of the last one scaled by
        the GPU counts (0 before any batch)."""
        done = [v for k, v in results["batch"].items() if k != "warmup" and "error" not in v]
        gpus = max(1, parse_batch(entry)[0])
        same = [v["setup_s"] + v["processing_wall_s"] for v in done if max(1, v["gpu_count"]) == gpus]
        if same or not done:
            return max(same, default=0.0)
        return done[-1]["setup_s"] + done[-1]["processing_wall_s"] * max(1, done[-1]["gpu_count"]) / gpus

    if not args.skip_batch:
        entries = [e for e in args.batch.split(",") if e]
        model = args.model
        if model == "full-disk":
            from fit import save_weights

            start = time.perf_counter()
            model = str(save_weights(work / "zero123-full-fp16"))
            results["weights_save_s"] = round(time.perf_counter() - start, 1)
        make_images(work / "images", args.images, args.image_size)
        if args.warmup:
            most = max(parse_batch(e)[0] for e in entries)
            make_images(work / "warmup", max(1, most), args.image_size)
            results["batch"]["warmup"] = bench_batch(work / "warmup", model, str(most), work, args)
            save()
        for entry in entries:
            if time_left(f"batch {entry}", batch_estimate(entry)):
                results["batch"][entry] = bench_batch(work / "images", model, entry, work, args)
            save()
        base = results["batch"].get("1")
        for key, value in results["batch"].items():
            if base and "error" not in base and "error" not in value and key not in ("1", "warmup"):
                value["speedup_wall"] = round(base["wall_s"] / value["wall_s"], 2)
                value["speedup_processing"] = round(base["processing_wall_s"] / value["processing_wall_s"], 2)
                if base["steady_images_per_min"]:
                    value["speedup_steady"] = round(value["steady_images_per_min"] / base["steady_images_per_min"], 2)
        save()
    counts = [int(c) for c in args.train_gpus.split(",") if c]
    if counts:
        start = time.perf_counter()
        data = args.data or make_data(work / "mv")
        results["train_data_s"] = round(time.perf_counter() - start, 1)
        for count in counts:
            if time_left(f"train {count}", max([0.0, *(v["wall_s"] for v in results["train"].values())])):
                results["train"][f"gpus{count}"] = bench_train(data, count, work / f"train{count}", args.train_steps, args)
            save()
        one = (results["train"].get("gpus1") or {}).get("launch") or {}
        for key, value in results["train"].items():
            if key != "gpus1" and one.get("samples_per_s") and (value.get("launch") or {}).get("samples_per_s"):
                value["speedup"] = round(value["launch"]["samples_per_s"] / one["samples_per_s"], 2)
        if counts[0] > 1 and args.resume_steps and f"gpus{counts[0]}" in results["train"] and time_left("resume", min(v["wall_s"] for v in results["train"].values())):
            resumed = bench_train(data, 1, work / f"train{counts[0]}", args.train_steps + args.resume_steps, args)
            resumed["note"] = f"the {counts[0]}-GPU run resumed on 1 GPU"
            results["train"][f"resume_gpus{counts[0]}_on_1"] = resumed
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
