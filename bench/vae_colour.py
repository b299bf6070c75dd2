"""Colour first: trains the ``prior`` VAE from scratch and measures how much of its latent space carries colour.

    PYTHONPATH=. python3 bench/vae_colour.py --data WORK/train --heldout WORK/heldout --out vae.json \
        [--compare recon/assets/tiny-zero123] [--minutes 3] [--chroma-weight 1]

Waits (up to ``--wait-minutes``) for ``DATA/dataset.json`` (written when
bench/train_tiny_prior.py has rendered its data, so the two can run side by
side on two GPUs), runs stage vae of ``recon.systems.cascade_training`` on
seeded random ``prior`` weights, then scores on every held-out view the new
VAE and, for comparison, ``--compare``'s: reconstruction PSNR, chroma PSNR
(the colour alone) and the latent colour share
(:func:`~recon.systems.cascade_training.latent_colour_share`: how far greying
an image moves its latents, relative to their spread). The JSON record is
rewritten after each part.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recon.fileio import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="training views (recon layout)")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out views scored at the end")
    parser.add_argument("--out", type=Path, required=True, help="JSON record to write")
    parser.add_argument("--work", type=Path, default=Path("vae-colour-work"), help="scratch folder for the run")
    parser.add_argument("--compare", default="", help="weights whose VAE is scored too ('' = none)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time")
    parser.add_argument("--wait-minutes", type=float, default=3.0, help="longest wait for DATA/dataset.json")
    parser.add_argument("--chroma-weight", type=float, default=1.0, help="weight of the colour-only L1 loss")
    parser.add_argument("--batch", type=int, default=64, help="views per step")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="AdamW learning rate")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="weights and data-draw seed")
    return parser.parse_args(argv)


def score(weights: str | Path, heldout: Path, size: int, device: str) -> dict[str, float]:
    """PSNR, chroma PSNR and latent colour share of ``weights``' VAE on every view of ``heldout``."""
    from recon.data.multiview import MultiViewDataset
    from recon.guidance.checkpoints import load_zero123
    from recon.runtime import resolve_device
    from recon.systems.cascade_training import ViewCache, latent_colour_share, reconstruction_scores

    model = load_zero123(weights, resolve_device(device), torch.float32)
    cache = ViewCache(MultiViewDataset(heldout, image_size=size))
    views = cache.rgb(torch.arange(cache.images.shape[0]), 1.0).to(model.device)
    return {**reconstruction_scores(model.vae, views), "colour_share": latent_colour_share(model.vae, views), "views": int(views.shape[0])}


def main(argv: list[str] | None = None) -> int:
    """Runs the experiment; returns the exit code."""
    args = parse_args(argv)
    from recon.guidance.architectures import architecture, build_components
    from recon.guidance.checkpoints import save_diffusers
    from recon.guidance.model import Zero123Model
    from recon.systems.cascade_training import TrainConfig, train

    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    deadline = time.perf_counter() + 60.0 * args.wait_minutes
    while not (args.data / "dataset.json").is_file():
        if time.perf_counter() > deadline:
            raise SystemExit(f"{args.data}: no dataset.json after {args.wait_minutes} min")
        time.sleep(2.0)
    if args.compare:
        record["compare"] = score(args.compare, args.heldout, args.size, args.device)
        write_json(args.out, record)
    arch = architecture("prior")
    arch["vae"]["sample_size"] = args.size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        parts = build_components(arch)
    init = save_diffusers(Zero123Model(**parts, is_random=True, description="random prior weights (bench/vae_colour.py)"),
                          args.work / "init", overwrite=True)
    cfg = TrainConfig(stage="vae", steps=10**9, batch_size=args.batch, image_size=args.size, lr_vae=args.lr, warmup_steps=100,
                      chroma_weight=args.chroma_weight, seed=args.seed, preload=True)
    start = time.perf_counter()
    result = train(cfg, args.data, str(init), args.work / "run", args.device, max_minutes=args.minutes, resume=False)
    record["train"] = {**result.metrics, "seconds": round(time.perf_counter() - start, 1)}
    write_json(args.out, record)
    record["new"] = score(args.work / "run" / "final" / "base", args.heldout, args.size, args.device)
    write_json(args.out, record)
    print(record, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
