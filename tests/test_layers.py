"""The house's layers point one way: core <- guidance, exports <- systems <- API and CLI; no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "core": {"guidance", "exports", "systems", "top"},
    "guidance": {"exports", "systems", "top"},
    "exports": {"guidance", "systems", "top"},
    "systems": {"top"},
    "top": set(),
}


def package_folders() -> dict[str, Path]:
    """Installed package name -> repository folder, from pyproject's mapping."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {"recon": ROOT / "recon", **{name: ROOT / folder for name, folder in setuptools["package-dir"].items()}}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found = {}
    for package, folder in package_folders().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def layer(module: str) -> str:
    """core, guidance, exports, systems or top (recon.api, recon.cli)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("guidance", "exports", "systems"):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("api", "cli"):
        return "top"
    return "core"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found.update(name for name in names if name in known)
    return found


def test_layers_point_one_way():
    known = modules()
    assert len(known) > 40
    climbing = []
    for name, path in known.items():
        if name == "recon":  # the package root re-exports the API lazily
            continue
        for target in imports(path, known):
            if layer(target) in FORBIDDEN[layer(name)]:
                climbing.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert not climbing, "\n".join(climbing)


def test_no_import_cycles_between_modules():
    known = modules()
    # a package imports its own submodules to re-export them; those edges are not cycles of the design
    graph = {
        name: {t for t in imports(path, known) if t != name and not t.startswith(name + ".")} for name, path in known.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]) if target in stack else f"{node} -> {target}")
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_climbing_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from recon.systems.fit import FitConfig\n")
    known = modules()
    assert "recon.systems.fit" in imports(bad, known)
    assert layer("recon.systems.fit") in FORBIDDEN[layer("recon.cameras")]
