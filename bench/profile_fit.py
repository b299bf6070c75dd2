"""Profiles `recon fit` training steps: where a step's time goes (render, SDS, backward), per stage.

    python bench/profile_fit.py IMAGE [--model random-full] [--steps 30] [--warmup 5] [--device auto] [--set key=value ...]
    python bench/profile_fit.py examples/robot.png --model tiny --preset cpu --device cpu --steps 10
    python bench/profile_fit.py IMAGE --profile-steps 0 --window 4 [--full-stages]

Runs a shortened preset (``--steps`` per stage), times every training step
and the guidance's SDS call inside it (CUDA events on a GPU, wall clock on the CPU), and prints, for
steps after the warm-up of each stage, the mean ms per step and per SDS
call, then the torch profiler's top operators of a few steps of each stage and,
on a GPU, how busy the GPU was during each of those steps (the union of its
kernels' and copies' intervals against the step's wall time: what is left is
the GPU waiting for the host). ``--trace-dir`` keeps each profiled step's
Chrome trace (gzipped; open it in Perfetto or chrome://tracing).

Those profiled steps start with an empty GPU (the bench synchronises before
each), unlike a fit's, whose host issues a step while the GPU still runs the
one before. ``--window N`` also profiles N consecutive steps of each stage
(after the per-step ones) without synchronising between them, as a fit runs
them, and prints (:func:`window_report`) per step the host's span and its
waits in sync and copy calls, the GPU's busy and idle time over the window,
the GPU's time by how its kernels were launched (CUDA-graph replays by the
operator that replayed them, Triton's driver launches, PyTorch's own
launches, copies) with the short idle gaps before them, and the idle gaps of
0.1 ms or more by the operator that launched the kernel ending them.
``--full-stages`` keeps the preset's step counts (``--steps`` is then
ignored), so that a window can sit anywhere in a stage's schedule; it must
end inside every stage.
"""

from __future__ import annotations

import argparse
import bisect
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
LONG_GAP_US = 100.0
"""GPU idle gaps at least this long (us) are listed by the operator that ended them; shorter ones are launch latency."""


def _x_events(trace: dict) -> list[dict]:
    """The complete ("X") events of a Chrome trace that have a duration."""
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def gpu_busy(trace: dict) -> tuple[float, float, int, float]:
    """(ms the GPU ran anything, ms from the first to the last event of the trace, host-side sync/copy calls, ms
    the host spent inside them) of a Chrome trace from torch.profiler: busy is the union of the GPU events'
    intervals. The span less the host's waits is what the host spent issuing the step (profiler overhead
    included): more than the GPU's busy time means the step is bound by the host."""
    events = _x_events(trace)
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in GPU_CATEGORIES)
    busy, end = 0.0, float("-inf")
    for start, stop in gpu:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = max(float(e["ts"]) + float(e["dur"]) for e in events) - min(float(e["ts"]) for e in events) if events else 0.0
    waits = [float(e["dur"]) for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS]
    return busy / 1000.0, span / 1000.0, len(waits), sum(waits) / 1000.0


def chrome_trace(prof: torch.profiler.profile, keep: Path | None = None) -> dict:
    """The finished profiler run ``prof``'s Chrome trace; also kept, gzipped, at ``keep``."""
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            with trace.open("rb") as src, gzip.open(keep, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return json.loads(trace.read_text())


def print_gpu_busy(prof: torch.profiler.profile, keep: Path | None = None) -> None:
    """Prints how busy the GPU was during the finished profiler run ``prof`` (:func:`gpu_busy` of its Chrome trace);
    keeps the trace, gzipped, at ``keep``."""
    busy, span, syncs, waited = gpu_busy(chrome_trace(prof, keep))
    print(f"GPU busy {busy:.1f} ms of the step's {span:.1f} ms ({100 * busy / max(span, 1e-9):.0f} %); host waits {waited:.1f} ms in "
          f"{syncs} sync and copy calls, so the host issued the step in {span - waited:.1f} ms")


class _Enclosing:
    """Finds the innermost CPU operator enclosing a time stamp on a thread."""

    def __init__(self, events: list[dict]) -> None:
        self.ops: dict[object, list[dict]] = defaultdict(list)
        for event in sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: float(e["ts"])):
            self.ops[event.get("tid")].append(event)
        self.starts = {tid: [float(e["ts"]) for e in ops] for tid, ops in self.ops.items()}

    def name(self, tid: object, ts: float) -> str | None:
        """The name of the latest-starting operator on ``tid`` that covers ``ts``, None when none does."""
        ops = self.ops.get(tid, [])
        for event in reversed(ops[: bisect.bisect_right(self.starts.get(tid, []), ts)]):
            if float(event["ts"]) + float(event["dur"]) >= ts:
                return str(event["name"])
        return None


