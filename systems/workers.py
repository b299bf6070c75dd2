"""A batch over every GPU of a machine (or several CPU workers): one spawned process per device.

Each worker process builds its fit function once (``factory(device)``, which
loads the guidance models) and then fits the images the parent hands it, one
at a time: the parent keeps the queue and gives the next image to whichever
worker is free, so a slow image never idles the others. The parent alone
decides what each image's status is (:class:`Ledger`, shared with the Ray
runner in :mod:`recon.systems.ray_batch`), so no image is lost or finished
twice:

* a worker that dies (SIGKILL, segfault) or hits a CUDA error / out-of-memory
  (it reports it and exits, since the CUDA context may be unusable) is
  replaced by a fresh process; its image is retried once (resuming the run
  folder from its last checkpoint), then reported failed with the reason;
* an image whose run folder says ``finished`` is never fitted again (a worker
  killed after finishing, before reporting, is noticed on the retry);
* Ctrl-C stops every worker (each marks its run interrupted), writes the
  summary and re-raises; rerunning the batch resumes the interrupted runs.

``batch_summary.json`` is rewritten atomically whenever an image starts or
ends (statuses pending / running / finished / failed / skipped, plus each
worker's pid, image, CPU threads and cores), and the console shows a progress
bar per worker and an overall one.

CPU share: each worker is pinned to its own whole physical cores (an equal
share of those this process may use) and runs that many CPU threads (torch,
OpenMP, MKL and OpenBLAS, set before it imports anything; the xatlas child of
an export inherits the pinning). Otherwise each worker would size its thread
pools for the whole machine: N workers would run N times as many busy threads
as there are cores whenever their CPU work (export, data loading) overlaps.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from unittest import mock

from recon.errors import ReconError
from recon.runs import RunDir
from recon.systems.batch import ImageResult, is_finished, one_line, run_names, save_summary

FitOne = Callable[[Path, Path, bool], dict[str, Any]]
"""``fit_one(image, run_dir, retry)`` -> ``{"exports": {...}, "timings_s": {...}}``; ``retry`` is True when an
earlier attempt of this image crashed its worker (the run folder then holds that attempt: resume it)."""
FitFactory = Callable[[str], FitOne]
"""Picklable; called once in each worker with its device ("cuda:0", "cpu") to load the models."""

RETRIES = 1
"""Extra attempts of an image whose worker crashed."""
CRASH_EXIT_CODE = 70
"""Exit status of a worker that reported a CUDA error or out-of-memory and quit."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Environment variables that size a worker's CPU thread pools (read once, as the libraries load)."""


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its label, the device its factory gets, its environment and CPU threads."""

    label: str
    """Shown in the live view and the summary: gpu0, gpu2, cpu1."""
    device: str
    """Device string for the factory: ``cuda:0`` (its only visible GPU) or ``cpu``."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables of the process (CUDA_VISIBLE_DEVICES for a GPU worker)."""
    threads: int = 0
    """torch CPU threads (0 keeps torch's default)."""
    cpus: tuple[int, ...] = ()
    """CPUs the process is pinned to (empty: not pinned); :func:`share_cpus` fills it."""


def parse_cpu_list(text: str) -> list[int]:
    """CPU numbers from a kernel CPU list such as ``0-3,8,10-11``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def physical_cores(cpus: Iterable[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyperthread siblings together), ordered by their first CPU.

    Reads ``sysfs``'s ``cpuN/topology/thread_siblings_list``; a CPU whose
    topology cannot be read is a core of its own.
    """
    wanted = sorted(set(cpus))
    groups: dict[int, list[int]] = {}
    for cpu in wanted:
        try:
            siblings = parse_cpu_list((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
        except (OSError, ValueError):
            siblings = [cpu]
        groups.setdefault(min([cpu, *siblings]), []).append(cpu)
    return [tuple(group) for _, group in sorted(groups.items())]


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; all CPUs where the platform cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The CPUs a container's cgroup (v2) quota allows this process, rounded up (``cpu.max``: "QUOTA PERIOD");
    None without a quota or where the file is missing or unreadable."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # "max 100000" (no quota) gives ValueError too
        return None


def cpu_shares(count: int, cores: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], int]]:
    """Splits physical ``cores`` (see :func:`physical_cores`) among ``count`` workers: (CPUs, threads) each.

    Contiguous runs of whole cores, sizes differing by at most one, ``threads``
    the number of cores in the share. With fewer cores than workers, every
    worker gets all the cores and one thread: pinning some workers together on
    one core would leave another core to a single worker.
    """
    if count < 1 or not cores:
        return [((), 0)] * max(count, 0)
    if count > len(cores):
        return [(tuple(cpu for core in cores for cpu in core), 1)] * count
    base, extra = divmod(len(cores), count)
    shares, start = [], 0
    for i in range(count):
        size = base + (i < extra)
        shares.append((tuple(cpu for core in cores[start:start + size] for cpu in core), size))
        start += size
    return shares


