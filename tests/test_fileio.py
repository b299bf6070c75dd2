"""Crash-safe writes: the final name appears only when the write succeeded."""

import os
import stat

import pytest

from recon.fileio import atomic_path, read_json, write_json, write_text


def test_write_then_read(tmp_path):
    write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert read_json(tmp_path / "a" / "b.json") == {"x": 1}


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "data.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_temp_keeps_suffix_and_output_gets_normal_permissions(tmp_path):
    with atomic_path(tmp_path / "mesh.glb") as tmp:
        assert tmp.suffix == ".glb" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    mode = stat.S_IMODE(os.stat(tmp_path / "mesh.glb").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask
