"""The command line: every command's --help works, unknown commands and flags fail with a code."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from recon.cli.main import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", [[name] for name in COMMANDS if name != "data"] + [["data", "synth"]])
def test_each_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command_exits_nonzero(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs_outside_the_repo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from recon.cli.main import main; raise SystemExit(main(['--help']))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "fit-views" in result.stdout


CONSOLE_SCRIPT = """
import atexit, sys
from recon.cli import main as cli

class Teardown:
    def __del__(self):
        print("interpreter teardown", flush=True)

teardown = Teardown()  # deleted when the interpreter tears its modules down
real_main = cli.main

def main():
    atexit.register(print, "exit handler of a library ran")  # as libraries register theirs during a command
    return real_main()

cli.main = main
sys.exit(cli.run())
"""


@pytest.mark.parametrize(("argv", "code", "torn_down"), [(["frobnicate"], 2, False), (["fit", "--help"], 0, True)])
def test_console_script_exits_with_mains_code_after_the_exit_handlers_without_teardown(argv, code, torn_down):
    """`recon` (pyproject's script, run()): main's exit code, exit handlers run and output flushed, the
    interpreter's teardown skipped; where main raises (SystemExit from --help) the usual exit."""
    result = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, *argv], capture_output=True, text=True, check=False)
    assert result.returncode == code
    assert "exit handler of a library ran" in result.stdout
    assert ("interpreter teardown" in result.stdout) == torn_down
    assert ("unknown command" in result.stderr) == (code == 2) and ("usage" in result.stdout.lower()) == (code == 0)
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["recon"] == "recon.cli.main:run"


def _parsed(monkeypatch, command_class, argv):
    """The command object ``main(argv)`` builds for ``command_class`` (its run() is stubbed out)."""
    parsed = []
    monkeypatch.setattr(command_class, "run", lambda self: parsed.append(self) or 0)
    assert main(argv) == 0
    return parsed[0]


def test_data_synth_flags_fill_the_synth_config(monkeypatch, tmp_path):
    from recon.cli.data import DataSynthCommand
    from recon.data.synth import SynthConfig

    command = _parsed(monkeypatch, DataSynthCommand, [
        "data", "synth", "-o", str(tmp_path), "--objects", "3", "--views", "4", "--size", "32", "--seed", "7",
        "--radius", "3.0", "--fovy-deg", "30", "--elevation-min-deg", "0", "--elevation-max-deg", "45",
        "--min-primitives", "1", "--max-primitives", "3", "--textured-probability", "0.25", "--object-radius", "0.5",
        "--supersample", "1", "--shading", "albedo", "--orbit", "--quiet",
    ])
    assert command.output == tmp_path and command.quiet
    assert command.dataset == SynthConfig(
        objects=3, views=4, size=32, seed=7, radius=3.0, fovy_deg=30.0, elevation_min_deg=0.0, elevation_max_deg=45.0,
        min_primitives=1, max_primitives=3, textured_probability=0.25, object_radius=0.5, supersample=1,
        shading="albedo", orbit=True,
    )
    defaults = _parsed(monkeypatch, DataSynthCommand, ["data", "synth", "-o", str(tmp_path)])
    assert defaults.dataset == SynthConfig() and defaults.dataset.min_primitives == 2 and not defaults.quiet


def test_data_synth_min_primitives_follows_max_primitives(monkeypatch, tmp_path, capsys):
    from recon.cli.data import DataSynthCommand

    command = _parsed(monkeypatch, DataSynthCommand, ["data", "synth", "-o", str(tmp_path), "--max-primitives", "1"])
    assert (command.dataset.min_primitives, command.dataset.max_primitives) == (1, 1)
    assert main(["data", "synth", "-o", str(tmp_path), "--min-primitives", "4", "--max-primitives", "3"]) == 2
    assert "min_primitives" in capsys.readouterr().err


def test_train_cascade_flags_fill_the_train_config(monkeypatch, tmp_path):
    from recon.cli.train import TrainCascadeCommand
    from recon.systems.cascade_training import TrainConfig

    command = _parsed(monkeypatch, TrainCascadeCommand, [
        "train-cascade", "--data", str(tmp_path / "data"), "--init", "random-tiny", "-o", str(tmp_path / "run"),
        "--stage", "base", "--steps", "10", "--batch-size", "2", "--image-size", "64", "--lr-unet", "2e-4",
        "--lr-projection", "2e-3", "--prompt-steps", "3", "--mixed-precision", "no", "--gradient-checkpointing",
        "--preload", "--checkpoint-every", "5", "--seed", "9", "--ema-decay", "0.99", "--nearby-views", "0,30,0", "-20,0,0.5",
        "--max-minutes", "1.5", "--device", "cpu", "--set", "warmup_steps=1", "--no-resume", "--quiet",
    ])
    assert command.training == TrainConfig(
        stage="base", steps=10, batch_size=2, image_size=64, lr_unet=2e-4, lr_projection=2e-3, prompt_steps=3,
        mixed_precision="no", gradient_checkpointing=True, preload=True, checkpoint_every=5, seed=9, ema_decay=0.99,
        nearby_views=[[0.0, 30.0, 0.0], [-20.0, 0.0, 0.5]],
    )
    assert (command.data, command.init, command.output) == (tmp_path / "data", "random-tiny", tmp_path / "run")
    assert (command.max_minutes, command.device, command.set, command.resume, command.quiet) == (1.5, "cpu", ["warmup_steps=1"], False, True)
    defaults = _parsed(monkeypatch, TrainCascadeCommand, ["train-cascade", "--data", str(tmp_path), "--init", "tiny", "-o", str(tmp_path / "run")])
    assert defaults.training == TrainConfig()
    assert (defaults.max_minutes, defaults.device, defaults.set, defaults.resume, defaults.quiet) == (None, "auto", [], True, False)


def test_train_cascade_set_applies_over_the_flags(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import recon.cli.train

    trained = []

    def fake_train(cfg, *args):
        trained.append(cfg)
        return SimpleNamespace(metrics={}, finished=True, step=cfg.steps, final=tmp_path)

    monkeypatch.setattr(recon.cli.train, "train", fake_train)
    argv = ["train-cascade", "--data", str(tmp_path), "--init", "tiny", "-o", str(tmp_path / "run"), "--steps", "5", "--ema-decay", "0.9", "--quiet"]
    assert main([*argv, "--set", "ema_decay=0.5", "--set", "nearby_views=[[0,10,0]]"]) == 0
    assert trained[0].steps == 5 and trained[0].ema_decay == 0.5 and trained[0].nearby_views == [[0.0, 10.0, 0.0]]


def test_version_names_the_distribution(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"recon {version('recon-zero123')}"

