"""Profiles Zero-1-to-3 training steps (``recon train-cascade``'s loop): ms per step, samples/s, where a step goes.

    python bench/profile_training.py [--data DIR] [--init tiny|random-full|FOLDER] [--stage base] [--batch 64]
        [--steps 20] [--profile-steps 2] [--preload] [--trace-dir T] [--device auto]
    torchrun --standalone --nproc_per_node N bench/profile_training.py --work DIR ...   # data-parallel, as the recipe trains

Without ``--data`` a small synthetic set is rendered first (``--objects`` x
``--views`` at ``--size`` px, recon.data.synth) into a temporary folder. Runs
``recon.systems.cascade_training.train`` for ``--steps`` steps with the
trainer's step wrapped: every step is timed (synchronised), and
``--profile-steps`` steps after the warm-up run under the torch profiler,
which prints the top operators by device and host time and, on a GPU, how
busy the GPU was in the step (``bench/profile_fit.py``'s measure: the union
of its kernels' and copies' intervals against the step's wall time; the rest
is the GPU waiting for the host). Process 0 prints; per-process batch
``--batch``; the means leave out the warm-up and the profiled steps.
``--trace-dir`` keeps each profiled step's Chrome trace.
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

WARMUP = 3  # steps left out of the means: kernel choices, first allocations, graph and compile caches


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
            mixed_precision=args.precision, checkpoint_every=10**9, keep_checkpoints=1,
        )  # fmt: skip
        cuda = resolve_device(args.device).type == "cuda"
        step_ms = install_timers(WARMUP, args.profile_steps, cuda, args.trace_dir if rank0 else None, rank0)
        result = cascade_training.train(cfg, data, args.init, work / "run", device=args.device, resume=False)
    if rank0:
        steady = step_ms[WARMUP + args.profile_steps :]  # the profiler's own overhead stays out of the means
        mean = sum(steady) / max(1, len(steady))
        print("\n| steps timed | ms / step | samples / s (all processes) | last loss |")
        print("|---:|---:|---:|---:|")
        print(f"| {len(steady)} | {mean:.1f} | {1000.0 * args.batch * processes / max(mean, 1e-9):,.0f} | {result.losses[-1]:.4f} |")


def render_data(folder: Path, objects: int, views: int, size: int, rank0: bool) -> Path:
    """A small synthetic training set in ``folder`` (rendered by process 0; the others wait for it)."""
    from recon.data.synth import SynthConfig, is_complete, synthesize

    cfg = SynthConfig(objects=objects, views=views, size=size)
    if rank0:
        synthesize(cfg, folder)
    while not all(is_complete(folder / f"{index:05d}", cfg) for index in range(objects)):
        time.sleep(1.0)
    return folder


def install_timers(warmup: int, profiled: int, cuda: bool, trace_dir: Path | None, report: bool) -> list[float]:
    """Wraps the trainer's ``train_step``: each step timed between two synchronisations (of the GPU when ``cuda``;
    ms, returned list, in order), steps ``warmup`` .. ``warmup + profiled - 1`` under the torch profiler, their
    tables printed when ``report`` (traces kept in ``trace_dir``)."""
    from profile_fit import print_step_profile  # bench/ is the script's folder, first on sys.path

    step_ms: list[float] = []
    original = cascade_training.Trainer.train_step

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed_step(trainer, *args, **kwargs):
        index = len(step_ms)
        sync()
        start = time.perf_counter()
        if warmup <= index < warmup + profiled:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as prof:
                loss = original(trainer, *args, **kwargs)
                sync()
            if report:
                print_step_profile(prof, f"training step {index}", cuda, trace_dir and trace_dir / f"train_{index}.json.gz")
        else:
            loss = original(trainer, *args, **kwargs)
            sync()
        step_ms.append(1000.0 * (time.perf_counter() - start))
        return loss

    cascade_training.Trainer.train_step = timed_step
    return step_ms


if __name__ == "__main__":
    main()