def share_cpus(workers: Sequence[WorkerSpec], cores: Sequence[tuple[int, ...]] | None = None) -> list[WorkerSpec]:
    """``workers`` with an equal share each of ``cores`` (default: the :func:`physical_cores` of :func:`usable_cpus`,
    as many as a container's :func:`cpu_quota` allows): pinned CPUs, thread count and the thread-pool variables of
    :data:`THREAD_VARIABLES` in their environment. Specs that name their CPUs keep them."""
    if cores is None:
        cores = physical_cores(usable_cpus())
        cores = cores[: cpu_quota() or len(cores)]
    shares = cpu_shares(len(workers), cores)
    shared = []
    for spec, (share, threads) in zip(workers, shares):
        if spec.cpus or not share:
            shared.append(spec)
            continue
        env = dict(spec.env) | {name: str(threads) for name in THREAD_VARIABLES}
        shared.append(replace(spec, env=tuple(env.items()), cpus=share, threads=threads))
    return shared


@contextlib.contextmanager
def pinned(cpus: Sequence[int]) -> Iterator[None]:
    """Restricts the calling thread to ``cpus`` while inside, so that a process started there inherits it.

    Does nothing for empty ``cpus`` or where the platform has no CPU affinity.
    """
    before = os.sched_getaffinity(0) if cpus and hasattr(os, "sched_setaffinity") else None
    try:
        if before is not None:
            os.sched_setaffinity(0, cpus)
    except OSError:  # CPUs this process may not use (a container's limits changed): start unpinned
        before = None
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def gpu_workers(spec: str, available: int, processes: int | None = None) -> list[WorkerSpec]:
    """Workers for ``--gpus``: ``all``, a count ``N`` (the first N GPUs) or indices ``0,2``.

    ``available`` is the number of visible CUDA devices. Each worker sees only
    its own GPU (CUDA_VISIBLE_DEVICES) as ``cuda:0``. ``processes`` (``--workers``)
    spreads that many worker processes over the GPUs, round robin (default one
    per GPU): two per GPU let one image's CPU-bound export overlap another's fit.
    Labels are ``gpu2``, or ``gpu2.0``, ``gpu2.1``, ... when there are more workers than GPUs.
    """
    spec = spec.strip()
    if available < 1:
        raise ReconError(f"--gpus {spec}: no CUDA GPU on this machine (use --device cpu --workers N for CPU workers)")
    if spec == "all":
        indices = list(range(available))
    elif spec.isdigit():
        count = int(spec)
        if not 1 <= count <= available:
            raise ReconError(f"--gpus {spec}: this machine has {available} GPU(s); give 1..{available}, all, or indices such as 0,2")
        indices = list(range(count))
    else:
        try:
            indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ReconError(f"--gpus {spec!r}: give all, a count (2) or comma-separated GPU indices (0,2)") from None
        bad = [i for i in indices if not 0 <= i < available]
        if not indices or bad or len(set(indices)) != len(indices):
            raise ReconError(f"--gpus {spec}: indices must be distinct and in 0..{available - 1}")
    processes = len(indices) if processes is None else processes
    if processes < len(indices):
        raise ReconError(f"--gpus {spec} --workers {processes}: give at least one worker per GPU ({len(indices)})")
    workers = []
    for k in range(processes):
        gpu = indices[k % len(indices)]
        label = f"gpu{gpu}" if processes == len(indices) else f"gpu{gpu}.{k // len(indices)}"
        workers.append(WorkerSpec(label, "cuda:0", (("CUDA_VISIBLE_DEVICES", str(gpu)),)))
    return workers  # round robin: the first images go to different GPUs


