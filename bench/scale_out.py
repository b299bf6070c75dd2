"""Times `recon batch --gpus N` against `--gpus 1`, and `accelerate launch` cascade training on N GPUs against 1.

    python bench/scale_out.py --data MULTIVIEW_DATA [--gpus 2,1] [--images 8] [--steps 100] [--out scale_out.json]

Batch: the full-size random Zero123 (same shapes and kernels as real weights) is
saved once as an fp16 diffusers folder, as bench/fit.py does, so every worker
loads weights from disk as a user's run does; ``--images`` RGBA discs are
reconstructed with ``--preset``, ``--steps`` and ``--set`` overrides (turntable off). Reported per
GPU count: wall seconds of the whole command (spawn + model loading + all
images), seconds from the first image's start to the end (the processing wall),
images per minute, and the mean utilisation and peak memory of each GPU
(nvidia-smi every 0.5 s over the processing wall). A one-image batch runs
first (``--no-warmup`` skips it): on a fresh 2 x H100 machine the first image
of each worker took ~115 s against 23-31 s for later ones (one-time builds and
caches, such as nerfacc's CUDA extension and Triton kernels), a cost that
would otherwise land on whichever GPU count runs first.

Training: ``accelerate launch --num_processes N -m recon.cli.main train-cascade``
(stage cascade, ``--init random-tiny``, ``--train-steps`` steps of
``--train-batch`` samples per process, data preloaded on the GPU); samples/s
from the run's meta.json (``launches``, timed after the first step). Then the
N-GPU run is resumed on one GPU for ``--resume-steps`` more steps (resume across
a different GPU count). Prints and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class GpuSampler:
    """nvidia-smi every ``period`` seconds in a thread: (time, gpu index, utilisation %, memory MiB)."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.samples: list[tuple[float, int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            now = time.perf_counter()
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            for line in out.strip().splitlines():
                index, util, memory = (float(x) for x in line.split(","))
                self.samples.append((now, int(index), util, memory))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:  # noqa: PYI034 - typing.Self needs Python 3.11
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Mean utilisation and peak memory per GPU between ``start`` and ``end``."""
        per: dict[int, list[tuple[float, float]]] = {}
        for t, index, util, memory in self.samples:
            if start <= t <= end:
                per.setdefault(index, []).append((util, memory))
        return {f"gpu{i}": {"util_mean_pct": round(sum(u for u, _ in v) / len(v), 1), "mem_peak_mib": max(m for _, m in v), "samples": len(v)}
                for i, v in sorted(per.items())}


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


def bench_batch(images: Path, weights: Path, gpus: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `recon batch --gpus` run: wall, processing wall, images/min, GPU use."""
    out = work / f"out_{images.name}_gpus{gpus}"  # the warm-up writes elsewhere: its run must not count as skipped
    command = [sys.executable, "-m", "recon.cli.main", "batch", str(images), "-o", str(out), "--gpus", gpus, "--preset", args.preset,
               "--model", str(weights), "--steps", str(args.steps), "--format", "glb", "--set", "turntable=false", "--quiet"]
    for item in args.set:
        command += ["--set", item]
    summary_path = out / "batch_summary.json"
    first_start = None
    with GpuSampler() as sampler:
        start = time.perf_counter()
        process = subprocess.Popen(command)
        while process.poll() is None:
            if first_start is None and summary_path.is_file() and '"running"' in summary_path.read_text():
                first_start = time.perf_counter()
            time.sleep(0.1)
        end = time.perf_counter()
    summary = json.loads(summary_path.read_text())
    processing = end - (first_start or start)
    return {
        "command": " ".join(command[1:]), "exit_code": process.returncode, "wall_s": round(end - start, 1),
        "processing_wall_s": round(processing, 1), "images_per_min": round(60 * summary["counts"]["finished"] / processing, 2),
        "counts": summary["counts"], "per_image_s": [r["seconds"] for r in summary["images"]],
        "workers": {w["label"]: sum(r["worker"] == w["label"] for r in summary["images"]) for w in summary.get("workers", [])},
        "gpus": sampler.summary(first_start or start, end),
    }


def bench_train(data: Path, processes: int, run: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `accelerate launch` cascade training call; samples/s from meta.json."""
    launch = ["accelerate", "launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if processes > 1:
        launch.append("--multi_gpu")
    command = [*launch, "-m", "recon.cli.main", "train-cascade", "--data", str(data), "--init", "random-tiny", "-o", str(run),
               "--stage", "cascade", "--steps", str(steps), "--batch-size", str(args.train_batch), "--prompt-steps", "2",
               "--preload", "--device", "cuda", "--checkpoint-every", "100000", "--quiet"]
    with GpuSampler() as sampler:
        start = time.perf_counter()
        done = subprocess.run(command, check=False)
        end = time.perf_counter()
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").is_file() else {}
    return {"command": " ".join(command), "exit_code": done.returncode, "wall_s": round(end - start, 1),
            "launch": (meta.get("launches") or [None])[-1], "gpus": sampler.summary(start, end)}


def main() -> None:
    """Parses the flags, runs the benchmarks and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="multi-view dataset for the training benchmark")
    parser.add_argument("--gpus", default="2,1", help="GPU counts to compare, largest first")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--resume-steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="config override of the batch runs (repeatable)")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one-image warm-up batch")
    parser.add_argument("--out", type=Path, default=Path("scale_out.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from fit import save_weights

    counts = [int(c) for c in args.gpus.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    results: dict[str, Any] = {"batch": {}, "train": {}}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_batch:
        start = time.perf_counter()
        weights = save_weights(work / "zero123-full-fp16")
        results["weights_save_s"] = round(time.perf_counter() - start, 1)
        make_images(work / "images", args.images)
        if args.warmup:  # one image first, so that one-time builds (nerfacc's CUDA extension, Triton kernels) are cached
            make_images(work / "warmup", 1)
            results["batch"]["warmup"] = bench_batch(work / "warmup", weights, "1", work, args)
        for count in counts:
            results["batch"][f"gpus{count}"] = bench_batch(work / "images", weights, str(count), work, args)
            save()
        base = results["batch"].get("gpus1")
        for key, value in results["batch"].items():
            if base and key not in ("gpus1", "warmup"):
                value["speedup_wall"] = round(base["wall_s"] / value["wall_s"], 2)
                value["speedup_processing"] = round(base["processing_wall_s"] / value["processing_wall_s"], 2)
    for count in counts:
        results["train"][f"gpus{count}"] = bench_train(args.data, count, work / f"train{count}", args.train_steps, args)
        save()
    one = (results["train"].get("gpus1") or {}).get("launch") or {}
    for key, value in results["train"].items():
        if key != "gpus1" and one.get("samples_per_s") and (value.get("launch") or {}).get("samples_per_s"):
            value["speedup"] = round(value["launch"]["samples_per_s"] / one["samples_per_s"], 2)
    if counts[0] > 1:
        resumed = bench_train(args.data, 1, work / f"train{counts[0]}", args.train_steps + args.resume_steps, args)
        resumed["note"] = f"the {counts[0]}-GPU run resumed on 1 GPU"
        results["train"][f"resume_gpus{counts[0]}_on_1"] = resumed
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
