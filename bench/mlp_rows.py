"""Host time of the field's MLP, forward and backward, with the row count changing every call (as in a fit).

    python bench/mlp_rows.py [--calls 200] [--rows 60000 400000] [--sizes 0 16] [--device cuda]

A fit's sample count changes every step, so each matrix product of the field's
MLP meets a new shape, and cuBLAS spends host time choosing a kernel for
it. ``FieldConfig.mlp_row_sizes`` pads the rows to one of a few sizes per
power of two so that shapes repeat. For each ``--sizes`` value this runs
``--calls`` calls of the field's MLP head on random features (bfloat16
autocast on CUDA, as the fit renders) with row counts drawn uniformly from
``--rows``, forward then backward to the features and the weights, and
prints per call: the host's time to issue it (the device synchronised
before each call, so the host never waits for earlier work) and the time to
its end. The first ``--calls`` / 4 calls of each setting are left out (a
padded setting has met most of its shapes by then, as a fit has after its
first steps).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from recon.field import FieldConfig, RadianceField
from recon.runtime import resolve_device


def time_calls(field: RadianceField, rows: list[int], device: torch.device) -> tuple[list[float], list[float]]:
    """Per call (host ms to issue it, ms to its end) of the MLP head's forward and backward at each row count."""
    width = field.encoding.output_dim
    features = torch.randn(max(rows), width, device=device)
    points = torch.rand(max(rows), 3, device=device) - 0.5
    issue, total = [], []
    for count in rows:
        x = features[:count].detach().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            raw_density, albedo = field._head(x, points[:count])
        (raw_density.sum() + albedo.float().sum()).backward()
        issued = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        issue.append(1000.0 * (issued - start))
        total.append(1000.0 * (time.perf_counter() - start))
    return issue, total


def main() -> None:
    """Parses the flags, times each setting, prints a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, nargs=2, default=[60_000, 400_000], metavar=("MIN", "MAX"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 16], help="FieldConfig.mlp_row_sizes values to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = random.Random(args.seed)
    rows = [rng.randint(*args.rows) for _ in range(args.calls)]
    skip = args.calls // 4
    print(f"| mlp_row_sizes | host ms to issue a call (median, mean) | ms per call to its end (median) | {device} |")
    print("|---:|---|---:|---|")
    for sizes in args.sizes:
        torch.manual_seed(args.seed)
        field = RadianceField(FieldConfig(mlp_row_sizes=sizes)).to(device)
        issue, total = time_calls(field, rows, device)
        issue, total = issue[skip:], total[skip:]
        print(f"| {sizes} | {statistics.median(issue):.3f}, {statistics.mean(issue):.3f} | {statistics.median(total):.3f} | |")


if __name__ == "__main__":
    main()