def cpu_workers(count: int) -> list[WorkerSpec]:
    """``count`` CPU workers (``--device cpu --workers N``); :func:`share_cpus` gives each its cores as the pool starts."""
    if count < 1:
        raise ReconError(f"--workers {count}: give at least 1")
    return [WorkerSpec(f"cpu{i}", "cpu") for i in range(count)]


def local_workers(gpus: str | None, workers: int | None, device: str) -> list[WorkerSpec]:
    """The workers of ``--gpus SPEC [--workers N]`` (a process per GPU, or N over them) or ``--device cpu --workers N``."""
    if gpus is not None:
        if device == "cpu":
            raise ReconError("--gpus starts one worker per GPU; for CPU workers use --device cpu --workers N instead")
        import torch

        return gpu_workers(gpus, torch.cuda.device_count(), workers)
    if device != "cpu":
        raise ReconError(f"--workers {workers} starts CPU worker processes: add --device cpu (or use --gpus for one worker per GPU)")
    return cpu_workers(workers or 1)


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the worker's device unusable (CUDA out-of-memory or a CUDA error), so the worker must be replaced."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(mark in text for mark in ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error")):
        return True
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    if torch is None:
        return False
    fatal = (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.cuda.OutOfMemoryError))
    return isinstance(exc, fatal)


