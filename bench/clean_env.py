"""Links the installed distributions that recon-zero123 needs, and nothing else, into one folder.

    python bench/clean_env.py /tmp/clean
    cd /tmp && PYTHONPATH=/tmp/clean python -S /path/to/bench/fit.py IMAGE ...

A machine image with many packages besides recon's dependencies makes imports
slower than on a user's fresh install: diffusers and transformers import
optional packages (peft, scikit-learn, ...) whenever they are installed. This
walks recon-zero123's requirements recursively (extras and markers for other
platforms or older Pythons left out), links each distribution's top-level
files into the folder, and prints how many it linked and which requirements
are not installed. ``python -S`` (no site-packages) with the folder on
``PYTHONPATH`` then imports only what a fresh install holds. recon-zero123
must be installed as a plain (non-editable) distribution on ``sys.path``,
e.g. ``pip install --target DIR .`` with DIR on ``PYTHONPATH``.

A fresh install also has compiled bytecode (pip writes it). Where the
linked packages have none and ``PYTHONDONTWRITEBYTECODE`` is set, as in the
GPU machines' image, every import compiles them from source again: unset
it (and set ``PYTHONPYCACHEPREFIX`` where site-packages is read-only) so
the first run writes the bytecode and later runs import as a user's do.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

SKIPPED_MARKERS = ("python_version <", 'platform_system == "Windows"', 'sys_platform == "win32"')


def canonical(name: str) -> str:
    """The normalised distribution name (PEP 503): lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of ``dist``'s requirements that apply here (no extras, none only for Windows or older Pythons)."""
    names = []
    for requirement in dist.requires or []:
        marker = requirement.split(";", 1)[1] if ";" in requirement else ""
        if "extra ==" in marker or any(skip in marker for skip in SKIPPED_MARKERS):
            continue
        names.append(re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return names


def link_closure(root: str, target: Path) -> tuple[list[str], list[str]]:
    """Links the top-level files of ``root`` and of every distribution it requires (recursively) into ``target``.

    Returns (distributions linked, requirements not installed), both sorted.
    """
    target.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    linked, missing, todo = [], [], [root]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        linked.append(name)
        todo.extend(requirement_names(dist))
        for top in sorted({Path(str(f)).parts[0] for f in dist.files or []}):
            if top.startswith("..") or top in ("bin", "__pycache__") or top.endswith(".pth"):
                continue
            source, link = Path(dist.locate_file(top)), target / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return sorted(linked), sorted(missing)


def main() -> None:
    """Parses the flags, links the closure, prints a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder to create (links are added; nothing is deleted)")
    parser.add_argument("--root", default="recon-zero123", help="distribution whose requirements to follow")
    args = parser.parse_args()
    linked, missing = link_closure(args.root, args.target)
    print(f"{len(linked)} distributions linked into {args.target}; not installed: {', '.join(missing) or 'none'}")


if __name__ == "__main__":
    main()
