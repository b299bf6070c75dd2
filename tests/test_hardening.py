"""Issue 10: never touch what recon did not write, never read outside the dataset, one line instead of a traceback.

CLI-level where the user meets the case; every test also checks that stderr holds no traceback.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from test_fit import TINY, fit_args, make_rgba, shared_models  # noqa: F401 - shared_models is a fixture

import recon.cli.main as cli_main
from recon.cli.main import main
from recon.data.transforms_json import read_transforms
from recon.errors import InputError, ReconError
from recon.runs import MANIFEST, RunDir
from recon.systems.checkpoint import list_checkpoints, load_latest, save_checkpoint
from recon.systems.fit import Trainer


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


# ------------------------------------------------------------------ 1. run-folder ownership
def test_overwrite_leaves_a_folder_recon_did_not_make_untouched(tmp_path, capsys):
    image = make_rgba(tmp_path / "disc.png")
    folder = tmp_path / "out" / "disc"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "notes.txt").write_text("thesis notes")
    (folder / "docs").mkdir()
    (folder / "docs" / "letter.odt").write_bytes(b"letter")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    for extra in (["--overwrite"], ["--resume"], []):
        assert main(fit_args(image, tmp_path / "out", *extra)) == 2
        err = _err(capsys)
        assert str(folder) in err and "recon did not write" in err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert (folder / "notes.txt").read_text() == "thesis notes" and (folder / "config.yaml").read_text() == "my: own config\n"


def test_remove_owned_deletes_only_listed_files(tmp_path):
    run = RunDir.create(tmp_path / "run", {"steps": 1})
    marker = json.loads(run.marker_path.read_text())
    assert json.loads(run.manifest_path.read_text())["run_id"] == marker["run_id"] == run.read_meta()["run_id"]
    save_checkpoint(run, 1, "fit", {"m": torch.nn.Linear(2, 2)})
    run.file("previews/step_000001.png").write_bytes(b"png")
    (run.root / "notes.txt").write_text("mine")  # the user's, added later
    (run.exports / "keep.blend").write_bytes(b"blend")
    kept = run.remove_owned()
    assert kept == sorted([run.root / "notes.txt", run.exports / "keep.blend"])
    assert sorted(p.name for p in run.root.iterdir()) == ["exports", "notes.txt"]
    # the folder is no longer a run: a second --overwrite refuses instead of deleting
    with pytest.raises(ReconError, match="not a run folder recon made"):
        RunDir(run.root).remove_owned()


def test_remove_owned_refuses_links_and_foreign_checkpoints(tmp_path):
    run = RunDir.create(tmp_path / "run", {"steps": 1})
    (run.checkpoints / "step_000099.pt").write_bytes(b"someone else's")
    with pytest.raises(ReconError, match=r"checkpoints: holds files recon did not write \(step_000099.pt\)"):
        run.remove_owned()
    assert run.config_path.is_file() and run.marker_path.is_file()  # nothing deleted
    link = tmp_path / "link"
    link.symlink_to(run.root)
    with pytest.raises(ReconError, match="symbolic link"):
        RunDir(link).remove_owned()
    # a tampered manifest cannot name files outside the run folder
    outside = tmp_path / "precious.txt"
    outside.write_text("x")
    manifest = json.loads(run.manifest_path.read_text())
    manifest["files"] += ["../precious.txt", str(outside)]
    run.manifest_path.write_text(json.dumps(manifest))
    (run.checkpoints / "step_000099.pt").unlink()
    run.remove_owned()
    assert outside.read_text() == "x"


def test_overwrite_of_a_symlinked_run_folder_is_refused_in_one_line(tmp_path, capsys):
    image = make_rgba(tmp_path / "disc.png")
    real = RunDir.create(tmp_path / "elsewhere", {"steps": 1})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "disc").symlink_to(real.root)
    assert main(fit_args(image, tmp_path / "out", "--overwrite")) == 2
    assert "symbolic link" in _err(capsys)
    assert real.config_path.is_file()


# ------------------------------------------------------------------ 2. fit-views into a user's folder
def test_fit_views_refuses_a_folder_with_the_users_files(tmp_path, capsys):
    (tmp_path / "scene").mkdir()
    (tmp_path / "scene" / "transforms.json").write_text("{}")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "meta.json").write_text('{"mine": 1}')
    (out / "metrics.json").write_text('{"mine": 2}')
    assert main(["fit-views", str(tmp_path / "scene" / "transforms.json"), "-o", str(out), "--device", "cpu"]) == 2
    assert str(out) in _err(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "metrics.json"]
    assert (out / "meta.json").read_text() == '{"mine": 1}'


# ------------------------------------------------------------------ 3. paths inside the dataset
def _png(path, size=32):
    Image.fromarray(np.full((size, size, 4), 200, np.uint8), "RGBA").save(path)
    return path


def _dataset(tmp_path, file_path):
    folder = tmp_path / "scene"
    folder.mkdir(exist_ok=True)
    _png(folder / "ok.png")
    frames = [{"file_path": "ok", "transform_matrix": np.eye(4).tolist()},
              {"file_path": file_path, "transform_matrix": np.eye(4).tolist()}]
    (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}))
    return folder / "transforms.json"


def test_frames_outside_the_dataset_get_one_message_whether_the_file_exists_or_not(tmp_path, capsys):
    _png(tmp_path / "secret.png")
    (tmp_path / "scene").mkdir()
    (tmp_path / "scene" / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "scene" / "dangling.png").symlink_to(tmp_path / "gone.png")
    messages = {}
    for name in ("../secret.png", "../gone.png", str(tmp_path / "secret.png"), "/etc/passwd", "/nonexistent/x",
                 "../../../../etc/shadow", "link.png", "dangling.png", "link", "/proc/self/environ"):
        path = _dataset(tmp_path, name)
        with pytest.raises(InputError) as info:
            read_transforms(path)
        messages[name] = str(info.value).replace(repr(name), "NAME")
        assert main(["fit-views", str(path), "-o", str(tmp_path / "run"), "--device", "cpu"]) == 2
        assert "is not inside the dataset folder" in _err(capsys)
    assert len(set(messages.values())) == 1, messages
    assert not (tmp_path / "run").exists()


def test_multiview_object_folders_linked_outside_the_dataset_are_refused(tmp_path):
    from recon.data.multiview import scan_objects, write_recon_view

    root, outside = tmp_path / "data", tmp_path / "other-user"
    for folder in (root / "a", outside):
        folder.mkdir(parents=True)
        write_recon_view(folder, 0, np.ones((32, 32, 4)), 0.0, 0.0, 2.0, 40.0, torch.tensor(
            [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.0], [0, 0, 0, 1.0]]))
    assert len(scan_objects(root)) == 1
    (root / "b").symlink_to(outside)
    with pytest.raises(InputError, match="is not inside the dataset folder"):
        scan_objects(root)


# ------------------------------------------------------------------ 4-5. one line at one boundary
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("yaml-syntax", "not a valid preset YAML file at line"),
        ("python-tag", "not a valid preset YAML file"),
        ("output-file", "is a file"),
        ("nan", "invalid config at stages.coarse.lr: nan is not a finite number"),
        ("fovy", "a field of view must be in (0, 180) degrees"),
        ("empty-colour", "invalid config at background: the colour list is empty"),
    ],
)
def test_expected_failures_print_one_line(tmp_path, capsys, case, expected):
    image = make_rgba(tmp_path / "disc.png")
    out = tmp_path / "out"
    args = fit_args(image, out)
    preset = tmp_path / "bad.yaml"
    if case == "yaml-syntax":
        preset.write_text("stages:\n  coarse: [1, 2\n")
        args[args.index("--preset") + 1] = str(preset)
    elif case == "python-tag":
        preset.write_text("seed: !!python/object/apply:os.system ['echo PWNED']\n")
        args[args.index("--preset") + 1] = str(preset)
    elif case == "output-file":
        out.write_text("a file")
    elif case == "nan":
        args += ["--set", "stages.coarse.lr=nan"]
    elif case == "fovy":
        args += ["--set", "cameras.fovy_deg=180"]
    else:
        args += ["--set", "background=[]"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "PWNED" not in captured.out
    err = " ".join(captured.err.split())
    assert expected in err and err.startswith("error:") and err.count("error:") == 1
    assert not (out / "disc").exists()


def test_a_corrupt_image_fails_before_the_models_load(tmp_path, capsys, monkeypatch):
    from recon.api import Models

    image = make_rgba(tmp_path / "disc.png")
    image.write_bytes(image.read_bytes()[:100])
    monkeypatch.setattr(Models, "get", lambda *a, **k: pytest.fail("models loaded for an unreadable image"))
    assert main(fit_args(image, tmp_path / "out")) == 2
    err = _err(capsys)
    assert f"{image}: truncated or corrupt image file" in err and err.count("error:") == 1
    assert not (tmp_path / "out" / "disc").exists()


def test_pickle_bin_weights_are_refused_in_one_line(tmp_path, capsys):
    from recon.guidance.checkpoints import random_model, save_diffusers

    folder = tmp_path / "model"
    save_diffusers(random_model("tiny"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"x": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    image = make_rgba(tmp_path / "disc.png")
    args = fit_args(image, tmp_path / "out")
    args[args.index("--model") + 1] = str(folder)
    assert main(args) == 2
    err = _err(capsys)
    assert "diffusion_pytorch_model.bin" in err and ".safetensors" in err
    assert not (tmp_path / "PWNED").exists()


def test_unexpected_failure_prints_one_line_and_saves_the_traceback(tmp_path, capsys, monkeypatch):
    import recon.api

    def broken(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(recon.api, "list_images", broken, raising=False)
    monkeypatch.setattr("recon.imageio.list_images", broken)
    log = tmp_path / "logs" / "crash.log"
    monkeypatch.setattr(cli_main, "crash_log_path", lambda: log)
    assert main(fit_args(tmp_path / "x.png", tmp_path / "out")) == 1
    err = _err(capsys)
    assert f"unexpected RuntimeError: kaboom; full traceback saved in {log}" in err and "second line" not in err
    assert "Traceback" in log.read_text() and "kaboom" in log.read_text()


def test_failure_inside_a_run_saves_error_log_in_the_run(tmp_path, capsys, shared_models, monkeypatch):  # noqa: F811
    def broken(self, *args):
        raise RuntimeError("inside the run")

    monkeypatch.setattr(Trainer, "train_step", broken)
    image = make_rgba(tmp_path / "disc.png")
    assert main(fit_args(image, tmp_path / "out")) == 1
    log = tmp_path / "out" / "disc" / "error.log"
    assert f"full traceback saved in {log}" in _err(capsys)
    assert "inside the run" in log.read_text()
    assert "error.log" in json.loads((tmp_path / "out" / "disc" / MANIFEST).read_text())["files"]


# ------------------------------------------------------------------ 6. SIGTERM
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, capsys, shared_models, monkeypatch):  # noqa: F811
    original = Trainer.train_step

    def terminated_at_step_5(self, *args):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", terminated_at_step_5)
    image = make_rgba(tmp_path / "disc.png")
    assert main(fit_args(image, tmp_path / "out", "--format", "ply", "--set", "turntable=false")) == 143
    assert "terminated (SIGTERM); the last checkpoint is kept" in _err(capsys)
    run = RunDir.open(tmp_path / "out" / "disc")
    assert run.read_progress()["status"] == "interrupted"
    assert [step for step, _ in list_checkpoints(run)] == [3, 4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the CLI's only while it runs


# ------------------------------------------------------------------ 8. random weights labelled from the start
def test_random_weights_run_is_labelled_before_anything_else(tmp_path):
    from recon.api import SMOKE_TEST_NOTE, _create_run, build_config, cutout

    cfg = build_config("cpu", TINY, model="random-tiny")
    image = make_rgba(tmp_path / "disc.png")
    run = _create_run(image, cutout(image, cfg), tmp_path / "run", cfg, torch.device("cpu"))
    assert run.read_meta()["random_weights"] is True
    listed = json.loads(run.manifest_path.read_text())["files"]
    assert listed.index(SMOKE_TEST_NOTE) < listed.index("input.png") and (run.root / SMOKE_TEST_NOTE).is_file()


def test_random_weights_note_is_inside_every_mesh_file(tmp_path):
    import trimesh

    from recon.api import build_config
    from recon.exports.uv import UVMesh
    from recon.exports.writers import write_glb, write_obj

    cfg = build_config("cpu", TINY, model="random-tiny")
    assert "random guidance weights" in cfg.export.note and build_config("cpu", TINY).export.note == ""
    sphere = trimesh.creation.icosphere(1)
    mesh = UVMesh(sphere.vertices, sphere.faces, np.zeros((len(sphere.vertices), 2)), sphere.vertex_normals, "test")
    texture = np.zeros((4, 4, 3), np.uint8)
    glb = write_glb(mesh, texture, tmp_path / "mesh.glb", note=cfg.export.note)
    length = int.from_bytes(glb.read_bytes()[12:16], "little")
    tree = json.loads(glb.read_bytes()[20 : 20 + length])
    assert tree["asset"]["extras"]["recon_note"] == cfg.export.note
    obj = write_obj(mesh, texture, tmp_path / "mesh.obj", note=cfg.export.note)
    assert f"# {cfg.export.note}" in obj.read_text().splitlines()[:3]
    assert f"# {cfg.export.note}" in (tmp_path / "mesh.mtl").read_text()
    plain = write_glb(mesh, texture, tmp_path / "plain.glb")
    assert b"recon_note" not in plain.read_bytes()


# ------------------------------------------------------------------ 9. alpha inputs
def test_transparent_and_all_opaque_alpha_messages(tmp_path):
    from recon.preprocess import load_reference

    for name, alpha, expected in (("ghost.png", 0, "fully transparent"), ("solid.png", 254, "no transparent background")):
        pixels = np.full((64, 64, 4), 128, np.uint8)
        pixels[..., 3] = alpha
        Image.fromarray(pixels, "RGBA").save(tmp_path / name)
        with pytest.raises(InputError, match=expected) as info:
            load_reference(tmp_path / name)
        assert "--no-remove-bg" not in str(info.value)


# ------------------------------------------------------------------ 10. truncated newest checkpoint
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run = RunDir.create(tmp_path / "run", {"steps": 1})
    model = torch.nn.Linear(2, 2)
    for step in (10, 20):
        save_checkpoint(run, step, "fit", {"m": model})
    newest = run.checkpoints / "step_000020.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    assert load_latest(run).step == 10
    err = _err(capsys)
    assert "step_000020.pt: unreadable checkpoint" in err and "using the previous checkpoint step_000010.pt instead" in err
    newest.write_bytes(b"")
    (run.checkpoints / "step_000010.pt").write_bytes(b"")
    with pytest.raises(InputError, match="step_000010.pt"):
        load_latest(run)


# ------------------------------------------------------------------ 11. GPU preset without a GPU
def test_gpu_preset_on_the_cpu_warns_at_once(tmp_path, capsys, monkeypatch):
    import recon.api

    def stop(*args, **kwargs):
        raise ReconError("stopped")

    monkeypatch.setattr(recon.api, "fit_image", stop)
    image = make_rgba(tmp_path / "disc.png")
    assert main(["fit", str(image), "-o", str(tmp_path / "out"), "--device", "cpu", "--model", "random-tiny"]) == 2
    err = _err(capsys)
    assert "--preset default is made for a GPU" in err and "--preset cpu" in err


# ------------------------------------------------------------------ 12. timings of every process
def test_meta_keeps_the_timings_of_earlier_processes(tmp_path, monkeypatch):
    import recon.runs

    run = RunDir.create(tmp_path / "run", {})
    run.record_timings({"coarse": 10.0})
    monkeypatch.setattr(recon.runs, "_PROCESS", "resumed-process")
    run.record_timings({"coarse": 2.0, "fine": 5.0})
    run.record_timings({"coarse": 3.0, "fine": 5.0, "export": 1.0})
    meta = run.read_meta()
    assert meta["timings_s"] == {"coarse": 13.0, "fine": 5.0, "export": 1.0}
    assert [p["timings_s"] for p in meta["processes"]] == [{"coarse": 10.0}, {"coarse": 3.0, "fine": 5.0, "export": 1.0}]


# ------------------------------------------------------------------ 13. no wrapping off a terminal
def test_a_quiet_library_call_restores_the_console():
    from recon.progress import console, quiet_while

    assert not console.quiet
    with quiet_while(True):
        assert console.quiet
    assert not console.quiet


def test_messages_do_not_wrap_when_stderr_is_not_a_terminal(capsys):
    from recon.progress import _console

    console = _console()
    assert not console.is_terminal
    message = "a long sentence that must stay on one line " * 10
    console.print(message)
    assert capsys.readouterr().err.strip() == message.strip()


# ------------------------------------------------------------------ 14. --help
def test_help_shows_clean_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([]) == 2
    assert "usage: recon COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "usage: recon fit [-h] [OPTIONS] IMAGE [IMAGE ...]" in text and "(required)" in text
    assert "{None}" not in text and "--no-no-" not in text and "(default: None)" not in text
    assert "--model STR" in text and "--no-remove-bg" in text and "--no-resume" not in text
    with pytest.raises(SystemExit):
        main(["eval-nvs", "--help"])
    text = capsys.readouterr().out
    assert "--no-cascade" in text and "--no-no-cascade" not in text and "{None}" not in text


# ------------------------------------------------------------------ 15. cpu turntable
def test_cpu_preset_turntable_lasts_seconds_at_no_more_cost():
    from recon.api import build_config

    export = build_config("cpu").export
    assert export.turntable_frames / export.turntable_fps >= 3.0
    assert export.turntable_frames * export.turntable_resolution**2 <= 24 * 128**2


# ------------------------------------------------------------------ 17. Blender
def test_blender_script_restores_numpy_bool():
    from test_blender_import import SCRIPT

    assert SCRIPT.index("numpy.bool = bool") < SCRIPT.index("import_scene.gltf")
