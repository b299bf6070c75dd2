"""bench/mlp_rows.py: the field's MLP head timed call by call, and its table, on the CPU."""

from __future__ import annotations

import subprocess
import sys

import torch
from script_loading import ROOT, load_script

from recon.field import FieldConfig, RadianceField


def test_time_calls_runs_forward_and_backward_at_each_row_count():
    bench = load_script("bench/mlp_rows.py")
    field = RadianceField(FieldConfig())
    issue, total = bench.time_calls(field, [5, 40, 17], torch.device("cpu"))
    assert len(issue) == len(total) == 3
    assert all(0 < i <= t for i, t in zip(issue, total, strict=True))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.mlp.parameters())


def test_table_has_a_row_per_setting():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mlp_rows.py"), "--calls", "8", "--rows", "10", "50", "--sizes", "0", "4", "--device", "cpu"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "4"]
