"""bench/prior_overfit.py end to end on the CPU with the random tiny network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from script_loading import ROOT

from recon.data.synth import object_seed


def _run(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/prior_overfit.py", "--weights", "random-tiny", "--objects", "2", "--views", "3", "--size", "64",
               "--steps", "2", "--pairs", "6", "--workers", "1", "--work", str(tmp_path / "work"), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_scores_the_training_objects_of_one_family_against_the_held_out_ones(tmp_path):
    done = _run(tmp_path, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    # the recipe's training objects of the family (every 4th from index 0 for blob), and its held-out set (seed + 1)
    for folder, seeds in (("trained", [object_seed(0, 0), object_seed(0, 4)]), ("heldout", [object_seed(1, 0), object_seed(1, 1)])):
        meta = [json.loads((tmp_path / "work" / folder / f"{k:05d}" / "object.json").read_text()) for k in range(2)]
        assert [m["object_seed"] for m in meta] == seeds and {m["family"] for m in meta} == {"blob"}
        assert all(m["config"]["orbit"] for m in meta)
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["sets"]) == ["training objects", "held-out objects"]
    for row in report["sets"].values():
        assert {"base", "copy-input", "mean-image"} <= set(row["scores"])
        assert row["pose_use"]["gap"] == pytest.approx(row["pose_use"]["shuffled_pose"] / row["pose_use"]["true"] - 1.0)
    assert "| training objects |" in done.stdout and "| held-out objects |" in done.stdout


def test_a_family_outside_the_training_families_is_refused(tmp_path):
    done = _run(tmp_path, "--family", "teapot")
    assert done.returncode != 0 and "--family 'teapot' is not one of --families" in done.stderr
