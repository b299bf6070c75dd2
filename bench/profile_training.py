"""Profiles Zero-1-to-3 training steps (``recon train-cascade``'s loop): ms per step, samples/s, where a step goes.

    python bench/profile_training.py [--data DIR] [--init tiny|random-full|FOLDER] [--stage base] [--batch 64]
        [--steps 20] [--profile-steps 2] [--preload] [--compile inductor] [--trace-dir T] [--device auto]
    torchrun --standalone --nproc_per_node N bench/profile_training.py --work DIR ...   # data-parallel, as the recipe trains

Without ``--data`` a small synthetic set is rendered first (``--objects`` x
``--views`` at ``--size`` px, recon.data.synth) into a temporary folder. Runs
``recon.systems.cascade_training.train`` for ``--steps`` steps with the
trainer's step (``Trainer.queue_step``) wrapped: the warm-up steps are left
out, ``--profile-steps`` steps after them run under
the torch profiler, which prints the top operators by device and host time
and, on a GPU, how busy the GPU was in the step (``bench/profile_fit.py``'s
measure: the union of its kernels' and copies' intervals against the step's
wall time; the rest is the GPU waiting for the host), and the steps after
those run as training runs them, unsynchronised: their mean is their span
(from the first one's start to the device finishing the last) over their
count. Process 0 prints; per-process batch ``--batch``. ``--trace-dir``
keeps each profiled step's Chrome trace.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from recon.runtime import resolve_device
from recon.systems import cascade_training

WARMUP = 3  # steps left out of the timing: kernel choices, first allocations, graph and compile caches


def main() -> None:
    """Parses the flags, renders data if needed, trains with the step timers installed, prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a `recon data synth` folder (default: render a small one)")
    parser.add_argument("--objects", type=int, default=16)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--init", default="tiny", help="initial weights: any load_zero123 spec (default: the shipped prior, the recipe's architecture)")
    parser.add_argument("--stage", default="base", choices=["base", "cascade"])
    parser.add_argument("--batch", type=int, default=64, help="samples per process and step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True, help="views on the device, encoded once")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), bf16, fp16 or no")
    parser.add_argument("--compile", default="", help="torch.compile backend of the denoiser (TrainConfig.compile; '' = eager)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--trace-dir", type=Path, default=None, help="keep each profiled step's Chrome trace here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (data, run); needed with several processes")
    args = parser.parse_args()
    rank0, processes = int(os.environ.get("RANK", "0")) == 0, int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and args.work is None:
        parser.error("with several processes, --work must name a folder that every process sees")

    with tempfile.TemporaryDirectory(prefix="recon-profile-training-") as scratch:
        work = args.work or Path(scratch)
        data = args.data or render_data(work / "data", args.objects, args.views, args.size, rank0)
        cfg = cascade_training.TrainConfig(
            stage=args.stage, steps=args.steps, batch_size=args.batch, preload=args.preload,
            mixed_precision=args.precision, compile=args.compile, checkpoint_every=10**9, keep_checkpoints=1,
        )  # fmt: skip
        cuda = resolve_device(args.device).type == "cuda"
        steady = install_timers(WARMUP, args.profile_steps, args.steps, cuda, args.trace_dir if rank0 else None, rank0)
        result = cascade_training.train(cfg, data, args.init, work / "run", device=args.device, resume=False)
    if rank0:
        count, span_ms = steady
        mean = span_ms / max(1, count)
        print("\n| steps timed | ms / step | samples / s (all processes) | last loss |")
        print("|---:|---:|---:|---:|")
        print(f"| {count} | {mean:.1f} | {1000.0 * args.batch * processes / max(mean, 1e-9):,.0f} | {result.losses[-1]:.4f} |")


def render_data(folder: Path, objects: int, views: int, size: int, rank0: bool) -> Path:
    """A small synthetic training set in ``folder`` (rendered by process 0; the others wait for it)."""
    from recon.data.synth import SynthConfig, is_complete, synthesize

    cfg = SynthConfig(objects=objects, views=views, size=size)
    if rank0:
        synthesize(cfg, folder)
    while not all(is_complete(folder / f"{index:05d}", cfg) for index in range(objects)):
        time.sleep(1.0)
    return folder


def install_timers(warmup: int, profiled: int, total: int, cuda: bool, trace_dir: Path | None, report: bool) -> list[float]:
    """Wraps the trainer's ``queue_step``: steps below ``warmup`` left out, steps ``warmup`` ..
    ``warmup + profiled - 1`` between synchronisations (of the GPU when ``cuda``) under the torch profiler (their tables
    printed when ``report``, traces kept in ``trace_dir``), the rest unsynchronised up to the device finishing
    step ``total - 1``. Returns a list that holds, once training is over, [steady step count, their span in ms].
    """
    from profile_fit import print_step_profile  # bench/ is the script's folder, first on sys.path

    steady = [0, 0.0]
    calls = [0]
    steady_start = [0.0]
    original = cascade_training.Trainer.queue_step
    first_steady = warmup + profiled

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed_step(trainer, *args, **kwargs):
        index = calls[0]
        calls[0] += 1
        if index >= first_steady:
            if index == first_steady:
                sync()
                steady_start[0] = time.perf_counter()
            loss = original(trainer, *args, **kwargs)
            if index == total - 1:
                sync()
                steady[:] = [index - first_steady + 1, 1000.0 * (time.perf_counter() - steady_start[0])]
            return loss
        sync()
        if index < warmup:
            return original(trainer, *args, **kwargs)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            loss = original(trainer, *args, **kwargs)
            sync()
        if report:
            print_step_profile(prof, f"training step {index}", cuda, trace_dir and trace_dir / f"train_{index}.json.gz")
        return loss

    cascade_training.Trainer.queue_step = timed_step
    return steady


if __name__ == "__main__":
    main()
