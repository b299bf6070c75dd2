"""bench/fit.py: the bytecode record and the whole-command mode's failure message."""

from __future__ import annotations

import importlib
import py_compile
import sys
from pathlib import Path

import pytest
from script_loading import load_script

bench = load_script("bench/fit.py")


def _package(root: Path, name: str) -> Path:
    init = root / name / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("VALUE = 1\n")
    return init


def test_bytecode_state_sees_compiled_and_missing_bytecode(tmp_path, monkeypatch):
    compiled = _package(tmp_path, "bench_pkg_compiled")
    _package(tmp_path, "bench_pkg_source_only")
    py_compile.compile(str(compiled), cfile=importlib.util.cache_from_source(str(compiled)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench, "BYTECODE_PACKAGES", ("bench_pkg_compiled", "bench_pkg_source_only", "bench_pkg_not_installed"))
    state = bench.bytecode_state()
    assert state["cached"] == {"bench_pkg_compiled": True, "bench_pkg_source_only": False, "bench_pkg_not_installed": False}
    assert state["dont_write"] is sys.dont_write_bytecode


def test_command_mode_reports_the_commands_own_error(tmp_path):
    missing = tmp_path / "no-such-image.png"
    with pytest.raises(SystemExit, match=r"recon fit exited with code [1-9].*no-such-image\.png"):
        bench.run_command(missing, "cpu", "cpu", [], "random-tiny", tmp_path / "out", steps=2)


def test_point_counts_follow_the_sampler_and_the_renderer_calls():
    from types import SimpleNamespace

    import torch

    calls = []
    renderer = SimpleNamespace(
        render_rays=lambda origins, *a, **k: (calls.append("render"), trainer.renderer.occupancy._visible(origins, None, torch.zeros(7)),
                                              trainer.field.density(torch.zeros(5, 3)))[-1],
        _shade_packed=lambda origins, directions, background, ray_indices, *a, **k: calls.append("shade"),
        occupancy=SimpleNamespace(_visible=lambda origins, directions, ray_ids, *a, **k: calls.append("visible")),
    )  # fmt: skip
    trainer = SimpleNamespace(renderer=renderer, field=SimpleNamespace(density=lambda points: calls.append("density")), _bench_counts=None)
    trainer._bench_counts = dict.fromkeys(bench.COUNTS, 0)
    bench.StepTimer._count_points(trainer)
    trainer.renderer.render_rays(torch.zeros(11, 3))
    trainer.renderer._shade_packed(None, None, None, torch.zeros(3))
    trainer.field.density(torch.zeros(2, 3))  # outside a render: not the sampler's
    assert calls == ["render", "visible", "density", "shade", "density"]
    assert trainer._bench_counts == {"rays": 11, "candidates": 7, "sampled": 5, "shaded": 3, "in_render": False}


def test_summary_gives_each_render_size_segment_its_own_ms_per_step(monkeypatch):
    import torch

    class Event:  # a recorded CUDA event at time t (ms)
        def __init__(self, t: float) -> None:
            self.t = t

        def elapsed_time(self, other: Event) -> float:
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timer = bench.StepTimer()
    warm = bench.WARMUP_STEPS
    durations = [100.0] * warm + [40.0, 44.0] + [300.0] * warm + [80.0, 90.0]  # a new segment starts slow too
    segments = ["128 px x 4"] * (warm + 2) + ["256 px x 2"] * (warm + 2)
    clock = 0.0
    for ms, segment in zip(durations, segments, strict=True):
        timer.steps["fine"].append({"start": Event(clock), "end": Event(clock + ms), "segment": segment, **dict.fromkeys(bench.COUNTS, 1)})
        clock += ms
    fine = timer.summary()["fine"]
    assert fine["segments_ms"] == {"128 px x 4": 42.0, "256 px x 2": 85.0}  # each segment's first steps left out
    assert fine["steps_timed"] == warm + 4 and fine["step"] == pytest.approx((254.0 + 300.0 * warm) / (warm + 4), abs=0.01)  # rounded to 0.01
