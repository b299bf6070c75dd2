"""A batch over a Ray cluster: one actor per GPU (or per CPU worker), each loading the models once.

The driver (the machine running ``recon batch --ray``) keeps the queue and the
:class:`recon.systems.workers.Ledger`, exactly as the local process pool does:
each actor gets one image at a time, the next as soon as it is free; an actor
that dies (node lost, SIGKILL) or hits a CUDA error / out-of-memory is
replaced and its image retried once, then reported failed. Run folders are
written by the actors under ``output``, so on a real cluster ``output`` must
be storage every node sees at the same path (NFS, a mounted bucket); the
driver writes ``batch_summary.json`` there too. Every node needs recon
installed (the same version) in the Python environment Ray uses.

``ray`` is optional (``pip install ".[ray]"``) and imported only here.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recon.errors import ReconError
from recon.systems.batch import ImageResult, one_line
from recon.systems.workers import FitFactory, Ledger, LiveView, is_fatal, plain_outcome

INSTALL_HINT = '--ray needs the optional Ray package: pip install ".[ray]" (or pip install "ray>=2.9")'


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ReconError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ReconError(INSTALL_HINT) from None
    return ray


class FitActor:
    """A Ray actor that builds its fit function once (loading the models) and fits one image per call."""

    def __init__(self, factory: FitFactory, device: str) -> None:
        from recon.progress import set_quiet

        set_quiet(True)  # the driver's live view is the console
        self.fit_one = factory(device)

    def pid(self) -> int:
        """The actor's process id (recorded in the summary)."""
        return os.getpid()

    def fit(self, image: str, run_dir: str, retry: bool) -> tuple[Any, ...]:
        """("done", outcome) | ("failed", reason, traceback or "") | ("crashed", reason): the last means
        this actor's device is unusable (CUDA error, out of memory) and the driver replaces it."""
        try:
            outcome = self.fit_one(Path(image), Path(run_dir), retry) or {}
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            if is_fatal(exc):
                return ("crashed", one_line(exc))
            return ("failed", one_line(exc), "" if isinstance(exc, ReconError) else traceback.format_exc())
        return ("done", plain_outcome(outcome))


def actor_count(resources: dict[str, float], use_gpu: bool, workers: int | None) -> int:
    """How many actors: ``workers`` if given, else one per GPU (``use_gpu``) or per CPU of the cluster."""
    available = int(resources.get("GPU" if use_gpu else "CPU", 0))
    if use_gpu and available < 1:
        raise ReconError("--ray: the Ray cluster has no GPUs; use --device cpu for CPU workers")
    count = workers if workers is not None else available
    if count < 1:
        raise ReconError(f"--ray: {count} workers; give --workers 1 or more")
    return count


