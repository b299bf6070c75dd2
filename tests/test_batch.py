"""`recon batch`: sorted stem-named run folders, failures isolated and summarised, finished runs skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fit import TINY, make_rgba, shared_models  # noqa: F401 - shared_models is a fixture

from recon.cli.main import main
from recon.systems.batch import ImageResult, run_batch, run_names


def batch_args(folder: Path, out: Path, *extra: str) -> list[str]:
    args = ["batch", str(folder), "-o", str(out), "--preset", "cpu", "--model", "random-tiny", "--device", "cpu", "--quiet"]
    for item in [*TINY, "turntable=false", "preview_every=0"]:
        args += ["--set", item]
    return args + ["--format", "ply", *extra]


def test_run_names_are_stems_with_collisions_resolved():
    images = [Path("a/cat.png"), Path("b/cat.png"), Path("cat.jpg"), Path("b/cat.jpg"), Path("dog.webp")]
    assert run_names(images) == ["cat", "cat-png", "cat-jpg", "cat-jpg-2", "dog"]


def test_run_batch_isolates_failures_and_skips_finished(tmp_path):
    calls = []

    def fit_one(image, run_dir):
        calls.append(image.name)
        if image.name == "bad.png":
            raise ValueError("boom\nsecond line")
        (run_dir).mkdir(parents=True)
        (run_dir / "config.yaml").write_text("{}")
        (run_dir / "progress.json").write_text(json.dumps({"status": "finished"}))
        return {"exports": {"glb": run_dir / "mesh.glb"}}

    images = [tmp_path / "a.png", tmp_path / "bad.png", tmp_path / "c.png"]
    results = run_batch(images, tmp_path / "out", fit_one)
    assert [r.status for r in results] == ["finished", "failed", "finished"]
    assert results[1].error == "ValueError: boom"
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert summary["counts"] == {"finished": 2, "skipped": 0, "failed": 1}
    assert summary["images"][0]["exports"]["glb"].endswith("mesh.glb")
    calls.clear()
    results = run_batch(images, tmp_path / "out", fit_one)
    assert [r.status for r in results] == ["skipped", "failed", "skipped"] and calls == ["bad.png"]
    results = run_batch(images, tmp_path / "out", fit_one, overwrite=True)
    assert calls[1:] == ["a.png", "bad.png", "c.png"] and isinstance(results[0], ImageResult)


def test_run_batch_stops_on_ctrl_c(tmp_path):
    def fit_one(image, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "out", fit_one)


def test_batch_over_a_folder_with_bad_files(tmp_path, shared_models, capsys):  # noqa: F811
    folder = tmp_path / "photos"
    folder.mkdir()
    make_rgba(folder / "b_good.png")
    good_bytes = (folder / "b_good.png").read_bytes()
    (folder / "a_corrupt.png").write_bytes(good_bytes[:60])  # truncated PNG
    (folder / "c_pointer.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n")
    (folder / "notes.txt").write_text("not an image; ignored by the folder listing")
    out = tmp_path / "out"

    assert main(batch_args(folder, out)) == 1
    summary = json.loads((out / "batch_summary.json").read_text())
    by_name = {Path(r["image"]).name: r for r in summary["images"]}
    assert list(by_name) == ["a_corrupt.png", "b_good.png", "c_pointer.png"]
    assert by_name["b_good.png"]["status"] == "finished" and (out / "b_good" / "exports" / "mesh.ply").is_file()
    for name in ("a_corrupt.png", "c_pointer.png"):
        assert by_name[name]["status"] == "failed"
        assert name in by_name[name]["error"]
        assert not (out / Path(name).stem).exists()
    assert summary["counts"] == {"finished": 1, "skipped": 0, "failed": 2}
    assert by_name["b_good.png"]["timings_s"]["coarse"] > 0
    err = capsys.readouterr().err
    assert "a_corrupt.png" in err and "c_pointer.png" in err

    # a second run skips the finished image and still reports the failures
    mtime = (out / "b_good" / "exports" / "mesh.ply").stat().st_mtime_ns
    assert main(batch_args(folder, out)) == 1
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [r["status"] for r in summary["images"]] == ["failed", "skipped", "failed"]
    assert (out / "b_good" / "exports" / "mesh.ply").stat().st_mtime_ns == mtime


def test_fit_given_several_images_runs_them_as_a_batch(tmp_path, shared_models):  # noqa: F811
    from recon.api import fit

    one, two = make_rgba(tmp_path / "one.png"), make_rgba(tmp_path / "two.png", size=40)
    overrides = [*TINY, "turntable=false", "preview_every=0", "stages.coarse.steps=1", "stages.fine.steps=1"]
    results = fit([two, one], tmp_path / "out", "cpu", overrides, model="random-tiny", formats="ply", device="cpu", quiet=True)
    assert [r.image.name for r in results] == ["one.png", "two.png"]
    assert [r.status for r in results] == ["finished", "finished"]
    assert (tmp_path / "out" / "batch_summary.json").is_file()


def _scale_out_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        make_rgba(folder / name)
    (folder / "bad.png").write_bytes((folder / "a.png").read_bytes()[:60])  # truncated PNG
    return folder


# The cpu preset cut further (1 + 2 steps, a few bake views): the scaled-out tests time the pool, not the fit.
SCALE_OUT = ["stages.coarse.steps=1", "stages.fine.steps=2", "export.bake_views=4", "export.bake_view_resolution=32"]


@pytest.mark.slow
def test_batch_on_cpu_workers_survives_a_killed_worker(tmp_path):
    """`recon batch --device cpu --workers 2`: a worker killed mid-image is replaced and the image retried once."""
    from test_workers import check_scaled_out_batch, kill_a_busy_worker

    folder, out, killed = _scale_out_folder(tmp_path), tmp_path / "out", []
    watcher = kill_a_busy_worker(out, killed)
    extra = [arg for item in SCALE_OUT for arg in ("--set", item)]
    assert main(batch_args(folder, out, "--workers", "2", *extra)) == 1
    watcher.join(timeout=1)
    check_scaled_out_batch(out, killed, ["a.png", "b.png", "c.png"], "bad.png")
    summary = json.loads((out / "batch_summary.json").read_text())
    assert sorted(w["label"] for w in summary["workers"]) == ["cpu0", "cpu1"]