def window_report(trace: dict, step_prefix: str = "step ") -> dict:
    """Where the time of consecutive steps went, from a Chrome trace of torch.profiler whose steps are user
    annotations named ``step_prefix + N``: a dict with

    - ``steps``: per step (name, host span ms, ms of that span the host spent in sync and copy calls);
    - ``span_ms`` (first step's start to the GPU's last event), ``busy_ms`` (union of the GPU's events), ``idle_ms``;
    - ``launches``: {how the kernels were launched: [GPU events, busy ms, ms of gaps under LONG_GAP_US before
      them]}, the label being the CUDA runtime or driver call (a graph replay's with the operator that replayed
      it, e.g. ``cudaGraphLaunch in Graphed``);
    - ``long_gaps``: {operator that launched the event ending a gap of LONG_GAP_US or more: [gaps, ms]}.
    """
    events = _x_events(trace)
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(step_prefix)),
                   key=lambda e: float(e["ts"]))  # fmt: skip
    if not steps:
        raise ValueError(f"no user annotation named {step_prefix!r}... in the trace")
    main_thread = steps[0].get("tid")
    waits = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS and e.get("tid") == main_thread]
    report: dict = {"steps": []}
    for step in steps:
        start, end = float(step["ts"]), float(step["ts"]) + float(step["dur"])
        waited = sum(float(e["dur"]) for e in waits if start <= float(e["ts"]) <= end)
        report["steps"].append((step["name"], float(step["dur"]) / 1000.0, waited / 1000.0))
    first = float(steps[0]["ts"])
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and float(e["ts"]) >= first), key=lambda e: float(e["ts"]))
    calls = {e["args"]["correlation"]: e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    enclosing = _Enclosing(events)
    launches: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    long_gaps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    launchers: dict[object, tuple[str, str | None]] = {}
    busy, reached = 0.0, first
    for event in gpu:
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        gap = max(0.0, start - reached)
        correlation = event.get("args", {}).get("correlation")
        if correlation not in launchers:  # a graph replay's kernels share their launch's correlation
            call = calls.get(correlation)
            label = "unknown launch" if call is None else str(call["name"])
            operator = None if call is None else enclosing.name(call.get("tid"), float(call["ts"]))
            if label == "cudaGraphLaunch":
                label += f" in {operator or 'no operator'}"
            launchers[correlation] = (label, operator)
        label, operator = launchers[correlation]
        running = max(0.0, end - max(start, reached))  # the part no earlier GPU event covered
        entry = launches[label]
        entry[0] += 1
        entry[1] += running / 1000.0
        if gap >= LONG_GAP_US:
            blamed = long_gaps[operator or label]
            blamed[0] += 1
            blamed[1] += gap / 1000.0
        else:
            entry[2] += gap / 1000.0
        busy += running
        reached = max(reached, end)
    span = max(reached, float(steps[-1]["ts"]) + float(steps[-1]["dur"])) - first
    report.update(span_ms=span / 1000.0, busy_ms=busy / 1000.0, idle_ms=(span - busy) / 1000.0, launches=dict(launches), long_gaps=dict(long_gaps))
    return report


def print_window_report(report: dict, title: str) -> None:
    """Prints :func:`window_report`'s ``report`` as Markdown tables, per step where a quantity is summed."""
    n = len(report["steps"])
    print(f"\n### {title}: {n} consecutive steps, not synchronised between them")
    for name, span, waited in report["steps"]:
        print(f"{name}: host span {span:.1f} ms, of which waiting in sync and copy calls {waited:.1f} ms")
    if not report["launches"]:
        print("no GPU events in the trace")
        return
    print(f"GPU busy {report['busy_ms'] / n:.1f} ms per step, idle {report['idle_ms'] / n:.1f} ms per step "
          f"(window {report['span_ms']:.1f} ms, to the GPU's last event)")  # fmt: skip
    print("\n| launched by | GPU events / step | GPU busy ms / step | short idle gaps before them, ms / step |")
    print("|---|---:|---:|---:|")
    for label, (count, busy, gaps) in sorted(report["launches"].items(), key=lambda item: -item[1][1]):
        print(f"| {label} | {count / n:.0f} | {busy / n:.2f} | {gaps / n:.2f} |")
    print(f"\n| idle gaps >= {LONG_GAP_US / 1000:g} ms, ended by a launch from | gaps / step | ms / step |")
    print("|---|---:|---:|")
    for label, (count, total) in sorted(report["long_gaps"].items(), key=lambda item: -item[1][1])[:20]:
        print(f"| {label} | {count / n:.1f} | {total / n:.2f} |")


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
    parser.add_argument("--window", type=int, default=0,
                        help="also profile this many consecutive steps per stage without syncs between them (after the per-step ones)")
    parser.add_argument("--full-stages", action="store_true", help="keep the preset's steps per stage instead of --steps")
    args = parser.parse_args()
    if not args.full_stages and args.warmup + 2 + args.profile_steps + args.window > args.steps:
        parser.error(f"--warmup {args.warmup} + 2 + --profile-steps {args.profile_steps} + --window {args.window} exceeds --steps {args.steps}")

    from recon.api import fit
    from recon.runtime import resolve_device

    step_ms: dict[str, list[float]] = defaultdict(list)
    sds_ms: dict[str, list[float]] = defaultdict(list)
    original_step = fit_module.Trainer.train_step
    warmup = args.warmup

    cuda = resolve_device(args.device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

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

    window_start = warmup + 2 + args.profile_steps
    window: dict[str, torch.profiler.profile] = {}

    def windowed_step(self, stage_name, stage, local_step):
        """One step of a ``--window``: no sync, a profiler spanning the window, its report after the last step."""
        if local_step == window_start:
            sync()
            window["prof"] = torch.profiler.profile(activities=activities, with_stack=args.with_stack)
            window["prof"].__enter__()
        with torch.profiler.record_function(f"step {local_step}"):
            loss = original_step(self, stage_name, stage, local_step)
        if local_step == window_start + args.window - 1:
            sync()
            prof = window.pop("prof")
            prof.__exit__(None, None, None)
            keep = args.trace_dir and args.trace_dir / f"{stage_name}_window_{window_start}.json.gz"
            print_window_report(window_report(chrome_trace(prof, keep)), f"{stage_name} steps {window_start}-{local_step}")
        return loss

    def timed_step(self, stage_name, stage, local_step):
        if window_start <= local_step < window_start + args.window:
            return windowed_step(self, stage_name, stage, local_step)
        original_sds = self.guidance.sds
        sds_marks = []

        def timed_sds(*a, **k):
            start = mark()
            out = original_sds(*a, **k)
            sds_marks.append((start, mark()))  # read after the step
            return out

        self.guidance.sds = timed_sds
        profile = warmup + 2 <= local_step < window_start
        sync()
        start = mark()
        if profile:
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
    steps = [] if args.full_stages else [f"stages.coarse.steps={args.steps}", f"stages.fine.steps={args.steps}"]
    overrides = [*steps, "turntable=false", *args.overrides]
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
