"""``recon app``: a local web app (Gradio) over :mod:`recon.api`: drop a photo, watch it become a mesh.

The page shows the cut-out the model will see, the fit's stage / step / ETA
and preview renders while it runs (read from the run folder's progress.json
and previews/, as ``recon fit`` writes them), then the textured GLB in a 3D
viewer, the turntable video, and downloads (GLB, OBJ+MTL+PNG as a zip).

Each job is one :func:`recon.api.fit` call in a child process under
``OUTPUT/<name>/`` (the uploaded file is kept as ``OUTPUT/uploads/<name>.<ext>``,
so ``recon fit OUTPUT/uploads/<name>.<ext> -o OUTPUT --resume`` continues it).
Jobs queue one at a time (one GPU); Cancel interrupts the child as Ctrl-C does
(progress.json ``interrupted``, checkpoints kept) and Resume continues it.
The app binds 127.0.0.1 unless ``--host`` says otherwise, loads no font,
script or analytics from the internet, and answers the Gradio client API
(``api_name="/reconstruct"``; docs/APP.md).
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' ``gr.Request`` annotation as an object.
import functools
import html
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

PRESETS = ("default", "fast", "cpu")
GUIDANCE_MODES = ("zero123", "cascade", "cascade-training-free")
EXTRA_FORMATS = ("obj", "ply")
POLL_S = 0.5
"""Seconds between two reads of the run folder while a job runs."""
CANCEL_WAIT_S = 120.0
"""Longest wait for a cancelled job to write its interrupted status and exit."""
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass(kw_only=True)
class AppCommand:
    """A local web app: upload a photo, see its cut-out, run the fit with live progress, view and download the mesh."""

    host: str = "127.0.0.1"
    """Address to serve on; 127.0.0.1 keeps the app on this machine (0.0.0.0 opens it to the network)."""
    port: int = 7860
    """Port to serve on."""
    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))] = Path("outputs/app")
    """Folder of the jobs' run folders (one per job) and uploads/."""
    model: str | None = None
    """Zero123 weights for every job (as recon fit --model; default: the preset's)."""
    preset: str = "default"
    """Preset selected when the page opens: default, fast, cpu, or a .yaml path (also offered in the page)."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Config overrides applied to every job, e.g. --set stages.fine.steps=200 (repeatable)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""

    def run(self) -> int:
        """Serves the app until Ctrl-C; exit code 0."""
        demo = build_app(self)
        launch(demo, self)
        return 0


@dataclass
class JobOptions:
    """The page's settings for one job, as :func:`recon.api.fit` keyword arguments."""

    preset: str
    overrides: list[str]
    model: str | None
    formats: list[str]
    device: str
    seed: int | None
    steps: int | None
    foreground_ratio: float
    remove_bg: bool

    def config(self) -> Any:
        """The job's validated config (:func:`recon.api.build_config`); raises ReconError on a bad setting."""
        from recon.api import build_config

        return build_config(
            self.preset, self.overrides, model=self.model, formats=self.formats, seed=self.seed,
            foreground_ratio=self.foreground_ratio, remove_bg=self.remove_bg, steps=self.steps,
        )


def _fit_in_child(image: str, output: str, options: JobOptions, resume: bool, conn: Any) -> None:
    """Child-process body: one :func:`recon.api.fit` call; sends (status, exports or one-line error) on ``conn``."""
    from recon.api import fit
    from recon.errors import ReconError

    # Cancel sends SIGINT; a server started in the background (nohup, `&`) passes SIGINT on as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = fit(
            image, output, options.preset, options.overrides, model=options.model, formats=options.formats,
            device=options.device, seed=options.seed, resume=resume, quiet=True, foreground_ratio=options.foreground_ratio,
            remove_bg=options.remove_bg, steps=options.steps, batch=False,
        )[0]
        conn.send(("finished", result.exports))
    except KeyboardInterrupt:
        conn.send(("interrupted", None))
    except ReconError as exc:
        conn.send(("failed", str(exc)))
    except Exception as exc:  # noqa: BLE001 - the page shows one line; the traceback goes to the server log
        traceback.print_exc()
        lines = str(exc).strip().splitlines()
        conn.send(("failed", f"{type(exc).__name__}: {lines[0] if lines else ''}"))