def exit_reason(exitcode: int | None) -> str:
    """Why a worker process ended, from its exit code: ``killed by SIGKILL``, ``exited with code 3``."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# ------------------------------------------------------------------ bookkeeping
class Ledger:
    """Which image is pending, running where, or done; retries; the live ``batch_summary.json``.

    Shared by the process pool and the Ray runner. Indices are positions in
    ``images``; run folders are ``output/<run_names(images)>``. Finished runs
    are marked skipped up front (unless ``overwrite``).
    """

    def __init__(self, images: Sequence[Path], output: Path, overwrite: bool = False, retries: int = RETRIES) -> None:
        self.output = Path(output)
        self.retries = retries
        self.results = [ImageResult(image=Path(i), run_dir=self.output / n, status="pending") for i, n in zip(images, run_names(images))]
        self.pending: deque[int] = deque()
        self.running: dict[int, float] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.log: list[str] = []
        """Events for the console (``error: ...`` lines), drained by the caller."""
        for index, result in enumerate(self.results):
            if not overwrite and is_finished(result.run_dir):
                result.status = "skipped"
            else:
                self.pending.append(index)
        self.output.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def complete(self) -> bool:
        """Whether every image has its final status."""
        return not self.pending and not self.running

    def count(self, *statuses: str) -> int:
        """How many images have one of ``statuses``."""
        return sum(r.status in statuses for r in self.results)

    def worker(self, label: str, device: str, pid: int | None = None, threads: int = 0, cpus: Sequence[int] = ()) -> None:
        """Records (or updates, after a restart) a worker for the summary: its device, pid, CPU threads and pinned CPUs."""
        entry = self.workers.setdefault(label, {"label": label, "device": device, "pid": None, "image": None, "restarts": -1})
        entry.update(pid=pid, threads=threads or None, cpus=list(cpus))
        entry["restarts"] += 1

    def take(self) -> tuple[int, bool] | None:
        """The next image to start as (index, retry), or None when nothing is pending.

        A retried image whose run folder is already finished (its worker died
        after finishing, before reporting) is recorded as finished, not redone.
        """
        while self.pending:
            index = self.pending.popleft()
            result = self.results[index]
            retry = result.attempts > 0
            if retry and is_finished(result.run_dir):
                meta = RunDir(result.run_dir).read_meta()
                self._end(index, "finished", None, {"exports": (meta.get("exports") or {}).get("files"), "timings_s": meta.get("timings_s")})
                continue
            return index, retry
        return None

    def start(self, index: int, worker: str) -> None:
        """``worker`` began image ``index``."""
        result = self.results[index]
        result.status, result.worker, result.error = "running", worker, None
        result.attempts += 1
        result.started_at = round(time.time(), 3)
        self.running[index] = time.perf_counter()
        if worker in self.workers:
            self.workers[worker]["image"] = str(result.image)
        self.save()

    def finish(self, index: int, outcome: dict[str, Any]) -> None:
        """Image ``index`` finished; ``outcome`` as returned by :data:`FitOne`."""
        self._end(index, "finished", None, outcome)

    def fail(self, index: int, reason: str) -> None:
        """Image ``index`` failed for ``reason`` (bad input, an error of its own): no retry."""
        self._end(index, "failed", reason, {})

    def crash(self, index: int, reason: str) -> None:
        """The worker running image ``index`` crashed: retry it (first in line) or, after the retries, fail it."""
        result = self.results[index]
        self._release(index)
        if result.attempts <= self.retries:
            result.status, result.error = "pending", f"retrying: {reason}"
            self.pending.appendleft(index)
            self.log.append(f"{result.image}: worker {result.worker} crashed ({reason}); retrying the image")
            self.save()
        else:
            self._end(index, "failed", f"worker crashed twice; last: {reason}", {})

    def interrupt(self) -> None:
        """Ctrl-C: running images become interrupted (their run folders resume on the next batch)."""
        for index in list(self.running):
            self._release(index)
            self.results[index].status = "interrupted"
        self.save()

    def save(self) -> Path:
        """Atomically rewrites ``output/batch_summary.json``."""
        return save_summary(self.output, self.results, list(self.workers.values()))

    def _release(self, index: int) -> float:
        start = self.running.pop(index, time.perf_counter())
        result = self.results[index]
        result.seconds = round(result.seconds + time.perf_counter() - start, 3)
        for entry in self.workers.values():
            if entry["image"] == str(result.image):
                entry["image"] = None
        return start

    def _end(self, index: int, status: str, reason: str | None, outcome: dict[str, Any]) -> None:
        result = self.results[index]
        self._release(index)
        result.status, result.error = status, reason
        result.exports = {k: str(v) for k, v in (outcome.get("exports") or {}).items()}
        result.timings_s = dict(outcome.get("timings_s") or {})
        if reason:
            self.log.append(reason if str(result.image) in reason else f"{result.image}: {reason}")
        self.save()


class LiveView:
    """The console view of a scaled-out batch: a bar per worker (its image's steps) and an overall one.

    The per-worker bars follow each running image's ``progress.json``; the
    overall bar counts finished + failed + skipped images with rate and ETA.
    Disabled by ``--quiet``.
    """

    def __init__(self, ledger: Ledger, labels: Sequence[str]) -> None:
        from recon.progress import progress_bar

        self.ledger = ledger
        self.bar = progress_bar()
        self.start = time.perf_counter()
        self.done_at_start = ledger.count("skipped")
        total = len(ledger.results)
        self.overall = self.bar.add_task("batch", total=total, completed=self.done_at_start, rate="", status="")
        self.tasks = {label: self.bar.add_task(label, total=None, rate="", status="starting") for label in labels}

    def __enter__(self) -> LiveView:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.bar.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.refresh()
        self.bar.__exit__(None, None, None)

    def refresh(self) -> None:
        """Re-reads the running images' progress and redraws; prints queued error lines above the bars."""
        from rich.markup import escape

        from recon.progress import error, format_rate

        ledger = self.ledger
        for line in ledger.log:
            error(escape(line))
        ledger.log.clear()
        busy = {r.worker: r for r in ledger.results if r.status == "running"}
        for label, task in self.tasks.items():
            result = busy.get(label)
            if result is None:
                self.bar.update(task, total=1, completed=0, status="idle" if label in ledger.workers else "starting")
                continue
            try:
                progress = RunDir(result.run_dir).read_progress() if result.run_dir.is_dir() else {}
            except (OSError, ValueError):  # the folder is being replaced (--overwrite)
                progress = {}
            stage = progress.get("stage") or "preparing"
            self.bar.update(task, total=progress.get("total") or 1, completed=progress.get("step") or 0, status=escape(f"{result.image.name} ({stage})"))
        done = ledger.count("finished", "failed", "skipped")
        counts = f"{ledger.count('finished')} done, {ledger.count('failed')} failed, {ledger.count('running')} running"
        rate = format_rate(done - self.done_at_start, time.perf_counter() - self.start)
        self.bar.update(self.overall, completed=done, rate=rate.replace("it", "img"), status=counts)


# ------------------------------------------------------------------ the worker process
def serve(conn: Connection, factory: FitFactory, device: str, threads: int) -> None:
    """A worker process's main loop: build the fit function once, then fit what arrives on ``conn``.

    Messages out: ("ready", pid) | ("setup_failed", reason) | ("done", index, outcome)
    | ("failed", index, reason, traceback or "") | ("crashed", index, reason), the last followed by exit
    :data:`CRASH_EXIT_CODE`. In: (index, image, run_dir, retry) or None (stop).
    """
    from recon.errors import sigterm_as_interrupt
    from recon.progress import set_quiet

    set_quiet(True)  # the parent's live view is the console
    with contextlib.suppress(KeyboardInterrupt, EOFError, BrokenPipeError), sigterm_as_interrupt():
        if threads:
            import torch

            torch.set_num_threads(threads)
        try:
            fit_one = factory(device)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the batch
            conn.send(("setup_failed", one_line(exc)))
            return
        conn.send(("ready", os.getpid()))
        while (task := conn.recv()) is not None:
            index, image, run_dir, retry = task
            try:
                outcome = fit_one(Path(image), Path(run_dir), retry) or {}
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the worker
                if is_fatal(exc):
                    conn.send(("crashed", index, one_line(exc)))
                    conn.close()
                    sys.exit(CRASH_EXIT_CODE)
                trace = "" if isinstance(exc, ReconError) else traceback.format_exc()
                conn.send(("failed", index, one_line(exc), trace))
                continue
            conn.send(("done", index, plain_outcome(outcome)))


def plain_outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    """A fit function's result as plain values to send between processes: exports as strings, timings."""
    return {"exports": {k: str(v) for k, v in (outcome.get("exports") or {}).items()}, "timings_s": dict(outcome.get("timings_s") or {})}


@dataclass
class _Slot:
    """One worker position of the pool: its spec and its current process (replaced after a crash)."""

    spec: WorkerSpec
    process: Any = None
    conn: Connection | None = None
    ready: bool = False
    index: int | None = None
    early_deaths: int = 0
    inbox: list[tuple[Any, ...]] = field(default_factory=list)

    def start(self, context: Any, factory: FitFactory) -> None:
        parent, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, factory, self.spec.device, self.spec.threads), name=f"recon-{self.spec.label}", daemon=True)
        # A spawned child copies os.environ and the starting thread's CPU affinity before it imports anything.
        with mock.patch.dict(os.environ, dict(self.spec.env)), pinned(self.spec.cpus):
            self.process.start()
        child.close()
        self.conn, self.ready, self.index = parent, False, None

    def receive(self) -> None:
        """Moves every message waiting on the pipe into ``inbox``."""
        try:
            while self.conn is not None and self.conn.poll():
                self.inbox.append(self.conn.recv())
        except (EOFError, OSError):
            pass

    def stop(self, grace_s: float) -> None:
        """Asks the process to stop, then terminates and kills it if it does not within ``grace_s``."""
        if self.process is None:
            return
        if self.process.is_alive() and self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.process.join(grace_s)
        for ending in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                ending()
                self.process.join(grace_s)
        if self.conn is not None:
            self.conn.close()


