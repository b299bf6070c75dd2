"""bench/profile_fit.py's GPU-busy and host-wait measure and bench/profile_training.py end to end on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
from script_loading import ROOT, load_script


def test_gpu_busy_is_the_union_of_the_gpu_intervals():
    gpu_busy = load_script("bench/profile_fit.py").gpu_busy
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "step", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 10, "dur": 20},  # 10-30
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 20, "dur": 20},  # 20-40: overlaps a
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 60, "dur": 5},  # 60-65
        {"ph": "X", "cat": "kernel", "name": "d", "ts": 61, "dur": 2},  # inside c
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 70, "dur": 30},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5, "dur": 1},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0},
    ]}  # fmt: skip
    busy, span, waits, waited = gpu_busy(trace)
    assert busy == pytest.approx(0.035) and span == pytest.approx(0.1) and waits == 1 and waited == pytest.approx(0.03)  # ms
    assert gpu_busy({"traceEvents": []}) == (0.0, 0.0, 0, 0.0)


def test_training_profiler_runs_a_few_steps_on_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_training.py"), "--init", "random-tiny", "--objects", "3", "--views", "3",
         "--size", "32", "--batch", "4", "--steps", "6", "--profile-steps", "1", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "training step 3: top operators by host (CPU) time" in out
    row = out.strip().splitlines()[-1].strip("|").split("|")
    assert int(row[0]) == 2 and float(row[1]) > 0 and float(row[2].replace(",", "")) > 0  # steps 5 and 6 timed


def test_print_gpu_busy_keeps_the_trace(tmp_path, capsys):
    import gzip
    import json

    import torch

    print_gpu_busy = load_script("bench/profile_fit.py").print_gpu_busy
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64).matmul(torch.ones(64, 64))
    keep = tmp_path / "traces" / "step.json.gz"
    print_gpu_busy(prof, keep)
    assert "GPU busy 0.0 ms of the step's" in capsys.readouterr().out  # a CPU-only trace: no GPU events
    events = json.loads(gzip.decompress(keep.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::matmul" for e in events)
