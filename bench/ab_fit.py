"""Times `recon fit` as a user runs it under two installs, alternated, and prints the paired differences.

    python bench/ab_fit.py IMAGE --env before=/tmp/clean_old --env after=/tmp/clean_new [--pairs 3]
        [--no-warmup] [--in-process] [--out ab.json] [-- FIT_ARGS ...]

Each ``--env LABEL=PATH`` names a folder put alone on ``PYTHONPATH`` (the runs use ``python -S``), such as
``bench/clean_env.py`` makes from a plain install of each commit. First one short run per install
(``--steps 30``, not recorded: it fills Triton's and the bytecode caches), then ``--pairs`` pairs of
whole-command runs (``bench/fit.py IMAGE --command``, with FIT_ARGS after ``--``, e.g. ``--preset fast``),
the order alternating (A B, B A, A B, ...) so that neither install always runs first: on one machine the
second run of a call was often the slower, by more than the change being measured.

Prints, for the wall time, each phase, each stage's ms per step and the peak GPU memory, each install's
mean and range and the paired differences (the second label minus the first: their mean and range, and
in how many pairs it was lower). Writes every run's record to ``--out`` after each run (a command cut short by a
time limit keeps the runs it finished).

``--in-process`` times ``bench/fit.py IMAGE`` without ``--command`` instead: the fit call alone (after
the imports), whose CUDA events also give each stage's parts (render, SDS, backward...) and the ms per
step of each render-size segment of its schedule (e.g. the default's fine stage at 128 px, then 256 px):
fewer sources of spread than the whole command, and a change's effect found in the phase it touches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from recon.fileio import write_json

FIT = Path(__file__).resolve().parent / "fit.py"
PARTS = ("step", "grid", "render", "sds", "backward", "optimiser")
"""The whole step and its parts, as ``bench/fit.py``'s in-process records give them per stage (ms)."""


def parse_env(spec: str) -> tuple[str, str]:
    """``"LABEL=PATH"`` -> (label, path)."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--env {spec!r}: expected LABEL=PATH")
    return label, path


def run_order(labels: tuple[str, str], pairs: int) -> list[tuple[int, str]]:
    """(pair, label) in the order to run them: each pair holds both labels, their order alternating."""
    return [(pair, label) for pair in range(pairs) for label in (labels if pair % 2 == 0 else labels[::-1])]


def run_fit(image: Path, pythonpath: str, fit_args: list[str], out: Path, in_process: bool = False) -> dict:
    """One ``bench/fit.py IMAGE --command`` run (without ``--command`` when ``in_process``) with ``pythonpath``
    alone on the path; its JSON record."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    mode = [] if in_process else ["--command"]
    command = [sys.executable, "-S", str(FIT), str(image.resolve()), *mode, "--out", str(out), *fit_args]
    # run from the record's folder: from a checkout, `python -m recon` would import the source tree instead
    done = subprocess.run(command, check=False, env=env, cwd=out.parent, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise SystemExit(f"ab_fit: {' '.join(command)} (PYTHONPATH={pythonpath}) failed with exit code {done.returncode}:\n{tail}")
    return json.loads(out.read_text())


def metrics(record: dict) -> dict[str, float]:
    """The numbers compared, by name, from one ``bench/fit.py`` record."""
    values = {"wall s": record["wall_seconds"], "outside the phases s": record["outside_phases_s"]}
    values.update({f"{phase} s": seconds for phase, seconds in record["phases_s"].items()})
    values.update({f"{stage} ms/step": stage_record["ms_per_step"] for stage, stage_record in record["stages"].items()})
    for stage, stage_record in record["stages"].items():  # the in-process mode's CUDA-event parts
        parts = stage_record.get("parts_ms") or {}
        values.update({f"{stage} {part} ms": parts[part] for part in PARTS if part in parts})
        values.update({f"{stage} {segment} ms/step": ms for segment, ms in (parts.get("segments_ms") or {}).items()})
    if record.get("peak_gpu_memory_gib") is not None:
        values["peak GPU GiB"] = record["peak_gpu_memory_gib"]
    return values


def summarise(runs: list[dict], labels: tuple[str, str]) -> list[dict]:
    """One row per metric: each label's mean, min and max over its runs, and the differences second minus
    first label within each pair (mean, min, max, pairs where the second was lower). ``runs``: dicts with
    ``pair``, ``label`` and ``metrics``."""
    by_pair = {(run["pair"], run["label"]): run["metrics"] for run in runs}
    pairs = sorted({run["pair"] for run in runs if all((run["pair"], label) in by_pair for label in labels)})
    names = [name for name in runs[0]["metrics"] if all(name in run["metrics"] for run in runs)]
    rows = []
    for name in names:
        row: dict = {"metric": name}
        for label in labels:
            values = [run["metrics"][name] for run in runs if run["label"] == label]
            row[label] = (statistics.fmean(values), min(values), max(values))
        differences = [by_pair[(pair, labels[1])][name] - by_pair[(pair, labels[0])][name] for pair in pairs]
        if differences:
            row["difference"] = (statistics.fmean(differences), min(differences), max(differences))
            row["lower"] = sum(d < 0 for d in differences)
        rows.append(row)
    return rows


def table(rows: list[dict], labels: tuple[str, str], pairs: int) -> str:
    """The summary as a markdown table."""
    head = f"| metric | {labels[0]} mean [min, max] | {labels[1]} mean [min, max] | {labels[1]} - {labels[0]} mean [min, max] | pairs lower |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{mean:.2f} [{low:.2f}, {high:.2f}]" for mean, low, high in (row[label] for label in labels)]
        if "difference" in row:
            mean, low, high = row["difference"]
            cells += [f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]", f"{row['lower']} of {pairs}"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_line(pair: int, label: str, record: dict) -> str:
    """One run's wall seconds and each stage's ms per step, printed as it ends."""
    stages = ", ".join(f"{name} {stage['ms_per_step']} ms/step" for name, stage in record["stages"].items())
    return f"pair {pair} {label}: {record['wall_seconds']:.1f} s ({stages})"


def main() -> None:
    """Parses the flags, runs the warm-ups and the pairs, prints the table and writes the records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--env", type=parse_env, action="append", required=True, help="LABEL=PYTHONPATH; give exactly two")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true", help="skip the short first run of each install")
    parser.add_argument("--in-process", action="store_true", help="time the fit call alone, with per-step parts and segments")
    parser.add_argument("--out", type=Path, default=None, help="write every run's record here (JSON)")
    args, fit_args = parser.parse_known_args()
    fit_args = [a for a in fit_args if a != "--"]
    if len(args.env) != 2 or args.env[0][0] == args.env[1][0]:
        parser.error("give exactly two --env LABEL=PATH with different labels")
    paths = dict(args.env)
    labels = (args.env[0][0], args.env[1][0])
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        record_path = Path(scratch) / "run.json"
        if not args.no_warmup:
            for label in labels:
                run_fit(args.image, paths[label], [*fit_args, "--steps", "30"], record_path, args.in_process)
        for pair, label in run_order(labels, args.pairs):
            record = run_fit(args.image, paths[label], fit_args, record_path, args.in_process)
            runs.append({"pair": pair, "label": label, "metrics": metrics(record), "record": record})
            print(run_line(pair, label, record), flush=True)
            if args.out:  # after every run: a command cut short by its time limit keeps the runs it finished
                write_json(args.out, {"labels": labels, "fit_args": fit_args, "runs": runs})
    print(table(summarise(runs, labels), labels, args.pairs))


if __name__ == "__main__":
    main()
