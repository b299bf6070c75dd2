"""--resume: a run killed mid-way and resumed ends with the same parameters as an uninterrupted one (CPU, same seed)."""

from __future__ import annotations

import json

import torch
from test_fit import fit_args, make_rgba, shared_models  # noqa: F401 - shared_models is a fixture

from recon.cli.main import main
from recon.runs import RunDir
from recon.systems.checkpoint import list_checkpoints, load_latest
from recon.systems.fit import Trainer

FAST = ["--format", "ply", "--set", "turntable=false", "--set", "preview_every=0"]


def final_state(run_dir):
    checkpoint = load_latest(RunDir.open(run_dir))
    return checkpoint.step, checkpoint.modules["field"], checkpoint.optimizers["adam"]


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tmp_path, shared_models, monkeypatch, capsys):  # noqa: F811
    image = make_rgba(tmp_path / "disc.png")
    assert main(fit_args(image, tmp_path / "straight", *FAST)) == 0

    original = Trainer.train_step

    def interrupted_after_step_5(self, *args):
        if self.step == 5:  # checkpoints at 2, 3 (end of coarse) and 4: step 5 is redone
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted_after_step_5)
    assert main(fit_args(image, tmp_path / "killed", *FAST)) == 130
    run = tmp_path / "killed" / "disc"
    assert json.loads((run / "progress.json").read_text())["status"] == "interrupted"
    assert [step for step, _ in list_checkpoints(RunDir.open(run))] == [3, 4]
    assert not any((run / "exports").glob("mesh.*"))
    capsys.readouterr()

    # without --resume an unfinished run is an error, not silently redone
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(fit_args(image, tmp_path / "killed", *FAST)) == 2
    assert "--resume" in capsys.readouterr().err

    assert main(fit_args(image, tmp_path / "killed", *FAST, "--resume")) == 0
    step_a, field_a, adam_a = final_state(tmp_path / "straight" / "disc")
    step_b, field_b, adam_b = final_state(run)
    assert step_a == step_b == 6
    assert field_a.keys() == field_b.keys()
    for key in field_a:
        assert torch.allclose(field_a[key], field_b[key], atol=1e-6, rtol=0), key
    for index, state in adam_a["state"].items():
        assert torch.allclose(state["exp_avg"], adam_b["state"][index]["exp_avg"], atol=1e-6, rtol=0)
    assert (run / "exports" / "mesh.ply").is_file()
    assert json.loads((run / "progress.json").read_text())["status"] == "finished"


def test_a_different_seed_gives_different_parameters(tmp_path):
    """The parity above is not vacuous: the parameters do depend on the seed's random stream."""
    from test_fit import make_trainer

    fields = []
    for seed in (0, 1):
        trainer, _ = make_trainer(tmp_path / str(seed), f"seed={seed}", "preview_every=0")
        stage = trainer.cfg.stages["coarse"]
        for step in range(2):
            trainer.train_step("coarse", stage, step)
        fields.append(trainer.field.state_dict())
    assert any(not torch.allclose(fields[0][k], fields[1][k], atol=1e-6) for k in fields[0])