@dataclass
class Job:
    """One fit in a child process (spawned, so CUDA and torch threads start clean)."""

    image: Path
    """The upload's copy; its stem is the run folder's name."""
    run_dir: Path
    options: JobOptions
    stages: list[tuple[str, int]]
    """(stage name, steps) in order, for the overall step count."""
    process: Any = None
    conn: Any = None
    outcome: tuple[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, resume: bool = False) -> None:
        """Starts (or, with ``resume``, continues) the fit in a new child process."""
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        self.outcome, self.conn = None, receive
        self.process = context.Process(
            target=_fit_in_child, args=(str(self.image), str(self.run_dir.parent), self.options, resume, send), daemon=True
        )
        self.process.start()
        send.close()

    @property
    def running(self) -> bool:
        """Whether the child is still working."""
        return self.process is not None and self.process.is_alive() and self.outcome is None

    def poll(self) -> tuple[str, Any] | None:
        """(status, exports | error) once the child has reported, else None."""
        with self.lock:
            if self.outcome is None and self.conn is not None and self.conn.poll():
                try:
                    self.outcome = self.conn.recv()
                except EOFError:  # the child died without reporting (killed, crashed)
                    self.process.join()
                    self.outcome = ("failed", f"the job's process exited with code {self.process.exitcode} without a result")
                self.process.join()
            return self.outcome

    def cancel(self) -> None:
        """Interrupts the fit like Ctrl-C (the run keeps its checkpoints, progress.json says interrupted) and waits."""
        if self.running:
            os.kill(self.process.pid, signal.SIGINT)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.outcome is None:
                self.process.terminate()
                self.process.join()
                self.outcome = ("failed", f"the job did not stop within {CANCEL_WAIT_S:.0f} s of Cancel and was killed; its checkpoints are kept")


def _run_name(upload: Path, output: Path) -> str:
    """A new run-folder name: the upload's stem (safe characters) and the time, unique under ``output``."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", upload.stem).strip("_")[:40] or "image"
    name = base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    index = 2
    while (output / name).exists() or any((output / "uploads").glob(f"{name}.*")):
        name, index = f"{base}-{index}", index + 1
    return name


def obj_zip(exports: dict[str, str]) -> Path | None:
    """``exports/mesh_obj.zip``: the OBJ, its MTL and the textures the MTL names; None without an OBJ export."""
    from recon.fileio import atomic_path

    if "obj" not in exports:
        return None
    obj = Path(exports["obj"])
    members = [obj]
    mtl = obj.with_suffix(".mtl")
    if mtl.is_file():
        members.append(mtl)
        for line in mtl.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("map_"):
                texture = obj.parent / line.split()[-1]
                if texture.is_file() and texture not in members:
                    members.append(texture)
    target = obj.with_name(f"{obj.stem}_obj.zip")
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            archive.write(member, member.name)
    return target


def _message(exc: Exception, upload: str) -> str:
    """The CLI's one-line message for ``exc``, naming the uploaded file by its own name (not Gradio's temp path)."""
    return "error: " + str(exc).replace(str(upload), Path(upload).name)


def _status_html(kind: str, text: str, value: int | None = None, maximum: int | None = None) -> str:
    """The status panel: a coloured line of text and, while running, a progress bar."""
    colours = {"error": "#b00020", "done": "#1b7f3b", "running": "#1d2330", "cancelled": "#8a6d00"}
    bar = f'<progress value="{value}" max="{maximum}" style="width:100%"></progress>' if maximum else ""
    return f'<div class="recon-status" data-kind="{kind}" style="color:{colours[kind]}">{html.escape(text)}</div>{bar}'


def _seconds(value: float | None) -> str:
    if value is None:
        return "estimating"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def progress_line(job: Job, started: float) -> tuple[str, int, int]:
    """(text, overall step, overall total) of a running job from its progress.json."""
    from recon.runs import RunDir

    total = sum(steps for _, steps in job.stages) or 1
    elapsed = f"elapsed {time.monotonic() - started:.0f} s"
    if not RunDir.is_run(job.run_dir):
        return f"starting: loading models and reading the image ({elapsed})", 0, total
    progress = RunDir(job.run_dir).read_progress()
    stage, step = progress.get("stage"), int(progress.get("step") or 0)
    if stage is None:
        return f"preparing the guidance ({elapsed})", 0, total
    before = 0
    for name, steps in job.stages:
        if name == stage:
            break
        before += steps
    overall = before + step
    if overall >= total:
        return f"exporting the mesh and the turntable ({elapsed})", total, total
    eta = _seconds(progress.get("eta_s"))
    text = f"stage {stage}: step {step} / {progress.get('total')} · ETA {eta} for this stage · overall {overall} / {total} · {elapsed}"
    return text, overall, total


def newest_preview(run_dir: Path) -> Path | None:
    """The run's latest preview strip (previews/step_XXXXXX.png), or None."""
    previews = sorted((run_dir / "previews").glob("step_*.png"))
    return previews[-1] if previews else None


