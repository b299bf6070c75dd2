"""The install lists every package on disk and ships the presets, so `pip install .` matches the tree."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_on_disk_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    mapping = project["tool"]["setuptools"].get("package-dir", {})
    on_disk = set()
    for top in ("recon", "guidance", "systems", "exports"):
        for init in (ROOT / top).rglob("__init__.py"):
            on_disk.add(".".join(init.parent.relative_to(ROOT).parts))
    on_disk |= {name for name, folder in mapping.items() if (ROOT / folder / "__init__.py").exists()}
    data_only = {"recon.assets"}  # package data without Python files
    assert on_disk | data_only == listed


def test_presets_ship_with_the_package():
    from recon.config import preset_names

    assert {"default", "fast", "cpu"} <= set(preset_names())


def test_the_shipped_prior_is_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["recon.assets"]
    shipped = {p.relative_to(ROOT / "recon" / "assets") for p in (ROOT / "recon" / "assets").rglob("*") if p.is_file()}
    covered = {p.relative_to(ROOT / "recon" / "assets") for pattern in patterns for p in (ROOT / "recon" / "assets").glob(pattern) if p.is_file()}
    assert shipped and shipped == covered
