"""Times how long a checkpoint save of the fit trainer blocks the training loop.

    python bench/checkpoint.py [--saves 4] [--device cpu] [--out checkpoint.json]

Builds a default-size radiance field (recon.field.FieldConfig defaults: the
hash table of the default preset) with Adam state, then saves it ``--saves``
times into a temporary run folder synchronously (``save_checkpoint``, the
old path) and in the background (``background=True``, what the trainer does).
Prints per save the seconds the call blocked, and for the background saves
also the seconds until the write finished (``wait_for_checkpoints``); a few
milliseconds of work between saves stand in for training steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recon.field import FieldConfig, RadianceField
from recon.runs import RunDir
from recon.systems.checkpoint import save_checkpoint, wait_for_checkpoints


def main() -> None:
    """Parses the flags, runs both kinds of save, prints (and optionally writes) the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    field = RadianceField(FieldConfig()).to(device)
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    field(torch.rand(4096, 3, device=device) * 2 - 1).density.sum().backward()
    optimizer.step()  # Adam state (exp_avg, exp_avg_sq) exists, as in a run
    megabytes = sum(t.numel() * t.element_size() for t in field.state_dict().values()) * 3 / 2**20
    results: dict[str, object] = {"device": str(device), "state_mib": round(megabytes, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "background"):
            run = RunDir.create(Path(tmp) / mode, {})
            blocked, finished = [], []
            for step in range(args.saves):
                start = time.perf_counter()
                save_checkpoint(run, step, "fit", {"field": field}, {"adam": optimizer}, keep=2, background=mode == "background")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                blocked.append(time.perf_counter() - start)
                wait_for_checkpoints(run)
                finished.append(time.perf_counter() - start)
                optimizer.step()  # the state changes between saves
            wait_for_checkpoints(release_buffers=True)
            results[mode] = {"blocked_s": [round(b, 4) for b in blocked], "written_s": [round(f, 4) for f in finished]}
            # the first save allocates the reused host buffers; the median is the steady state
            print(f"{mode:>10}: blocks the loop {statistics.median(blocked) * 1000:7.1f} ms (median; first {blocked[0] * 1000:.1f} ms), "
                  f"written after {statistics.median(finished) * 1000:7.1f} ms ({megabytes:.0f} MiB of state on {device})")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