def cpus_per_actor(nodes: Sequence[dict[str, float]], use_gpu: bool, count: int) -> int:
    """Ray CPUs each of ``count`` actors reserves, at least 1, given each alive node's resources (``CPU``, ``GPU``).

    GPU actors: the fewest CPUs per GPU of any node with GPUs, so every GPU can host an actor. CPU actors: the
    largest equal share with which the nodes still hold all ``count`` actors at once (a share no node has would
    leave actors waiting for ever). Ray sets each actor's OMP_NUM_THREADS to this, so actors sharing a node do
    not oversubscribe its cores.
    """
    cpus = [int(node.get("CPU", 0)) for node in nodes]
    if use_gpu:
        per_gpu = [c // int(node["GPU"]) for c, node in zip(cpus, nodes) if node.get("GPU", 0) >= 1]
        return max(1, min(per_gpu, default=1))
    share = max(1, sum(cpus) // max(count, 1))
    while share > 1 and sum(c // share for c in cpus) < count:
        share -= 1
    return share


def run_ray(
    images: Sequence[Path], output: Path, factory: FitFactory, address: str = "local", device: str = "auto",
    workers: int | None = None, overwrite: bool = False, poll_s: float = 0.5, grace_s: float = 10.0,
) -> list[ImageResult]:
    """Fits ``images`` into ``output/<stem>/`` with Ray actors; returns one :class:`ImageResult` per image.

    ``address``: ``local`` (connect to the Ray instance this process already
    started, else the one ``RAY_ADDRESS`` / ``ray start`` names, else start a
    local one), ``auto`` (an existing cluster) or ``HOST:PORT`` / ``ray://HOST:PORT``.
    ``device``: ``cpu`` (one CPU per actor), ``cuda`` (one GPU per actor) or
    ``auto`` (GPUs if the cluster has any). ``workers``: how many actors
    (default one per GPU, or per CPU with ``cpu``). Ray is shut down at the
    end only if this call started it.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        use_gpu = device != "cpu" and (device.startswith("cuda") or resources.get("GPU", 0) >= 1)
        count = actor_count(resources, use_gpu, workers)
        cpus = cpus_per_actor([node["Resources"] for node in ray.nodes() if node.get("Alive")], use_gpu, count)
        return _drive(ray, images, Path(output), factory, use_gpu, count, cpus, overwrite, poll_s, grace_s)
    finally:
        if started:
            ray.shutdown()


def _drive(
    ray: Any, images: Sequence[Path], output: Path, factory: FitFactory, use_gpu: bool, count: int, cpus: int,
    overwrite: bool, poll_s: float, grace_s: float,
) -> list[ImageResult]:
    from recon.progress import info

    ledger = Ledger(images, output, overwrite)
    actor_class = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus, max_restarts=0)(FitActor)
    device = "cuda:0" if use_gpu else "cpu"  # Ray gives each GPU actor its own GPU as the only visible one
    labels = [f"ray{i}" for i in range(count)]
    actors: dict[str, Any] = {}
    waiting: dict[Any, tuple[str, int | None]] = {}  # object ref -> (actor label, image index or None for "ready")
    busy: dict[str, int] = {}

    def start(label: str) -> None:
        actors[label] = actor_class.remote(factory, device)
        waiting[actors[label].pid.remote()] = (label, None)

    def replace(label: str) -> None:
        ray.kill(actors[label], no_restart=True)
        if ledger.pending:
            start(label)
        else:
            del actors[label]

    ready: set[str] = set()
    try:
        with LiveView(ledger, labels) as view:
            for label in labels:
                start(label)
            while not ledger.complete:
                for label in labels:
                    if label in ready and label in actors and label not in busy:
                        taken = ledger.take()
                        if taken is None:
                            break
                        index, retry = taken
                        result = ledger.results[index]
                        waiting[actors[label].fit.remote(str(result.image), str(result.run_dir), retry)] = (label, index)
                        busy[label] = index
                        ledger.start(index, label)
                if ledger.complete:
                    break
                done, _ = ray.wait(list(waiting), num_returns=1, timeout=poll_s)
                for ref in done:
                    label, index = waiting.pop(ref)
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        if index is None:
                            raise ReconError(f"Ray worker {label} could not start: {_short(exc)}") from None
                        busy.pop(label, None)
                        ready.discard(label)
                        ledger.crash(index, f"Ray actor died ({type(exc).__name__})")
                        replace(label)
                        continue
                    if index is None:
                        ready.add(label)
                        ledger.worker(label, device, int(value), cpus)
                        ledger.save()
                        continue
                    busy.pop(label, None)
                    if value[0] == "done":
                        ledger.finish(index, value[1])
                    elif value[0] == "failed":
                        ledger.fail(index, value[1])
                        if value[2]:
                            info("[dim]" + value[2].rstrip().replace("[", "\\[") + "[/]")
                    else:
                        ready.discard(label)
                        ledger.crash(index, value[1])
                        replace(label)
                view.refresh()
    except KeyboardInterrupt:
        for ref, (_, index) in waiting.items():
            if index is not None:
                ray.cancel(ref)
        running = [ref for ref, (_, index) in waiting.items() if index is not None]
        if running:
            ray.wait(running, num_returns=len(running), timeout=min(grace_s, 5.0))
        ledger.interrupt()
        raise
    finally:
        for handle in actors.values():
            ray.kill(handle, no_restart=True)
    ledger.save()
    return ledger.results


def _short(exc: BaseException) -> str:
    """The last informative line of a Ray error (its messages hold the remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith("File ")]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__))[:300]

