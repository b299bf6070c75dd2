"""Device selection, seeding and memory read-outs shared by every command."""

from __future__ import annotations

import importlib
import random
import threading

import numpy as np
import torch

from recon.errors import ReconError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ReconError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReconError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ReconError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ReconError(f"--device {spec}: only cpu and cuda devices are supported")
    return device


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``. A host tensor bound for a GPU is staged in pinned memory and copied
    asynchronously: a copy from pageable memory would make the host wait for the GPU's queued work."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


def import_in_background(*modules: str) -> threading.Thread:
    """Starts importing ``modules`` (dotted names) in a daemon thread and returns the thread.

    For imports a command needs later, started while the main thread mostly waits for the GPU (a fit's
    training steps), so that the later import finds them loaded; an import of a module still loading waits for
    it. A failed import is left to that later import, which raises the same error where it belongs.
    """

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                continue

    thread = threading.Thread(target=load, name="recon-import", daemon=True)
    thread.start()
    return thread


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch (all devices); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory window on a CUDA ``device`` (no-op on the CPU).

    Initialises CUDA first: resetting the statistics of a device whose
    allocator has not started yet fails with "Invalid device argument".
    """
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory on ``device`` since the last reset, in GiB; ``None`` on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def rng_state() -> dict:
    """Every random generator's state, for checkpoints (tensors and plain values only,
    so that ``torch.load(weights_only=True)`` reads it back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
