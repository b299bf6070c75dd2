"""Scale-out batches on one machine (`recon batch --gpus` / `--device cpu --workers N`): dynamic hand-out,
crashed workers replaced and their image retried once, nothing finished twice, Ctrl-C and resume, flags.

The pool tests use stand-in fit functions (module-level, so spawned workers import them) that write a
finished run folder and append the image to ``completions.log``; the end-to-end test runs the real CLI
with tiny random models. Imports stay light here: every worker process imports this module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from recon.errors import InputError, ReconError
from recon.systems.workers import (
    WorkerSpec,
    cpu_quota,
    cpu_shares,
    cpu_workers,
    gpu_workers,
    is_fatal,
    local_workers,
    parse_cpu_list,
    physical_cores,
    run_pool,
    share_cpus,
)

# Each worker gets its own environment (GPU workers: CUDA_VISIBLE_DEVICES); the stand-in records what it saw.
CPU2 = [WorkerSpec("cpu0", "cpu", (("RECON_TEST_WORKER", "zero"),)), WorkerSpec("cpu1", "cpu", (("RECON_TEST_WORKER", "one"),))]


def _write_run(run_dir: Path, status: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("{}")
    (run_dir / "progress.json").write_text(json.dumps({"stage": "fine", "step": 1, "total": 2, "status": status}))


def stand_in(device: str):
    """A fit function whose behaviour the image name picks: bad, kill (first try), always (killed every try),
    cuda (a CUDA error every try), late (killed after finishing, before reporting), slow, else fine."""

    def fit_one(image: Path, run_dir: Path, retry: bool) -> dict:
        name = image.stem
        if name.startswith("bad"):
            raise InputError(f"{image}: not an image file")
        if name.startswith("cuda"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        if (name.startswith("kill") and not retry) or name.startswith("always"):
            _write_run(run_dir, "running")
            os.kill(os.getpid(), signal.SIGKILL)
        _write_run(run_dir, "running")
        try:
            time.sleep(1.5 if name.startswith("slow") else 0.1)
        except KeyboardInterrupt:
            _write_run(run_dir, "interrupted")
            raise
        _write_run(run_dir, "finished")
        (run_dir / "env.txt").write_text(os.environ.get("RECON_TEST_WORKER", ""))
        with open(run_dir.parent / "completions.log", "a") as log:
            log.write(name + "\n")
        if name.startswith("late"):
            os.kill(os.getpid(), signal.SIGKILL)
        return {"exports": {"ply": run_dir / "mesh.ply"}, "timings_s": {"fit": 0.1}}

    return fit_one


def broken(device: str):
    """A factory that cannot load its models."""
    raise ReconError("guidance weights not found: /nowhere")


def _images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return sorted(folder / name for name in names)


def _completions(out: Path) -> list[str]:
    log = out / "completions.log"
    return sorted(log.read_text().split()) if log.is_file() else []


def test_pool_retries_crashed_workers_once_and_finishes_nothing_twice(tmp_path):
    names = ["a.png", "bad.png", "kill.png", "always.png", "cuda.png", "late.png", "z.png"]
    out = tmp_path / "out"
    results = run_pool(_images(tmp_path / "in", names), out, stand_in, CPU2, poll_s=0.1, grace_s=2)
    by = {r.image.name: r for r in results}
    assert [r.image.name for r in results] == sorted(names)
    assert {n: r.status for n, r in by.items()} == {
        "a.png": "finished", "always.png": "failed", "bad.png": "failed", "cuda.png": "failed",
        "kill.png": "finished", "late.png": "finished", "z.png": "finished",
    }
    assert by["bad.png"].error.endswith("bad.png: not an image file") and by["bad.png"].attempts == 1
    assert by["kill.png"].attempts == 2 and by["kill.png"].exports["ply"].endswith("mesh.ply")
    assert by["always.png"].attempts == 2 and by["always.png"].error == "worker crashed twice; last: killed by SIGKILL"
    assert by["cuda.png"].attempts == 2 and "RuntimeError: CUDA error: an illegal memory access" in by["cuda.png"].error
    for r in results:
        if r.status == "finished":
            assert (r.run_dir / "env.txt").read_text() == {"cpu0": "zero", "cpu1": "one"}[r.worker]
    assert "RECON_TEST_WORKER" not in os.environ
    # late.png finished before its worker died: recorded from its run folder, not fitted again
    assert _completions(out) == ["a", "kill", "late", "z"]
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["counts"] == {"finished": 4, "skipped": 0, "failed": 3}
    assert [(Path(r["image"]).name, r["status"]) for r in summary["images"]] == [(r.image.name, r.status) for r in results]
    assert {w["label"] for w in summary["workers"]} == {"cpu0", "cpu1"}
    assert sum(w["restarts"] for w in summary["workers"]) >= 4 and all(w["image"] is None for w in summary["workers"])

    # a second batch skips what finished and retries only the failures
    again = run_pool(_images(tmp_path / "in", names), out, stand_in, CPU2[:1], poll_s=0.1, grace_s=2)
    assert [r.status for r in again if r.image.name in ("a.png", "kill.png", "late.png", "z.png")] == ["skipped"] * 4
    assert _completions(out) == ["a", "kill", "late", "z"]


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for one test. Python does not install it when it starts with
    SIGINT ignored, as in a background job of a shell without job control, where Ctrl-C could not be tested."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_workers_and_a_rerun_resumes(tmp_path, sigint_raises):
    names = [f"slow{i}.png" for i in range(4)]
    images, out = _images(tmp_path / "in", names), tmp_path / "out"

    def interrupt_after_first_finish() -> None:
        summary = out / "batch_summary.json"
        for _ in range(600):
            if summary.is_file() and '"status": "finished"' in summary.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt_after_first_finish, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        run_pool(images, out, stand_in, CPU2, poll_s=0.1, grace_s=1)
    watcher.join()
    summary = json.loads((out / "batch_summary.json").read_text())
    statuses = [r["status"] for r in summary["images"]]
    assert "finished" in statuses and set(statuses) <= {"finished", "interrupted", "pending"}
    assert "interrupted" in statuses or "pending" in statuses
    done_first = _completions(out)

    results = run_pool(images, out, stand_in, CPU2, poll_s=0.1, grace_s=1)
    assert all(r.status == ("skipped" if r.image.stem in done_first else "finished") for r in results)
    assert _completions(out) == [f"slow{i}" for i in range(4)]  # each image completed exactly once


def test_a_worker_that_cannot_load_its_models_stops_the_batch(tmp_path):
    with pytest.raises(ReconError, match="worker cpu0 \\(cpu\\) could not start: guidance weights not found"):
        run_pool(_images(tmp_path / "in", ["a.png"]), tmp_path / "out", broken, CPU2[:1], poll_s=0.1, grace_s=1)


def test_gpu_and_worker_flags():
    assert [(w.label, w.device, w.env) for w in gpu_workers("all", 2)] == [
        ("gpu0", "cuda:0", (("CUDA_VISIBLE_DEVICES", "0"),)), ("gpu1", "cuda:0", (("CUDA_VISIBLE_DEVICES", "1"),)),
    ]
    assert [w.label for w in gpu_workers("2", 4)] == ["gpu0", "gpu1"]
    assert [w.label for w in gpu_workers("0,2", 4)] == ["gpu0", "gpu2"]
    for spec, message in (("5", "has 4 GPU"), ("0,0", "distinct"), ("1,7", "0..3"), ("two", "comma-separated"), ("0", "has 4 GPU")):
        with pytest.raises(ReconError, match=message):
            gpu_workers(spec, 4)
    with pytest.raises(ReconError, match="no CUDA GPU"):
        gpu_workers("all", 0)
    # --gpus 0,2 --workers 5: round robin over the GPUs, the first images on different GPUs
    spread = gpu_workers("0,2", 4, 5)
    assert [w.label for w in spread] == ["gpu0.0", "gpu2.0", "gpu0.1", "gpu2.1", "gpu0.2"]
    assert [dict(w.env)["CUDA_VISIBLE_DEVICES"] for w in spread] == ["0", "2", "0", "2", "0"]
    assert [w.label for w in gpu_workers("2", 2, 3)] == ["gpu0.0", "gpu1.0", "gpu0.1"]
    assert [w.label for w in gpu_workers("2", 2, 2)] == ["gpu0", "gpu1"]
    with pytest.raises(ReconError, match="at least one worker per GPU \\(2\\)"):
        gpu_workers("all", 2, 1)
    assert [w.label for w in local_workers(None, 3, "cpu")] == ["cpu0", "cpu1", "cpu2"]
    with pytest.raises(ReconError, match="add --device cpu"):
        local_workers(None, 2, "auto")
    with pytest.raises(ReconError, match="--device cpu --workers N instead"):
        local_workers("all", None, "cpu")


def test_cpu_lists_and_physical_cores(tmp_path):
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5]
    # 4 cores with hyperthreads numbered as on most x86 machines: CPU i and i + 4 share a core; cpu7 has no topology
    for cpu in range(7):
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    assert physical_cores(range(8), tmp_path) == [(0, 4), (1, 5), (2, 6), (3,), (7,)]
    assert physical_cores([6, 2, 1], tmp_path) == [(1,), (2, 6)]


def test_a_containers_cpu_quota_caps_the_cores_shared(tmp_path, monkeypatch):
    limit = tmp_path / "cpu.max"
    assert cpu_quota(limit) is None  # no cgroup file
    limit.write_text("max 100000\n")
    assert cpu_quota(limit) is None  # no quota
    limit.write_text("250000 100000\n")
    assert cpu_quota(limit) == 3  # 2.5 CPUs: 3 threads may run, at 5/6 of the time

    from recon.systems import workers

    monkeypatch.setattr(workers, "usable_cpus", lambda: list(range(8)))
    monkeypatch.setattr(workers, "physical_cores", lambda cpus: [(cpu,) for cpu in cpus])
    monkeypatch.setattr(workers, "cpu_quota", lambda: 4)  # a container on an 8-core host limited to 4 CPUs
    assert [(spec.cpus, spec.threads) for spec in share_cpus(cpu_workers(2))] == [((0, 1), 2), ((2, 3), 2)]


def test_cpu_shares_are_whole_cores_split_evenly():
    cores = [(0, 16), (1, 17), (2, 18), (3, 19), (4, 20)]
    assert cpu_shares(2, cores) == [((0, 16, 1, 17, 2, 18), 3), ((3, 19, 4, 20), 2)]
    assert cpu_shares(1, cores) == [((0, 16, 1, 17, 2, 18, 3, 19, 4, 20), 5)]
    assert cpu_shares(2, [(0,), (1,)]) == [((0,), 1), ((1,), 1)]
    assert cpu_shares(3, [(0,), (1,)]) == [((0, 1), 1)] * 3  # more workers than cores: all of them, one thread each
    gpus = [WorkerSpec("gpu0", "cuda:0", (("CUDA_VISIBLE_DEVICES", "0"),)), WorkerSpec("gpu1", "cuda:0", (("CUDA_VISIBLE_DEVICES", "1"),))]
    specs = share_cpus(gpus, [(0, 4), (1, 5), (2, 6), (3, 7)])
    assert [(w.cpus, w.threads) for w in specs] == [((0, 4, 1, 5), 2), ((2, 6, 3, 7), 2)]
    threads = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    assert [dict(w.env) for w in specs] == [{"CUDA_VISIBLE_DEVICES": "0", **threads}, {"CUDA_VISIBLE_DEVICES": "1", **threads}]
    fixed = WorkerSpec("cpu0", "cpu", cpus=(1,), threads=1)
    assert share_cpus([fixed], [(0,), (1,)]) == [fixed]


def report_cpus(device: str):
    """A fit function that records the CPUs, thread-pool variable and torch threads its worker process runs with."""

    def fit_one(image: Path, run_dir: Path, retry: bool) -> dict:
        _write_run(run_dir, "finished")
        torch = sys.modules.get("torch")
        (run_dir / "cpus.json").write_text(json.dumps({
            "cpus": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads() if torch else None, "pid": os.getpid(),
        }))
        time.sleep(0.3)
        return {}

    return fit_one


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity (Linux)")
def test_each_worker_runs_on_its_own_share_of_the_cores(tmp_path):
    out, before, omp_before = tmp_path / "out", os.sched_getaffinity(0), os.environ.get("OMP_NUM_THREADS")
    results = run_pool(_images(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"]), out, report_cpus, cpu_workers(2), poll_s=0.1, grace_s=2)
    assert os.sched_getaffinity(0) == before and os.environ.get("OMP_NUM_THREADS") == omp_before  # the parent is untouched
    expected = share_cpus(cpu_workers(2))
    if len(physical_cores(before)) >= 2:
        assert set(expected[0].cpus).isdisjoint(expected[1].cpus) and set(expected[0].cpus) | set(expected[1].cpus) == before
    summary = {w["label"]: w for w in json.loads((out / "batch_summary.json").read_text())["workers"]}
    for result in results:
        spec = next(w for w in expected if w.label == result.worker)
        seen = json.loads((result.run_dir / "cpus.json").read_text())
        assert seen["cpus"] == sorted(spec.cpus) and seen["omp"] == str(spec.threads) and seen["torch_threads"] == spec.threads
        assert summary[spec.label]["cpus"] == list(spec.cpus) and summary[spec.label]["threads"] == spec.threads
        assert result.status == "finished" and time.time() - 600 < result.started_at <= time.time()


def test_cuda_errors_and_out_of_memory_replace_the_worker():
    import torch

    assert is_fatal(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_fatal(RuntimeError("shape mismatch")) and not is_fatal(InputError("x.png: not an image"))


def kill_a_busy_worker(out: Path, killed: list[str], timeout_s: float = 900.0) -> threading.Thread:
    """Starts a thread that SIGKILLs the first worker that ``out/batch_summary.json`` shows holding an image whose
    run folder has begun training, and appends that image's path to ``killed``."""

    def watch() -> None:
        summary_path, deadline = out / "batch_summary.json", time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                summary = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                summary = {}
            runs = {r["image"]: Path(r["run_dir"]) for r in summary.get("images", [])}
            for worker in summary.get("workers", []):
                progress = runs[worker["image"]] / "progress.json" if worker.get("image") and worker.get("pid") else None
                if progress is not None and progress.is_file() and '"stage": null' not in progress.read_text():
                    os.kill(worker["pid"], signal.SIGKILL)
                    killed.append(worker["image"])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def check_scaled_out_batch(out: Path, killed: list[str], good: list[str], corrupt: str) -> None:
    """The summary of a scaled-out batch of ``good`` images and one ``corrupt`` one, a worker killed mid-image."""
    summary = json.loads((out / "batch_summary.json").read_text())
    by_name = {Path(r["image"]).name: r for r in summary["images"]}
    assert sorted(by_name) == sorted([*good, corrupt])
    assert by_name[corrupt]["status"] == "failed" and corrupt in by_name[corrupt]["error"] and by_name[corrupt]["attempts"] == 1
    assert len(killed) == 1 and Path(killed[0]).name in good
    for name in good:
        record = by_name[name]
        assert record["status"] == "finished", record
        assert record["attempts"] == (2 if name == Path(killed[0]).name else 1)
        assert Path(record["exports"]["ply"]).is_file()
        assert json.loads((Path(record["run_dir"]) / "progress.json").read_text())["status"] == "finished"
    assert summary["counts"] == {"finished": len(good), "skipped": 0, "failed": 1}
    assert (out / "report.html").is_file()
