"""Fuzz-style: random and mutated bytes through the input readers raise nothing but recon's own errors.

Seeded, a few hundred cases in all, a few seconds on a CPU.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from recon.config import read_preset
from recon.data.transforms_json import read_transforms
from recon.errors import ReconError
from recon.imageio import decode_image
from recon.systems.checkpoint import load_checkpoint


def _png_bytes(size: int = 40) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _mutate(data: bytes, rng: random.Random, head: int | None = None) -> bytes:
    """``data`` with a few bytes flipped (within the first ``head`` bytes if given), cut short, or grown."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(min(len(out), head or len(out)))
        out[index] = rng.randrange(256)
    if rng.random() < 0.3:
        out = out[: rng.randrange(1, len(out))]
    if rng.random() < 0.1:
        out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(out)


def _accepts_or_refuses(read, path) -> None:
    try:
        read(path)
    except ReconError as exc:
        assert str(path.name) in str(exc) or str(path.parent) in str(exc), exc


def test_random_and_mutated_images_raise_only_input_errors(tmp_path):
    rng = random.Random(0)
    png = _png_bytes()
    path = tmp_path / "image.png"
    for case in range(300):
        if case < 60:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        elif case < 200:
            data = _mutate(png, rng, head=64)  # the signature, IHDR (size, depth, colour type)
        else:
            data = _mutate(png, rng)
        path.write_bytes(data)
        _accepts_or_refuses(decode_image, path)


def _frames(rng: random.Random) -> object:
    choices = [
        None, 0, -1.5, float("nan"), "x", [], {}, [[1, 2], [3]], {"file_path": None},
        [{"file_path": "image", "transform_matrix": "eye"}], [{"transform_matrix": np.eye(4).tolist()}],
        [{"file_path": ["a"], "transform_matrix": np.eye(4).tolist()}],
        [{"file_path": "image", "transform_matrix": np.zeros((4, 4)).tolist()}],
        [{"file_path": "image", "transform_matrix": [[1e400] * 4] * 4}],
        [{"file_path": "../../etc/passwd", "transform_matrix": np.eye(4).tolist()}],
        [{"file_path": "image\x00.png", "transform_matrix": np.eye(4).tolist()}],
    ]
    return rng.choice(choices)


def test_mutated_transforms_json_raises_only_input_errors(tmp_path):
    rng = random.Random(1)
    (tmp_path / "image.png").write_bytes(_png_bytes())
    good = {"camera_angle_x": 0.7, "frames": [{"file_path": "image", "transform_matrix": np.eye(4).tolist()}]}
    path = tmp_path / "transforms.json"
    text = json.dumps(good)
    for case in range(200):
        if case < 80:
            data = _mutate(text.encode(), rng)
            path.write_bytes(data)
        else:
            record = json.loads(text)
            key = rng.choice(["camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "w", "h", "frames"])
            record[key] = _frames(rng) if key == "frames" else rng.choice([0, -1, 1e9, "a", None, [], float("inf"), 3.5])
            path.write_text(json.dumps(record))
        _accepts_or_refuses(read_transforms, path)


def test_random_preset_yaml_raises_only_recon_errors(tmp_path):
    rng = random.Random(2)
    path = tmp_path / "preset.yaml"
    pieces = ["seed: 1\n", "stages:\n", "  coarse: {steps: 3\n", "!!python/object:os.system\n", "- [\n", "\t", ": :\n",
              "guidance: !!binary abc\n", "&a [*a]\n", "%YAML 9.9\n", "\xff\xfe", "key: 'unterminated\n"]
    for _ in range(100):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        path.write_bytes(text.encode("utf-8", "surrogatepass") if rng.random() < 0.8 else bytes(rng.randrange(256) for _ in range(40)))
        try:
            read_preset(path)
        except ReconError as exc:
            assert str(path) in str(exc), exc


@pytest.mark.parametrize("seed", range(3))
def test_random_checkpoint_bytes_raise_only_input_errors(tmp_path, seed):
    import torch

    rng = random.Random(seed)
    buffer = io.BytesIO()
    torch.save({"format": 1, "step": 1, "stage": "s", "modules": {}, "optimizers": {}, "rng": {}, "extra": {}}, buffer)
    path = tmp_path / "step_000001.pt"
    for case in range(20):
        path.write_bytes(_mutate(buffer.getvalue(), rng) if case else bytes(rng.randrange(256) for _ in range(100)))
        _accepts_or_refuses(load_checkpoint, path)
