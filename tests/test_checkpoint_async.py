"""Background checkpoint writes (save_checkpoint(background=True), the fit trainer's saves).

Readers must see finished writes only, the state saved is the state at the call
(not what training did afterwards), a failed write surfaces at the next save or
wait and keeps the previous checkpoint, pruning keeps N, and a process that
ends with a write in flight finishes it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import recon.systems.checkpoint as checkpoint_module
from recon.errors import ReconError
from recon.runs import RunDir
from recon.systems.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    wait_for_checkpoints,
    write_checkpoint_file,
)


def _model_and_adam(seed: int = 0) -> tuple[nn.Module, torch.optim.Adam]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(16, 3)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def held_writes(monkeypatch):
    """torch.save in the checkpoint module blocks until the test sets the returned event (a slow disk)."""
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, path):
        assert release.wait(timeout=30), "the test never released the write"
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_module.torch, "save", slow_save)
    yield release
    release.set()
    wait_for_checkpoints(release_buffers=True)


def _release_soon(release: threading.Event) -> None:
    threading.Timer(0.2, release.set).start()


def test_read_right_after_a_background_save_sees_the_state_at_the_call(tmp_path, held_writes):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _model_and_adam()
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    adam_at_save = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    path = save_checkpoint(run, 7, "fit", {"model": model}, {"adam": optimizer}, background=True)
    assert path == run.checkpoints / "step_000007.pt" and not path.exists()  # still being written
    with torch.no_grad():  # training goes on while the write is in flight
        for p in model.parameters():
            p.mul_(-3.0)
    optimizer.step()
    _release_soon(held_writes)
    checkpoint = load_latest(run)  # waits for the write
    assert checkpoint is not None and checkpoint.step == 7
    for key, value in checkpoint.modules["model"].items():
        assert torch.equal(value, at_save[key]), key
    for index, state in checkpoint.optimizers["adam"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, adam_at_save[index][name]), (index, name)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000007.pt"]


def test_every_reader_waits_for_the_write_in_flight(tmp_path, held_writes):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _model_and_adam()
    path = save_checkpoint(run, 1, "fit", {"model": model}, {"adam": optimizer}, background=True)
    _release_soon(held_writes)
    assert load_checkpoint(path).step == 1  # by path
    path = save_checkpoint(run, 2, "fit", {"model": model}, {"adam": optimizer}, background=True)
    _release_soon(held_writes)
    assert [step for step, _ in list_checkpoints(run)] == [1, 2]


def test_background_and_synchronous_saves_write_the_same_file_contents(tmp_path):
    model, optimizer = _model_and_adam()
    runs = [RunDir.create(tmp_path / name, {}) for name in ("sync", "background")]
    for run, background in zip(runs, (False, True), strict=True):
        torch.manual_seed(5)  # the same RNG state in both checkpoints
        save_checkpoint(run, 3, "coarse", {"model": model}, {"adam": optimizer}, extra={"t": torch.arange(4), "lr": 0.5}, background=background)
    sync, background = (load_latest(run) for run in runs)

    def same(a, b):
        assert type(a) is type(b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b) and getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
            for key in a:
                same(a[key], b[key])
        elif isinstance(a, list | tuple):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        else:
            assert a == b

    for name in ("step", "stage", "modules", "optimizers", "rng", "extra"):
        same(getattr(sync, name), getattr(background, name))
    # the module's state dict keeps its version metadata through the snapshot
    assert getattr(background.modules["model"], "_metadata", None) == getattr(model.state_dict(), "_metadata", None)


def test_failed_background_write_surfaces_at_the_next_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _model_and_adam()
    save_checkpoint(run, 10, "fit", {"model": model}, {"adam": optimizer}, background=True)
    wait_for_checkpoints(run)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    real_save = torch.save

    def crashing_save(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as handle:  # half-written file, then the disk is full
            handle.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    save_checkpoint(run, 20, "fit", {"model": model}, {"adam": optimizer}, background=True)  # returns at once
    with pytest.raises(ReconError, match=r"step_000020\.pt: writing the checkpoint failed \(OSError: disk full\); the previous checkpoint is kept"):
        save_checkpoint(run, 30, "fit", {"model": model}, {"adam": optimizer}, background=True)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000010.pt"]  # no half file, no temporary
    checkpoint = load_latest(run)
    assert checkpoint.step == 10
    for key, value in checkpoint.modules["model"].items():
        assert torch.equal(value, good[key])
    # reported once; saving works again afterwards
    save_checkpoint(run, 30, "fit", {"model": model}, {"adam": optimizer}, background=True)
    wait_for_checkpoints(run)
    assert [step for step, _ in list_checkpoints(run)] == [10, 30]


def test_failed_background_write_surfaces_at_wait(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "run", {})
    model, _ = _model_and_adam()

    def failing_save(obj, path):
        raise OSError("read-only file system")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    save_checkpoint(run, 1, "fit", {"model": model}, background=True)
    with pytest.raises(ReconError, match="step_000001.pt: writing the checkpoint failed"):
        wait_for_checkpoints(run)
    wait_for_checkpoints(run)  # nothing left in flight, nothing raised twice
    assert list_checkpoints(run) == []


def test_background_saves_keep_the_newest_n(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _model_and_adam()
    for step in (100, 200, 300, 1000):
        save_checkpoint(run, step, "fit", {"model": model}, {"adam": optimizer}, keep=2, background=True)
    assert [step for step, _ in list_checkpoints(run)] == [300, 1000]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000300.pt", "step_001000.pt"]
    for step in (1100, 1200):
        save_checkpoint(run, step, "fit", {"model": model}, keep=0, background=True)  # 0 keeps all
    assert [step for step, _ in list_checkpoints(run)] == [300, 1000, 1100, 1200]


def test_a_synchronous_write_waits_for_the_background_one_in_its_folder(tmp_path, held_writes):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _model_and_adam()
    save_checkpoint(run, 5, "fit", {"model": model}, {"adam": optimizer}, background=True)
    _release_soon(held_writes)
    payload = {"format": 1, "step": 6, "stage": "fit", "modules": {}, "optimizers": {}, "rng": {}, "extra": {}}
    write_checkpoint_file(run.checkpoints, 6, payload, keep=1)  # prunes only after step 5 is on disk
    assert [step for step, _ in list_checkpoints(run)] == [6]


def test_a_process_that_fails_with_a_write_in_flight_finishes_it(tmp_path):
    script = textwrap.dedent(
        f"""
        import time, torch
        import recon.systems.checkpoint as checkpoint_module
        from recon.runs import RunDir
        real_save = torch.save
        def slow_save(obj, path):
            time.sleep(1.0)
            real_save(obj, path)
        checkpoint_module.torch.save = slow_save
        run = RunDir.create({str(tmp_path / "run")!r}, {{}})
        checkpoint_module.save_checkpoint(run, 1, "fit", {{"m": torch.nn.Linear(4, 4)}}, background=True)
        raise RuntimeError("crash right after the save call")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "crash right after the save call" in done.stderr
    run = RunDir.open(tmp_path / "run")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000001.pt"]
    assert load_latest(run).modules["m"]["weight"].shape == (4, 4)
