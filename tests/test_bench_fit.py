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
