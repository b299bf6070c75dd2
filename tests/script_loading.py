"""Loads a repository script that is not a package module (bench/*.py, examples/*.py) for a test.

Import from tests: ``from script_loading import load_script``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """The module at ``ROOT / relative`` (e.g. ``bench/fit.py``), executed once per call and registered in
    ``sys.modules`` under a name made from its path (its dataclasses look their module up there)."""
    path = ROOT / relative
    name = "_".join(Path(relative).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
