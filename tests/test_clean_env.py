"""bench/clean_env.py: the closure of recon-zero123's requirements, linked into a folder."""

from importlib import metadata
from pathlib import Path

import pytest
from script_loading import load_script


@pytest.fixture(scope="module")
def clean_env():
    return load_script("bench/clean_env.py")


def test_requirements_leave_out_extras(clean_env):
    names = {clean_env.canonical(n) for n in clean_env.requirement_names(metadata.distribution("recon-zero123"))}
    assert {"torch", "diffusers", "transformers", "trimesh"} <= names
    # test, app and cluster extras are not what a plain install pulls in
    assert not names & {"pytest", "gradio", "ray", "nerfacc", "accelerate"}


def test_links_the_closure_and_nothing_else(clean_env, tmp_path):
    linked, missing = clean_env.link_closure("recon-zero123", tmp_path / "clean")
    assert {"recon-zero123", "torch", "diffusers", "numpy", "huggingface-hub"} <= set(linked)
    assert "pytest" not in linked and "gradio" not in linked
    assert all(clean_env.canonical(name) == name for name in missing)
    entries = {p.name for p in (tmp_path / "clean").iterdir()}
    assert {"torch", "diffusers", "numpy"} <= entries and "_pytest" not in entries and "gradio" not in entries
    assert (tmp_path / "clean" / "torch").resolve() == Path(metadata.distribution("torch").locate_file("torch")).resolve()
    # idempotent: a second call adds nothing and fails on nothing
    assert clean_env.link_closure("recon-zero123", tmp_path / "clean") == (linked, missing)
