"""Profiles `recon fit` training steps: where a step's time goes (render, SDS, backward), per stage.

    python bench/profile_fit.py IMAGE [--model random-full] [--steps 30] [--warmup 5] [--device auto] [--set key=value ...]
    python bench/profile_fit.py examples/robot.png --model tiny --preset cpu --device cpu --steps 10

Runs a shortened preset (``--steps`` per stage), times every training step
and the guidance's SDS call inside it (CUDA events on a GPU, wall clock on the CPU), and prints, for
steps after the warm-up of each stage, the mean ms per step and per SDS
call, then the torch profiler's top operators of a few steps of each stage and,
on a GPU, how busy the GPU was during each of those steps (the union of its
kernels' and copies' intervals against the step's wall time: what is left is
the GPU waiting for the host). ``--trace-dir`` keeps each profiled step's
Chrome trace (gzipped; open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from recon.systems import fit as fit_module

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def gpu_busy(trace: dict) -> tuple[float, float, int, float]:
    """(ms the GPU ran anything, ms from the first to the last event of the trace, host-side sync/copy calls, ms
    the host spent inside them) of a Chrome trace from torch.profiler: busy is the union of the GPU events'
    intervals. The span less the host's waits is what the host spent issuing the step (profiler overhead
    included): more than the GPU's busy time means the step is bound by the host."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in GPU_CATEGORIES)
    busy, end = 0.0, float("-inf")
    for start, stop in gpu:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = max(float(e["ts"]) + float(e["dur"]) for e in events) - min(float(e["ts"]) for e in events) if events else 0.0
    waits = [float(e["dur"]) for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS]
    return busy / 1000.0, span / 1000.0, len(waits), sum(waits) / 1000.0


def print_gpu_busy(prof: torch.profiler.profile, keep: Path | None = None) -> None:
    """Prints how busy the GPU was during the finished profiler run ``prof`` (:func:`gpu_busy` of its Chrome trace);
    keeps the trace, gzipped, at ``keep``."""
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        busy, span, syncs, waited = gpu_busy(json.loads(trace.read_text()))
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            with trace.open("rb") as src, gzip.open(keep, "wb") as dst:
                shutil.copyfileobj(src, dst)
    print(f"GPU busy {busy:.1f} ms of the step's {span:.1f} ms ({100 * busy / max(span, 1e-9):.0f} %); host waits {waited:.1f} ms in "
          f"{syncs} sync and copy calls, so the host issued the step in {span - waited:.1f} ms")


def print_step_profile(prof: torch.profiler.profile, title: str, cuda: bool, keep: Path | None = None) -> None:
    """Prints the finished profiler run ``prof``'s top operators under ``title``: by CUDA time and with
    :func:`print_gpu_busy` (the trace kept at ``keep``) when ``cuda``, then by host time."""
    if cuda:
        print(f"\n### {title}: top operators by CUDA time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print_gpu_busy(prof, keep)
    print(f"\n### {title}: top operators by host (CPU) time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    """Parses the flags, runs the shortened fit with the timers installed, prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=30, help="steps per stage")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps of each stage left out of the means; the profiled steps start two steps later")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--trace-dir", type=Path, default=None, help="keep each profiled step's Chrome trace here")
    parser.add_argument("--with-stack", action="store_true", help="record the Python call stack of every operator in the traces")
    args = parser.parse_args()

    from recon.api import fit
    from recon.runtime import resolve_device

    step_ms: dict[str, list[float]] = defaultdict(list)
    sds_ms: dict[str, list[float]] = defaultdict(list)
    original_step = fit_module.Trainer.train_step
    warmup = args.warmup

    cuda = resolve_device(args.device).type == "cuda"

    def mark():
        """A time stamp: a recorded CUDA event on a GPU (no sync inside the step), perf_counter on the CPU."""
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(start, end) -> float:
        return start.elapsed_time(end) if cuda else 1000.0 * (end - start)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed_step(self, stage_name, stage, local_step):
        original_sds = self.guidance.sds
        sds_marks = []

        def timed_sds(*a, **k):
            start = mark()
            out = original_sds(*a, **k)
            sds_marks.append((start, mark()))  # read after the step
            return out

        self.guidance.sds = timed_sds
        profile = warmup + 2 <= local_step < warmup + 2 + args.profile_steps
        sync()
        start = mark()
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities, with_stack=args.with_stack) as prof:
                loss = original_step(self, stage_name, stage, local_step)
                sync()
            print_step_profile(prof, f"{stage_name} step {local_step}", cuda, args.trace_dir and args.trace_dir / f"{stage_name}_{local_step}.json.gz")
        else:
            loss = original_step(self, stage_name, stage, local_step)
        end = mark()
        sync()
        if not profile:  # the profiler's own overhead stays out of the means
            step_ms[stage_name].append(elapsed_ms(start, end))
            sds_ms[stage_name].extend(elapsed_ms(a, b) for a, b in sds_marks)
        self.guidance.sds = original_sds
        return loss

    fit_module.Trainer.train_step = timed_step
    overrides = [f"stages.coarse.steps={args.steps}", f"stages.fine.steps={args.steps}", "turntable=false", *args.overrides]
    with tempfile.TemporaryDirectory() as scratch:
        fit(args.image, Path(scratch), args.preset, overrides, model=args.model, device=args.device, overwrite=True, batch=False)
    print("\n| stage | steps timed | ms / step | ms / SDS call |")
    print("|---|---:|---:|---:|")
    for stage, values in step_ms.items():
        steady = values[warmup:]
        sds = sds_ms[stage][warmup:]
        print(f"| {stage} | {len(steady)} | {sum(steady) / max(1, len(steady)):.1f} | {sum(sds) / max(1, len(sds)):.1f} |")


if __name__ == "__main__":
    main()
