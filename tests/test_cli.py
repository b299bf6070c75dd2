"""The command line: every command's --help works, unknown commands and flags fail with a code."""

import subprocess
import sys

import pytest

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
