"""The install lists every package on disk and ships the presets, so `pip install .` matches the tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_on_disk_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    mapping = project["tool"]["setuptools"].get("package-dir", {})
    folders = {"recon": "recon", **mapping}
    on_disk = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            on_disk.add(".".join((package, *init.parent.relative_to(ROOT / folder).parts)))
    assert on_disk == listed


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """guidance/, systems/, exports/ and configs/ of the repository land under recon.*, nothing beside it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"recon"}
    for module in ("guidance/sds.py", "systems/fit.py", "exports/pipeline.py", "configs/cpu.yaml", "api.py"):
        assert f"recon/{module}" in names


def test_presets_ship_with_the_package():
    from recon.config import preset_names

    assert {"default", "fast", "cpu"} <= set(preset_names())


def test_the_shipped_prior_is_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["recon.assets"]
    shipped = {p.relative_to(ROOT / "recon" / "assets") for p in (ROOT / "recon" / "assets").rglob("*") if p.is_file() and p.suffix != ".py"}
    covered = {p.relative_to(ROOT / "recon" / "assets") for pattern in patterns for p in (ROOT / "recon" / "assets").glob(pattern) if p.is_file()}
    assert shipped and shipped == covered
