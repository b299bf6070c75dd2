"""A fit starts without the export's libraries, and loads them in the background while it trains."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import recon.exports
from recon.runtime import import_in_background


def loaded_after(statement: str) -> set[str]:
    """Top-level module names in ``sys.modules`` of a fresh interpreter after running ``statement``."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(result.stdout.split())


def test_a_fit_module_imports_neither_trimesh_nor_scipy():
    loaded = loaded_after("import recon.api, recon.systems.fit")
    assert "recon" in loaded
    assert not {"trimesh", "scipy", "networkx"} & loaded


def test_the_export_modules_bring_them():
    assert {"trimesh", "scipy"} <= loaded_after("import recon.systems.run_export")


def test_the_package_names_resolve_to_their_modules():
    from recon.exports.config import ExportConfig
    from recon.exports.writers import write_glb

    assert recon.exports.ExportConfig is ExportConfig
    assert recon.exports.write_glb is write_glb
    for name in recon.exports.__all__:
        assert getattr(recon.exports, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        recon.exports.no_such_name  # noqa: B018


def test_import_in_background_loads_the_modules(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    thread = import_in_background("colorsys")
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(sys.modules["colorsys"], types.ModuleType)


def test_a_failed_background_import_is_left_to_the_later_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    thread = import_in_background("recon_no_such_module", "colorsys")
    thread.join(timeout=60)
    assert not thread.is_alive()  # no exception escaped: the error belongs to the import that needs the module
    assert "colorsys" in sys.modules  # and the modules after it still loaded
    with pytest.raises(ImportError):
        __import__("recon_no_such_module")