class JobBoard:
    """The jobs of the app, by browser session: the current (or last) job of each, under a lock."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def put(self, session: str, job: Job) -> None:
        """Makes ``job`` the session's current job."""
        with self._lock:
            self._jobs[session] = job

    def get(self, session: str) -> Job | None:
        """The session's current or last job."""
        with self._lock:
            return self._jobs.get(session)


def _outputs(job: Job) -> dict[str, Any]:
    """The finished job's viewer, video and download values."""
    exports = job.outcome[1] if job.outcome else {}
    files = [exports["glb"]] if "glb" in exports else []
    archive = obj_zip(exports)
    if archive is not None:
        files.append(str(archive))
    if "ply" in exports:
        files.append(exports["ply"])
    video = exports.get("turntable")
    return {
        "model": exports.get("glb"),
        "video": video if video and video.endswith(".mp4") else None,
        "files": files or None,
    }


def follow(job: Job, resume: bool = False) -> Iterator[tuple[str, Any, Any, Any, Any]]:
    """Starts ``job`` and yields (status html, preview, glb, video, files) every :data:`POLL_S` until it ends."""
    import gradio as gr

    started = time.monotonic()
    job.start(resume=resume)
    shown: Path | None = None
    try:
        while job.poll() is None:
            text, value, total = progress_line(job, started)
            preview = newest_preview(job.run_dir)
            update = str(preview) if preview is not None and preview != shown else gr.skip()
            shown = preview or shown
            yield _status_html("running", text, value, total), update, gr.skip(), gr.skip(), gr.skip()
            time.sleep(POLL_S)
    finally:
        if job.running:  # the page went away or Gradio cancelled the event
            job.cancel()
    status, detail = job.outcome
    preview = newest_preview(job.run_dir)
    if status == "finished":
        out = _outputs(job)
        text = f"done in {time.monotonic() - started:.0f} s: {job.run_dir}"
        yield _status_html("done", text), str(preview) if preview else gr.skip(), out["model"], out["video"], out["files"]
    elif status == "interrupted":
        yield _status_html("cancelled", _cancelled_text(job)), gr.skip(), None, None, None
    else:
        yield _status_html("error", f"error: {detail}"), gr.skip(), None, None, None


def _cancelled_text(job: Job) -> str:
    from recon.runs import RunDir

    step = RunDir(job.run_dir).read_progress().get("step", 0) if RunDir.is_run(job.run_dir) else 0
    return (
        f"cancelled at step {step}; the run folder {job.run_dir} keeps its checkpoints: press Resume, or run "
        f"recon fit {job.image} -o {job.run_dir.parent} --resume"
    )