def run_pool(
    images: Sequence[Path], output: Path, factory: FitFactory, workers: Sequence[WorkerSpec],
    overwrite: bool = False, poll_s: float = 0.5, grace_s: float = 10.0,
) -> list[ImageResult]:
    """Fits ``images`` into ``output/<stem>/`` with one spawned process per :class:`WorkerSpec`.

    ``factory`` runs once per worker process (see :data:`FitFactory`). Each
    worker gets its share of the CPUs (:func:`share_cpus`). Returns
    one :class:`ImageResult` per image, in input order, and leaves
    ``output/batch_summary.json`` written. Raises :class:`ReconError` when a
    worker cannot start (e.g. missing weights), KeyboardInterrupt on Ctrl-C
    (after stopping the workers; running images are then ``interrupted``).
    """
    ledger = Ledger(images, output, overwrite)
    context = multiprocessing.get_context("spawn")
    slots = [_Slot(spec) for spec in share_cpus(workers)]
    try:
        with LiveView(ledger, [s.spec.label for s in slots]) as view:
            for slot in slots:
                slot.start(context, factory)
            while not ledger.complete:
                _hand_out(slots, ledger)
                if ledger.complete:
                    break
                live = [s for s in slots if s.process is not None]
                wait([s.conn for s in live if s.conn is not None] + [s.process.sentinel for s in live], timeout=poll_s)
                for slot in slots:
                    slot.receive()
                    _handle_messages(slot, ledger)
                    if slot.process is not None and not slot.process.is_alive():
                        slot.receive()
                        _handle_messages(slot, ledger)
                        _handle_exit(slot, ledger, context, factory)
                view.refresh()
    except KeyboardInterrupt:
        # Workers in the terminal's process group got the same Ctrl-C: give them time to mark their runs interrupted.
        deadline = time.monotonic() + min(2.0, grace_s)
        for slot in slots:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
                if slot.process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.process.pid, signal.SIGINT)
        ledger.interrupt()
        raise
    finally:
        for slot in slots:
            slot.stop(grace_s)
    ledger.save()
    return ledger.results


