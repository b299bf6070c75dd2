"""The install lists every package on disk and ships the presets, so `pip install .` matches the tree."""

import tomllib
from pathlib import Path

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
    assert on_disk == listed


def test_presets_ship_with_the_package():
    from recon.config import preset_names

    assert {"default", "fast", "cpu"} <= set(preset_names())