def build_app(command: AppCommand) -> Any:
    """The Gradio Blocks of the app (not yet launched); see :func:`launch`."""
    from recon.api import build_config, cutout
    from recon.errors import ReconError

    try:
        import gradio as gr
    except ImportError as exc:
        raise ReconError("recon app needs Gradio: pip install 'recon-zero123[app]' (or pip install -e '.[app]' in a checkout)") from exc

    output = command.output
    board = JobBoard()
    presets = list(PRESETS) if command.preset in PRESETS else [command.preset, *PRESETS]

    # the slider starts where a `recon fit` with the same settings would recentre: the weights' own framing
    start_ratio = build_config(command.preset, command.set, model=command.model).preprocess.foreground_ratio

    def options(preset: str, mode: str, seed: float | None, steps: float | None, formats: list[str], ratio: float, remove_bg: bool) -> JobOptions:
        return JobOptions(
            preset=preset, overrides=[*command.set, f"guidance.mode={mode}"], model=command.model,
            formats=["glb", *[f for f in formats if f in EXTRA_FORMATS]], device=command.device,
            seed=None if seed is None else int(seed), steps=int(steps) if steps else None,
            foreground_ratio=float(ratio), remove_bg=bool(remove_bg),
        )

    def show_cutout(upload: str | None, preset: str, ratio: float, remove_bg: bool) -> tuple[Any, str]:
        if not upload:
            return None, ""
        try:
            cfg = options(preset, GUIDANCE_MODES[0], None, None, [], ratio, remove_bg).config()
            reference = cutout(upload, cfg)
        except ReconError as exc:
            return None, _status_html("error", _message(exc, upload))
        rgba = (reference.rgba.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
        coverage = float((reference.rgba[3] > 0.5).float().mean())
        text = (
            f"cut-out: {reference.size} px, background from {reference.background_method}, "
            f"object fills {coverage:.0%} of the square (foreground ratio {ratio:g})"
        )
        return rgba, _status_html("done", text)

    def reconstruct(
        upload: str | None, preset: str, mode: str, seed: float | None, steps: float | None, formats: list[str],
        ratio: float, remove_bg: bool, request: gr.Request,
    ) -> Iterator[tuple[str, Any, Any, Any, Any]]:
        """Fits the uploaded photo; streams (status, preview render, GLB, turntable video, downloads)."""
        if not upload:
            yield _status_html("error", "error: upload a photo first"), None, None, None, None
            return
        try:
            job_options = options(preset, mode, seed, steps, formats, ratio, remove_bg)
            cfg = job_options.config()
            cutout(upload, cfg)  # bad input fails here, in one line, before a process starts
        except ReconError as exc:
            yield _status_html("error", _message(exc, upload)), None, None, None, None
            return
        upload = Path(upload)
        name = _run_name(upload, output)
        image = output / "uploads" / f"{name}{upload.suffix.lower()}"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload, image)
        job = Job(image, output / name, job_options, [(n, s.steps) for n, s in cfg.stages.items()])
        board.put(request.session_hash, job)
        yield from follow(job)

    def resume(request: gr.Request) -> Iterator[tuple[str, Any, Any, Any, Any]]:
        job = board.get(request.session_hash)
        if job is None or job.running or job.outcome is None or job.outcome[0] != "interrupted":
            yield _status_html("error", "error: no cancelled job of this page to resume"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        yield from follow(job, resume=True)

    def cancel(request: gr.Request) -> str:
        job = board.get(request.session_hash)
        if job is None or not job.running:
            return _status_html("cancelled", "cancelled (the job had not started)")
        job.cancel()
        return _status_html("cancelled", _cancelled_text(job))

    with gr.Blocks(title="recon", analytics_enabled=False) as demo:
        gr.Markdown("## recon: one photo to a textured mesh")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="photo (PNG with transparency is best)", type="filepath", elem_id="upload")
                if (EXAMPLES / "robot.png").is_file():
                    gr.Examples([[str(EXAMPLES / "robot.png")]], inputs=[upload], label="example")
                cut = gr.Image(label="cut-out the model sees", image_mode="RGBA", interactive=False, height=220, elem_id="cutout")
                with gr.Accordion("settings", open=True):
                    preset = gr.Dropdown(presets, value=command.preset, label="preset", elem_id="preset")
                    mode = gr.Radio(list(GUIDANCE_MODES), value=GUIDANCE_MODES[0], label="guidance mode")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                        steps = gr.Number(value=0, precision=0, label="steps (0 = the preset's)", minimum=0, elem_id="steps")
                    formats = gr.CheckboxGroup(list(EXTRA_FORMATS), value=["obj"], label="also export (GLB always)")
                    ratio = gr.Slider(0.3, 1.0, value=start_ratio, step=0.01, label="foreground ratio")
                    remove_bg = gr.Checkbox(value=True, label="remove the background (photos without transparency)")
                with gr.Row():
                    start = gr.Button("Reconstruct", variant="primary", elem_id="start")
                    stop = gr.Button("Cancel", elem_id="cancel")
                    again = gr.Button("Resume", elem_id="resume")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="status")
                preview = gr.Image(label="preview renders (reference view and three quarter turns)", interactive=False, height=180, elem_id="preview")
                model = gr.Model3D(label="textured mesh (GLB)", clear_color=(1.0, 1.0, 1.0, 1.0), height=420, elem_id="viewer")
                video = gr.Video(label="turntable", interactive=False, autoplay=True, loop=True, height=300, elem_id="turntable")
                files = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="downloads")
        cut_inputs = [upload, preset, ratio, remove_bg]
        upload.change(show_cutout, cut_inputs, [cut, status], queue=False)
        ratio.release(show_cutout, cut_inputs, [cut, status], queue=False)
        remove_bg.change(show_cutout, cut_inputs, [cut, status], queue=False)
        # Gradio 6's Model3D does not draw a value that arrives at the end of a streamed (generator) event:
        # a hidden copy of the GLB path is set again, after a clear, by two follow-up events.
        glb_copy = gr.State()
        outputs = [status, preview, model, video, files, glb_copy]
        run_event = start.click(
            _with_glb_copy(reconstruct), [upload, preset, mode, seed, steps, formats, ratio, remove_bg], outputs,
            api_name="reconstruct", concurrency_limit=1, concurrency_id="device", show_progress="minimal",
        )
        resume_event = again.click(
            _with_glb_copy(resume), None, outputs, api_name=False, concurrency_limit=1, concurrency_id="device", show_progress="minimal"
        )
        for event in (run_event, resume_event):
            event.then(lambda: None, None, model, api_name=False, queue=False).then(lambda glb: glb, glb_copy, model, api_name=False, queue=False)
        stop.click(cancel, None, [status], api_name=False, queue=False, cancels=[run_event, resume_event])
    return demo


def _with_glb_copy(handler: Any) -> Any:
    """``handler``'s updates with the GLB value repeated as a sixth output (see build_app)."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        for update in handler(*args, **kwargs):
            yield (*update, update[2])

    return wrapped


# Small renders (a 64 px cut-out, 128 px preview tiles) fill their panels instead of sitting at their pixel size.
_CSS = "#cutout img, #preview img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


def launch(demo: Any, command: AppCommand, block: bool = True) -> Any:
    """Serves ``demo`` on ``command.host:command.port`` (no share link, no SSR, no analytics); blocks unless ``block`` is False."""
    import gradio as gr

    command.output.mkdir(parents=True, exist_ok=True)
    return demo.queue(default_concurrency_limit=1).launch(
        server_name=command.host,
        server_port=command.port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(command.output.resolve())],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        footer_links=["api"],
        quiet=not block,
        theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
        css=_CSS,
    )
