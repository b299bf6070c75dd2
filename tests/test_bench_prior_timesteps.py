"""bench/prior_timesteps.py on the CPU with the random tiny network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from script_loading import ROOT

from recon.data.synth import SynthConfig, synthesize
from recon.guidance.model import make_scheduler


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior-timesteps") / "heldout"
    synthesize(SynthConfig(objects=2, views=3, size=64, seed=1, orbit=True, supersample=1), root)
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/prior_timesteps.py", *args, "--pairs", "6", "--size", "64", "--device", "cpu"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_every_prior_sees_the_same_pairs_and_noise(heldout, tmp_path):
    done = _run(str(heldout), "random-tiny", "random-tiny", "--timesteps", "10,500,990", "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["timesteps"] == [10, 500, 990] and report["pairs"] == 6
    (row,) = report["weights"].values()  # the same weights twice: one row
    assert len(row["eps"]) == len(row["x0"]) == 3 and row["mean_latent_x0"] > 0
    # x0 - target = sqrt((1 - a) / a) (noise - eps): the two errors differ by that factor squared at every t
    alpha_bar = make_scheduler().alphas_cumprod
    for t, eps, x0 in zip(report["timesteps"], row["eps"], row["x0"], strict=True):
        a = float(alpha_bar[t])
        assert x0 == pytest.approx(eps * (1 - a) / a, rel=1e-4)
    assert "| random-tiny | eps |" in done.stdout and "x0-MSE of the pairs' mean latent" in done.stdout


def test_a_second_run_gives_the_same_numbers(heldout, tmp_path):
    runs = [_run(str(heldout), "random-tiny", "--timesteps", "250", "--out", str(tmp_path / f"{k}.json")) for k in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{k}.json").read_text()) for k in range(2))
    assert first["weights"] == second["weights"]


def test_a_guidance_scale_scores_the_guided_prediction(heldout, tmp_path):
    runs = {scale: _run(str(heldout), "random-tiny", "--timesteps", "500", "--guidance-scale", scale, "--out", str(tmp_path / f"{scale}.json"))
            for scale in ("1", "3")}
    assert all(r.returncode == 0 for r in runs.values()), runs["3"].stderr[-3000:]
    plain, guided = (json.loads((tmp_path / f"{scale}.json").read_text()) for scale in ("1", "3"))
    assert guided["guidance_scale"] == 3.0
    (plain_row,), (guided_row,) = plain["weights"].values(), guided["weights"].values()
    assert guided_row["eps"] != plain_row["eps"] and guided_row["mean_latent_x0"] == plain_row["mean_latent_x0"]
