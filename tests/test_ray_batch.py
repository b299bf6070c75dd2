"""`recon batch --ray`: the same batch as Ray actors on a local cluster (2 CPUs), a corrupt image and an actor
killed mid-image; stand-in fit functions for the retry rules; the install hint without Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_workers import _completions, _images, check_scaled_out_batch, kill_a_busy_worker, stand_in

from recon.cli.main import main


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs whose workers can import the test modules."""
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).resolve().parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield ray
    ray.shutdown()


def test_without_ray_the_flag_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    _images(tmp_path / "in", ["a.png"])
    code = main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--ray", "--device", "cpu", "--quiet"])
    assert code == 2
    assert 'pip install ".[ray]"' in capsys.readouterr().err


def test_each_actor_reserves_its_share_of_the_cpus():
    from recon.systems.ray_batch import cpus_per_actor

    assert cpus_per_actor([{"CPU": 32.0, "GPU": 2.0}], True, 2) == 16  # a GPU actor: the CPUs per GPU
    assert cpus_per_actor([{"CPU": 64.0, "GPU": 8.0}], True, 3) == 8  # also when fewer actors than GPUs run
    assert cpus_per_actor([{"CPU": 2.0}], False, 2) == 1 and cpus_per_actor([{"CPU": 8.0}], False, 3) == 2
    assert cpus_per_actor([{"CPU": 2.0}], False, 5) == 1  # more CPU actors than CPUs: one each (some wait)
    # per node, not the cluster's totals: a CPU-only head's CPUs are no use to a GPU actor, and no node has 16
    assert cpus_per_actor([{"CPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}], True, 4) == 8
    assert cpus_per_actor([{"CPU": 16.0}, {"CPU": 16.0}], False, 1) == 16
    assert cpus_per_actor([{"CPU": 3.0}, {"CPU": 3.0}], False, 3) == 1  # 2 each would seat only 2 actors


@pytest.mark.slow
def test_ray_actors_retry_crashes_once_and_finish_nothing_twice(tmp_path, local_ray):
    from recon.systems.ray_batch import run_ray

    names = ["a.png", "bad.png", "kill.png", "always.png", "late.png"]
    out = tmp_path / "out"
    results = run_ray(_images(tmp_path / "in", names), out, stand_in, "local", "cpu", workers=2, poll_s=0.1)
    assert {r.image.name: (r.status, r.attempts) for r in results} == {
        "a.png": ("finished", 1), "always.png": ("failed", 2), "bad.png": ("failed", 1), "kill.png": ("finished", 2), "late.png": ("finished", 1),
    }
    assert results[1].error == "worker crashed twice; last: Ray actor died (ActorDiedError)"
    assert _completions(out) == ["a", "kill", "late"]
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["counts"] == {"finished": 3, "skipped": 0, "failed": 2}
    assert sorted(w["label"] for w in summary["workers"]) == ["ray0", "ray1"]


@pytest.mark.slow
def test_cli_batch_on_a_local_ray_cluster_with_a_killed_actor(tmp_path, local_ray):
    from test_batch import SCALE_OUT, _scale_out_folder, batch_args

    folder, out, killed = _scale_out_folder(tmp_path), tmp_path / "out", []
    watcher = kill_a_busy_worker(out, killed)
    extra = [arg for item in SCALE_OUT for arg in ("--set", item)]
    assert main(batch_args(folder, out, *extra, "--ray")) == 1
    watcher.join(timeout=1)
    check_scaled_out_batch(out, killed, ["a.png", "b.png", "c.png"], "bad.png")
