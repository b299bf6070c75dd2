"""The framing a prior was trained at: recorded beside its weights, measured from its training data, and the size
`recon fit` recentres a photo to (preprocess.foreground_ratio None = the weights' own)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from guidance_fixtures import tiny_model
from PIL import Image

from recon.api import build_config, cutout
from recon.data.primitives import DEFAULT_OBJECT_RADIUS
from recon.data.synth import SynthConfig, median_foreground_ratio
from recon.errors import InputError
from recon.guidance.checkpoints import (
    FOREGROUND_RATIO_KEY,
    RECON_META,
    foreground_ratio_for,
    recorded_foreground_ratio,
    save_diffusers,
    shipped_prior_path,
)
from recon.preprocess import DEFAULT_FOREGROUND_RATIO, foreground_bbox
from recon.systems.fit import FitConfig


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    """A saved tiny model that records a framing of 0.6."""
    return save_diffusers(tiny_model(), tmp_path_factory.mktemp("w") / "framed", extra_meta={FOREGROUND_RATIO_KEY: 0.6})


def test_the_shipped_prior_records_the_framing_of_its_training_images():
    recorded = json.loads((shipped_prior_path() / RECON_META).read_text())[FOREGROUND_RATIO_KEY]
    assert recorded_foreground_ratio("tiny") == recorded and 0.5 < recorded < DEFAULT_FOREGROUND_RATIO
    assert foreground_ratio_for("tiny") == recorded


def test_framing_is_read_from_a_folder_and_defaults_where_none_is_recorded(framed, tmp_path):
    assert recorded_foreground_ratio(framed) == 0.6 and foreground_ratio_for(str(framed)) == 0.6
    assert foreground_ratio_for(framed, 0.9) == 0.9  # an explicit ratio wins
    plain = save_diffusers(tiny_model(), tmp_path / "plain")
    for spec in (plain, "random-tiny", "random-full", tmp_path / "missing", "owner/not-downloaded"):
        assert recorded_foreground_ratio(spec) is None
        assert foreground_ratio_for(spec) == DEFAULT_FOREGROUND_RATIO


@pytest.mark.parametrize("value", [1.5, 0, "0.7", True])
def test_a_bad_recorded_framing_is_an_error_naming_the_file(framed, tmp_path, value):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / RECON_META).write_text(json.dumps({FOREGROUND_RATIO_KEY: value}))
    with pytest.raises(InputError, match=rf"{RECON_META}: {FOREGROUND_RATIO_KEY} must be a number in \(0, 1\]"):
        recorded_foreground_ratio(bad)


def test_build_config_resolves_the_framing_of_the_guidance_weights(framed):
    assert build_config("cpu").preprocess.foreground_ratio == recorded_foreground_ratio("tiny")
    assert build_config("cpu", model=str(framed)).preprocess.foreground_ratio == 0.6
    assert build_config("default", model="random-full").preprocess.foreground_ratio == DEFAULT_FOREGROUND_RATIO
    assert build_config("cpu", ["preprocess.foreground_ratio=0.5"], model=str(framed)).preprocess.foreground_ratio == 0.5
    assert build_config("cpu", ["preprocess.foreground_ratio=0.5"], foreground_ratio=0.7).preprocess.foreground_ratio == 0.7


def test_cutout_recentres_to_the_weights_framing(framed, tmp_path):
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[30:70, 40:60] = 255  # a 40 x 20 px object
    image = tmp_path / "object.png"
    Image.fromarray(rgba).save(image)
    base = FitConfig()
    for model, ratio in ((str(framed), 0.6), ("random-tiny", DEFAULT_FOREGROUND_RATIO)):
        cfg = replace(base, guidance=replace(base.guidance, model=model), preprocess=replace(base.preprocess, size=100, foreground_ratio=None))
        alpha = cutout(image, cfg).rgba[3].numpy()
        top, _, bottom, _ = foreground_bbox(alpha)  # the longer side is the height
        assert bottom - top == pytest.approx(100 * ratio, abs=1.5)


def test_median_foreground_ratio_measures_the_rendered_objects():
    cfg = SynthConfig(size=64, supersample=1, families="blob,single")
    ratio = median_foreground_ratio(cfg, objects=6)
    assert 0.3 < ratio < 1.0 and median_foreground_ratio(cfg, objects=6) == ratio
    larger = median_foreground_ratio(replace(cfg, object_radius=1.25 * DEFAULT_OBJECT_RADIUS), objects=6)
    assert larger / ratio == pytest.approx(1.25, rel=0.1)
    # seen from above, the same objects frame differently
    assert median_foreground_ratio(cfg, objects=6, elevation_deg=60.0) != ratio


def test_a_run_records_the_framing_it_used(tmp_path):
    from recon.api import _create_run

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[20:44, 24:40] = 255
    image = tmp_path / "object.png"
    Image.fromarray(rgba).save(image)
    cfg = build_config("cpu", model="tiny")
    run = _create_run(image, cutout(image, cfg), tmp_path / "run", cfg, torch.device("cpu"))
    assert f"foreground_ratio: {recorded_foreground_ratio('tiny')}" in run.file("config.yaml").read_text()
