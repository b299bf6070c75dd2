"""Counts the operators one `recon fit` training step dispatches, by the source line that made them.

    python bench/count_step_ops.py IMAGE [--stage fine] [--step 2] [--model random-tiny] [--device cpu]
        [--leave-out recon/encoding/reference.py guidance/model.py] [--top 40] [--set key=value ...]

A fit step whose host takes longer to issue its kernels than the GPU takes to
run them is bound by how many operators it dispatches (docs/SPEED.md): this
lists them, so that a change to the step can be judged by the count before a
GPU is at hand. The chosen step runs under a ``TorchDispatchMode`` that
records every ATen operator with the innermost frame of recon's code that
issued it; operators of the backward pass are charged to the forward line
that built their autograd node (the traceback autograd's anomaly mode keeps
on each node), marked ``backward``. Views and other operators that launch no
kernel (``NO_KERNEL``) are left out of the counts, and so is every operator
charged to a file named in ``--leave-out``: on the CPU the hash grid and the
UNet run as many small operators where a GPU runs fused kernels or graphs.

Counts are of the step's Python-level ATen calls: on the CPU they stand in for
the GPU's kernel launches (a few CPU-only or CUDA-only paths differ: the fused
density and normal paths of the Triton hash grid run on CUDA only). The default
``--set`` (``CPU_STEP``) samples rays as CUDA does and shrinks the renders to
keep a CPU step short; the count hardly depends on the resolution (only
through the number of chunks a large ray set or density query is split into).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "detach",
    "lift_fresh", "empty", "empty_like", "new_empty", "empty_strided", "_local_scalar_dense", "scalar_tensor",
    "_record_function_enter_new", "_record_function_exit",
})  # fmt: skip
"""Operators that only make a view or an uninitialised tensor (or read a scalar): no kernel on a GPU."""

FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')
CPU_STEP = (
    "renderer.sampler=grid", "stages.coarse.resolution=16", "stages.coarse.reference_resolution=16",
    "stages.fine.resolution=32", "stages.fine.reference_resolution=32", "export.mc_resolution=32", "turntable=false",
)  # fmt: skip
"""The default ``--set``: the occupancy-grid sampler that CUDA uses, and small renders and export, so a
default-preset step runs in about a minute on a CPU."""


def place(filename: str, line: int, name: str, roots: tuple[str, ...]) -> str | None:
    """``"path:line name"`` with the path from the first of ``roots`` on (folder names such as ``/recon/``),
    None when ``filename`` is under none of them."""
    for root in roots:
        at = filename.rfind(root)
        if at >= 0:
            return f"{filename[at + 1:]}:{line} {name}"
    return None


def innermost(frames: list[tuple[str, int, str]], roots: tuple[str, ...]) -> str:
    """The place (:func:`place`) of the innermost frame under ``roots`` of ``frames`` (outermost first), or ``"?"``."""
    for filename, line, name in reversed(frames):
        where = place(filename, line, name, roots)
        if where is not None:
            return where
    return "?"


class OperatorCounter(TorchDispatchMode):
    """Counts dispatched ATen operators by (place, operator) in ``counts``; backward ones by their node's forward
    place, under ``roots`` (folder names; default recon's packages, as installed or in the checkout).

    Enter it with ``torch.autograd.set_detect_anomaly(True, check_nan=False)`` active while the forward runs,
    so that autograd nodes keep the traceback that charges their backward operators to a line.
    """

    def __init__(self, roots: tuple[str, ...] = ("/recon/", "/systems/", "/guidance/", "/exports/")) -> None:
        super().__init__()
        self.roots = roots
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self._where(), func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return innermost([(f.filename, f.lineno, f.name) for f in traceback.extract_stack()], self.roots)
        stack = node.metadata.get("traceback_", [])
        frames = [(m["file"], int(m["line"]), m["name"]) for m in (FRAME.search(entry) for entry in stack) if m]
        return f"backward of {innermost(frames, self.roots)} [{node.name()}]"

    def table(self, leave_out: tuple[str, ...] = (), top: int = 40) -> tuple[int, list[tuple[int, str, list[tuple[str, int]]]]]:
        """(kernel-launching operators counted, rows): each row the count of one place, the place and its
        operators by count, largest first (``top`` rows); views (``NO_KERNEL``) and places in files containing
        any of ``leave_out`` are not counted."""
        by_place: dict[str, Counter] = {}
        for (where, op), n in self.counts.items():
            if op in NO_KERNEL or any(part in where for part in leave_out):
                continue
            by_place.setdefault(where, Counter())[op] += n
        rows = sorted(((sum(ops.values()), where, ops.most_common()) for where, ops in by_place.items()), key=lambda r: -r[0])
        return sum(r[0] for r in rows), rows[:top]


def main() -> None:
    """Runs a shortened fit up to the chosen step, counts that step's operators, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default="random-tiny", help="guidance weights (default random-tiny: the UNet's operators are left out anyway)")
    parser.add_argument("--stage", default="fine", help="stage of the counted step (default fine)")
    parser.add_argument("--step", type=int, default=2, help="the counted step's index in its stage (default 2; 0 holds one-off work)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--leave-out", nargs="*", default=["recon/encoding/reference.py", "guidance/model.py"],
                        help="files whose operators are not counted (default: the CPU hash grid and the UNet)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=None, help=f"config override (default: {' '.join(CPU_STEP)})")
    args = parser.parse_args()

    from recon.api import fit
    from recon.systems import fit as fit_module

    counter = OperatorCounter()
    original = fit_module.Trainer.train_step

    def counted_step(trainer, stage_name, stage, local_step):
        if stage_name != args.stage or local_step != args.step:
            return original(trainer, stage_name, stage, local_step)
        with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
            return original(trainer, stage_name, stage, local_step)

    fit_module.Trainer.train_step = counted_step
    stages = [f"stages.{name}.steps={args.step + 1 if name == args.stage else 1}" for name in ("coarse", "fine")]
    overrides = [*stages, *(CPU_STEP if args.overrides is None else args.overrides)]
    with tempfile.TemporaryDirectory() as scratch:
        fit(args.image, Path(scratch), args.preset, overrides, model=args.model, device=args.device, overwrite=True, batch=False)
    if not counter.counts:
        raise SystemExit(f"stage {args.stage!r} has no step {args.step}: nothing counted")
    total, rows = counter.table(tuple(args.leave_out), args.top)
    print(f"\n{total} kernel-launching operators in step {args.step} of stage {args.stage!r}"
          f" (left out: {', '.join(args.leave_out) or 'nothing'})\n")
    print("| operators | place | by operator |")
    print("|---:|---|---|")
    for count, where, ops in rows:
        print(f"| {count} | {where} | {', '.join(f'{op} {n}' for op, n in ops[:8])} |")


if __name__ == "__main__":
    main()