def _hand_out(slots: Sequence[_Slot], ledger: Ledger) -> None:
    """Gives the next pending image to every ready, idle worker."""
    for slot in slots:
        if slot.ready and slot.index is None and slot.process is not None and slot.process.is_alive():
            taken = ledger.take()
            if taken is None:
                return
            index, retry = taken
            result = ledger.results[index]
            try:
                slot.conn.send((index, str(result.image), str(result.run_dir), retry))
            except (OSError, BrokenPipeError):
                ledger.pending.appendleft(index)  # the worker just died; its exit is handled next
                continue
            slot.index = index
            ledger.start(index, slot.spec.label)


def _handle_messages(slot: _Slot, ledger: Ledger) -> None:
    from recon.progress import info

    while slot.inbox:
        message = slot.inbox.pop(0)
        kind = message[0]
        if kind == "ready":
            slot.ready = True
            ledger.worker(slot.spec.label, slot.spec.device, int(message[1]), slot.spec.threads, slot.spec.cpus)
            ledger.save()
        elif kind == "setup_failed":
            raise ReconError(f"worker {slot.spec.label} ({slot.spec.device}) could not start: {message[1]}")
        elif kind == "done":
            ledger.finish(message[1], message[2])
            slot.index = None
        elif kind == "failed":
            ledger.fail(message[1], message[2])
            if message[3]:
                info("[dim]" + message[3].rstrip().replace("[", "\\[") + "[/]")
            slot.index = None
        elif kind == "crashed":
            ledger.crash(message[1], message[2])
            slot.index = None


def _handle_exit(slot: _Slot, ledger: Ledger, context: Any, factory: FitFactory) -> None:
    """A worker process ended: retry or fail its image, and start a fresh process if work is left."""
    code = slot.process.exitcode
    if slot.index is not None:
        ledger.crash(slot.index, exit_reason(code))
        slot.index = None
    if not slot.ready:
        slot.early_deaths += 1
        if slot.early_deaths >= 2:
            raise ReconError(f"worker {slot.spec.label} ({slot.spec.device}) died while starting twice ({exit_reason(code)})")
    if slot.conn is not None:
        slot.conn.close()
    slot.process, slot.conn = None, None
    if ledger.pending:
        slot.start(context, factory)
