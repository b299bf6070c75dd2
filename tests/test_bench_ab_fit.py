"""bench/ab_fit.py: alternated run order, the numbers it compares and their paired summary."""

from __future__ import annotations

import argparse
import json

import pytest
from script_loading import load_script


def _record(wall: float, fine_ms: float, peak: float | None = 7.0) -> dict:
    return {
        "wall_seconds": wall,
        "outside_phases_s": 3.0,
        "phases_s": {"import libraries": 3.5, "fine": fine_ms * 0.4},
        "stages": {"fine": {"ms_per_step": fine_ms}},
        "peak_gpu_memory_gib": peak,
    }


def test_each_pair_runs_both_installs_and_the_first_alternates():
    script = load_script("bench/ab_fit.py")
    order = script.run_order(("old", "new"), 3)
    assert order == [(0, "old"), (0, "new"), (1, "new"), (1, "old"), (2, "old"), (2, "new")]
    assert script.parse_env("old=/tmp/clean_old") == ("old", "/tmp/clean_old")
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL=PATH"):
        script.parse_env("/tmp/clean_old")


def test_paired_differences_are_taken_within_each_pair():
    script = load_script("bench/ab_fit.py")
    assert script.metrics(_record(50.0, 60.0)) == {
        "wall s": 50.0, "outside the phases s": 3.0, "import libraries s": 3.5, "fine s": 24.0, "fine ms/step": 60.0, "peak GPU GiB": 7.0,
    }  # fmt: skip
    assert "peak GPU GiB" not in script.metrics(_record(50.0, 60.0, peak=None))
    in_process = _record(50.0, 60.0)
    in_process["stages"]["fine"]["parts_ms"] = {
        "step": 58.0, "render": 20.0, "sds": 15.0, "rays": 1e5, "segments_ms": {"128 px x 4, reference 256 px": 57.0},
    }  # fmt: skip
    extra = {k: v for k, v in script.metrics(in_process).items() if k not in script.metrics(_record(50.0, 60.0))}
    assert extra == {"fine step ms": 58.0, "fine render ms": 20.0, "fine sds ms": 15.0, "fine 128 px x 4, reference 256 px ms/step": 57.0}
    walls = {(0, "old"): 50.0, (0, "new"): 48.0, (1, "new"): 56.0, (1, "old"): 55.0, (2, "old"): 52.0}  # pair 2 incomplete
    runs = [{"pair": p, "label": label, "metrics": script.metrics(_record(w, w + 10))} for (p, label), w in walls.items()]
    rows = {row["metric"]: row for row in script.summarise(runs, ("old", "new"))}
    wall = rows["wall s"]
    assert wall["old"] == pytest.approx((157.0 / 3, 50.0, 55.0))
    assert wall["new"] == pytest.approx((52.0, 48.0, 56.0))
    assert wall["difference"] == pytest.approx((-0.5, -2.0, 1.0))  # pairs 0 and 1 only
    assert wall["lower"] == 1
    assert rows["import libraries s"]["difference"] == pytest.approx((0.0, 0.0, 0.0))
    text = script.table(list(rows.values()), ("old", "new"), 2)
    assert "| wall s | 52.33 [50.00, 55.00] | 52.00 [48.00, 56.00] | -0.50 [-2.00, +1.00] | 1 of 2 |" in text


def test_records_are_written_after_every_run_so_a_cut_command_keeps_them(tmp_path, monkeypatch, capsys):
    script = load_script("bench/ab_fit.py")
    walls = iter([50.0, 48.0])

    def fake_run_fit(image, pythonpath, fit_args, out, in_process=False):
        wall = next(walls, None)
        if wall is None:
            raise SystemExit("cut short")  # as a time limit ends the command during the third run
        return _record(wall, 60.0)

    monkeypatch.setattr(script, "run_fit", fake_run_fit)
    out = tmp_path / "ab.json"
    argv = ["ab_fit.py", "robot.png", "--env", "old=/a", "--env", "new=/b", "--pairs", "2", "--no-warmup", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match="cut short"):
        script.main()
    saved = json.loads(out.read_text())
    assert [(run["pair"], run["label"], run["metrics"]["wall s"]) for run in saved["runs"]] == [(0, "old", 50.0), (0, "new", 48.0)]
    assert "pair 0 new: 48.0 s (fine 60.0 ms/step)" in capsys.readouterr().out
