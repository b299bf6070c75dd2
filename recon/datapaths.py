"""Paths named by data files stay inside their dataset folder.

A data file (a transforms.json frame's ``file_path``, an object folder of a
multi-view dataset) may only name files inside its dataset root. The check
resolves symbolic links, so a link inside the dataset that points elsewhere is
refused too, and the refusal reads the same whether or not the named file
exists (the message never tells an outside file's existence).
"""

from __future__ import annotations

import os
from pathlib import Path

from recon.errors import InputError


def outside_message(source: str | os.PathLike[str], name: str, root: Path) -> str:
    """The one message for a path outside its dataset: it names the data file, the path and the root, nothing else."""
    return f"{source}: {name!r} is not inside the dataset folder {root}; a data file may only name files inside its own folder"


def resolve_inside(root: str | os.PathLike[str], name: str | os.PathLike[str], source: str | os.PathLike[str]) -> Path:
    """``root / name`` with symbolic links resolved, if it lies inside the resolved ``root``.

    ``name`` may be relative (to ``root``) or absolute; it need not exist.
    Raises :class:`InputError` with :func:`outside_message` otherwise, the
    same text whether the target exists or not. ``source`` names the data file
    for the message.
    """
    base = Path(root).resolve()
    try:
        resolved = (base / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise InputError(outside_message(source, str(name), base)) from exc
    if not resolved.is_relative_to(base):
        raise InputError(outside_message(source, str(name), base))
    return resolved
