"""Does a tiny prior underfit or overfit? Its novel views and pose use on objects it trained on against new ones.

    python bench/prior_overfit.py [--weights recon/assets/tiny-zero123] [--objects 40] [--work DIR] [--out r.json]

Renders two sets the way bench/train_tiny_prior.py renders its held-out set
(orbit views, other cameras than training used): objects of the recipe's
training set (its seed, its families; the ``--family`` ones, i.e. indices
0, 4, 8, ... for blob, the same shapes and colours the weights trained on)
and the recipe's held-out objects (seed + 1, that family only). Scores both
with ``systems.evaluation`` (Base samples against copy-input and mean-image)
and the recipe's ``pose_use`` (epsilon-MSE with true against shuffled pose
tokens). Much better scores on the training objects mean the model
overfits (more data would help); about the same mean it underfits (capacity
and compute would). Prints a Markdown table; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from pathlib import Path
from typing import Any

import torch

from recon.fileio import write_json

SETS = ("training objects", "held-out objects")


def _render(job: tuple) -> None:
    from recon.data.synth import synthesize_object

    synth_cfg, index, folder = job
    torch.set_num_threads(1)
    synthesize_object(synth_cfg, index, Path(folder))


def render_sets(work: Path, objects: int, views: int, size: int, seed: int, families: str, family: str, workers: int) -> dict[str, Path]:
    """The two orbit sets of ``objects`` objects each, rendered into ``work`` (objects already there are kept)."""
    from recon.data.synth import SynthConfig, is_complete

    names = families.split(",")
    if family not in names:
        raise SystemExit(f"--family {family!r} is not one of --families {families!r}")
    every = len(names)
    trained = SynthConfig(objects=every * objects, views=views, size=size, seed=seed, orbit=True, families=families)
    held = SynthConfig(objects=objects, views=views, size=size, seed=seed + 1, orbit=True, families=family)
    indices = {SETS[0]: [every * k + names.index(family) for k in range(objects)], SETS[1]: list(range(objects))}
    roots, jobs = {}, []
    for name, synth_cfg, folder in ((SETS[0], trained, "trained"), (SETS[1], held, "heldout")):
        roots[name] = work / folder
        for k, index in enumerate(indices[name]):
            target = roots[name] / f"{k:05d}"
            if not is_complete(target, synth_cfg):
                jobs.append((synth_cfg, index, str(target)))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pool.map(_render, jobs)
    return roots


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses the flags, renders both sets, scores the weights on each, prints the table; returns the report."""
    from train_tiny_prior import pose_use  # bench/ is the script's folder, first on sys.path

    from recon.data.multiview import MultiViewDataset
    from recon.guidance.checkpoints import load_zero123, shipped_prior_path
    from recon.runtime import resolve_device
    from recon.systems.evaluation import EvalConfig, evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(shipped_prior_path()), help="any load_zero123 spec (default: the shipped prior)")
    parser.add_argument("--objects", type=int, default=40, help="objects per set")
    parser.add_argument("--views", type=int, default=8, help="orbit views per object")
    parser.add_argument("--size", type=int, default=128, help="render size, px (the model's image size)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's data seed (held-out objects: seed + 1)")
    parser.add_argument("--families", default="blob,stacked,symmetric,single", help="the recipe's training families, in its order")
    parser.add_argument("--family", default="blob", help="the held-out set's family; the training objects compared are of it too")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per Base sample")
    parser.add_argument("--pairs", type=int, default=256, help="(input, target) pairs of the pose-use measure")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for the rendered sets (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="recon-prior-overfit-") as scratch:
        work = args.work or Path(scratch)
        roots = render_sets(work, args.objects, args.views, args.size, args.seed, args.families, args.family, args.workers)
        model = load_zero123(args.weights, resolve_device(args.device), torch.float32)
        report: dict[str, Any] = {"weights": args.weights, "objects": args.objects, "views": args.views, "steps": args.steps, "sets": {}}
        for name, root in roots.items():
            scores = evaluate(MultiViewDataset(root, image_size=args.size), model, None,
                              EvalConfig(steps=args.steps, consistency=False, max_objects=args.objects))
            use = pose_use(args.weights, root, args.size, args.device, count=args.pairs)
            report["sets"][name] = {"scores": scores["summary"], "pose_use": use}
    print("\n| objects | Base PSNR dB | Base SSIM | copy-input PSNR | mean-image PSNR | Base - mean-image dB | pose gap |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report["sets"].items():
        s = row["scores"]
        print(f"| {name} | {s['base']['psnr']:.2f} | {s['base']['ssim']:.4f} | {s['copy-input']['psnr']:.2f} | "
              f"{s['mean-image']['psnr']:.2f} | {s['base']['psnr'] - s['mean-image']['psnr']:+.2f} | {100 * row['pose_use']['gap']:.1f} % |")
    if args.out is not None:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
