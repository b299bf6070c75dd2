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


def test_window_report_splits_gpu_time_by_launch_and_blames_long_gaps_on_their_operator():
    window_report = load_script("bench/profile_fit.py").window_report
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "step 0", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "step 1", "ts": 100, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "Graphed", "ts": 10, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 12, "dur": 5, "tid": 1, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "conv", "ts": 40, "dur": 20, "args": {"correlation": 1}},  # 40 us idle before
        {"ph": "X", "cat": "kernel", "name": "norm", "ts": 60, "dur": 20, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "ts": 150, "dur": 10, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 152, "dur": 3, "tid": 1, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 170, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "kernel", "name": "mul", "ts": 300, "dur": 10, "args": {"correlation": 2}},  # 220 us idle before
        {"ph": "X", "cat": "cpu_op", "name": "MulBackward0", "ts": 305, "dur": 10, "tid": 2},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 306, "dur": 2, "tid": 2, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "scatter", "ts": 320, "dur": 5, "args": {"correlation": 3}},  # 10 us idle before
    ]}  # fmt: skip
    report = window_report(trace)
    assert report["steps"] == [("step 0", 0.1, 0.0), ("step 1", 0.1, 0.02)]
    assert report["busy_ms"] == pytest.approx(0.055) and report["span_ms"] == pytest.approx(0.325)
    assert report["idle_ms"] == pytest.approx(0.27)
    launches = {label: pytest.approx(values) for label, values in report["launches"].items()}
    assert launches == {"cudaGraphLaunch in Graphed": [2, 0.04, 0.04], "cudaLaunchKernel": [1, 0.01, 0.0], "cuLaunchKernelEx": [1, 0.005, 0.01]}
    assert report["long_gaps"] == {"aten::mul": [1, pytest.approx(0.22)]}
    with pytest.raises(ValueError, match="no user annotation named 'step '"):
        window_report({"traceEvents": []})


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
