"""bench/count_step_ops.py: operators charged to the line that issued them, backward ones to their forward line."""

from __future__ import annotations

import torch
from script_loading import load_script


def _double_and_sum(x: torch.Tensor) -> torch.Tensor:
    return (x * 2.0).sum()  # one mul and one sum forward; MulBackward0 and SumBackward0 in the backward


def test_operators_are_counted_by_place_and_backward_by_forward_place():
    script = load_script("bench/count_step_ops.py")
    counter = script.OperatorCounter(roots=("/tests/",))
    x = torch.ones(4, requires_grad=True)
    with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
        _double_and_sum(x).backward()
    line = _double_and_sum.__code__.co_firstlineno + 1
    here = f"tests/test_bench_count_ops.py:{line} _double_and_sum"
    assert counter.counts[(here, "mul")] == 1 and counter.counts[(here, "sum")] == 1
    backward = {(where, op) for where, op in counter.counts if where.startswith(f"backward of {here}")}
    assert any("[MulBackward0]" in where and op == "mul" for where, op in backward)
    total, rows = counter.table()
    assert total == sum(row[0] for row in rows) and all(op not in script.NO_KERNEL for _, _, ops in rows for op, _ in ops)
    left, rows_left = counter.table(leave_out=("tests/test_bench_count_ops.py",))
    assert left < total and all("test_bench_count_ops" not in where for _, where, _ in rows_left)
    assert script.place("/x/site-packages/recon/field.py", 3, "f", ("/recon/",)) == "recon/field.py:3 f"
    assert script.place("/x/other.py", 3, "f", ("/recon/",)) is None
