"""``report.html``: one self-contained page over a folder of run folders, one card per image.

The page is built only from what ``recon fit`` / ``recon batch`` already wrote:
``batch_summary.json`` (status, one-line error, seconds per image) and each run
folder's ``input.*``, ``input_rgba.png``, ``meta.json`` (timings, peak memory,
device), ``progress.json`` and ``exports/`` (``mesh.glb``, ``turntable.mp4``).
Everything is inlined (images and turntables as data URIs, the GLBs as data
URIs read by the ``<model-viewer>`` element whose script ships in
``recon/assets/viewer/``), so the file opens from disk (file://) in any
browser, with no network.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from recon import fileio
from recon.runs import RunDir
from recon.systems.batch import SUMMARY_NAME

REPORT_NAME = "report.html"
VIEWER_SCRIPT = "model-viewer-umd.min.js"
THUMBNAIL_SIDE = 256
"""Longest side of the inlined input thumbnail and turntable frames, pixels."""
TURNTABLE_FRAMES = 36
"""Most frames kept from a turntable video for its inlined animation."""


@dataclass
class Card:
    """What the report shows for one image (plain values; data URIs are None when the file is absent)."""

    name: str
    image: str
    run_dir: str
    status: str
    error: str | None = None
    seconds: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_gpu_memory_gib: float | None = None
    device: str | None = None
    model: str | None = None
    random_weights: bool = False
    input_uri: str | None = None
    cutout_uri: str | None = None
    turntable_uri: str | None = None
    glb_uri: str | None = None
    notes: list[str] = field(default_factory=list)


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    """A PNG data URI of the image at ``path`` scaled to at most :data:`THUMBNAIL_SIDE`; None if unreadable."""
    import numpy as np
    from PIL import Image

    from recon.errors import InputError
    from recon.imageio import decode_image

    try:
        pixels = decode_image(path)
    except InputError:
        return None
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return _data_uri("image/png", buffer.getvalue())


def _turntable(path: Path) -> str | None:
    """The turntable video (MP4 or GIF) as an animated-WebP data URI (plays in an ``<img>``); None if unreadable.

    WebP rather than the MP4 itself: every current browser animates it
    without an H.264 decoder, and a subsampled, downscaled copy is small.
    """
    import imageio.v3 as iio
    from PIL import Image

    try:
        frames = list(iio.imiter(path))
    except (OSError, ValueError, RuntimeError):
        return None
    if not frames:
        return None
    stride = max(1, -(-len(frames) // TURNTABLE_FRAMES))
    images = []
    for frame in frames[::stride]:
        image = Image.fromarray(frame[..., :3])
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        images.append(image)
    buffer = io.BytesIO()
    duration_ms = max(40, round(3000 / len(images)))  # about 3 s per turn
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=duration_ms, loop=0, quality=80)
    return _data_uri("image/webp", buffer.getvalue())


def _first(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[0] if found else None


def _card(record: dict[str, Any], max_glb_bytes: int) -> Card:
    """A :class:`Card` from one batch_summary.json record, filled in from its run folder."""
    run_dir, image = Path(record["run_dir"]), Path(record["image"])
    card = Card(
        name=run_dir.name,
        image=str(image),
        run_dir=str(run_dir),
        status=record.get("status", "failed"),
        error=record.get("error"),
        seconds=record.get("seconds"),
        timings_s=dict(record.get("timings_s") or {}),
    )
    if RunDir.is_run(run_dir):
        run = RunDir(run_dir)
        meta = run.read_meta()
        card.timings_s = {**meta.get("timings_s", {}), **card.timings_s}
        card.peak_gpu_memory_gib = meta.get("peak_gpu_memory_gib")
        card.device, card.model = meta.get("device"), meta.get("model")
        card.random_weights = bool(meta.get("random_weights"))
        if card.seconds is None:
            card.seconds = meta.get("total_seconds")
        source = _first(run.root, "input.*")
        card.input_uri = _thumbnail(source) if source is not None else None
        cutout = run.root / "input_rgba.png"
        if cutout.is_file():
            card.cutout_uri = _data_uri("image/png", cutout.read_bytes())
        video = _first(run.exports, "turntable.*")
        if video is not None:
            card.turntable_uri = _turntable(video)
        glb = run.exports / "mesh.glb"
        if glb.is_file():
            if glb.stat().st_size <= max_glb_bytes:
                card.glb_uri = _data_uri("model/gltf-binary", glb.read_bytes())
            else:
                card.notes.append(f"{glb.name} is {glb.stat().st_size / 2**20:.0f} MiB: too large to embed; open it from the run folder")
        elif card.status in ("finished", "skipped"):
            card.notes.append("no GLB export (see the run's formats)")
    if card.input_uri is None and image.is_file():
        card.input_uri = _thumbnail(image)
    return card


def _records(output: Path) -> list[dict[str, Any]]:
    """The images of ``output``: batch_summary.json's records, then any other run folder (status from its progress.json)."""
    summary_path = output / SUMMARY_NAME
    records = list(fileio.read_json(summary_path).get("images", [])) if summary_path.is_file() else []
    listed = {Path(r["run_dir"]).resolve() for r in records}
    for folder in sorted(p for p in output.iterdir() if p.is_dir()):
        if folder.resolve() in listed or not RunDir.is_run(folder):
            continue
        run = RunDir(folder)
        meta = run.read_meta()
        records.append({
            "image": meta.get("input", folder.name), "run_dir": str(folder),
            "status": run.read_progress().get("status", "created"), "seconds": meta.get("total_seconds"),
        })
    return records


def collect(output: str | Path, max_glb_bytes: int = 64 * 2**20) -> list[Card]:
    """One :class:`Card` per image of the outputs folder ``output`` (see :func:`write_report`)."""
    output = Path(output)
    if not output.is_dir():
        from recon.errors import InputError

        raise InputError(f"{output}: not a folder (give the -o folder of recon fit / recon batch)")
    return [_card(record, max_glb_bytes) for record in _records(output)]


def write_report(output: str | Path, path: str | Path | None = None, max_glb_bytes: int = 64 * 2**20) -> Path:
    """Writes ``output/report.html`` (or ``path``) for the outputs folder ``output``; returns its path.

    One card per image of ``output/batch_summary.json`` plus any other run
    folder in ``output``; GLBs over ``max_glb_bytes`` are not embedded.
    Raises :class:`recon.errors.InputError` when ``output`` is not a folder
    or holds neither a summary nor a run folder.
    """
    output = Path(output)
    cards = collect(output, max_glb_bytes)
    if not cards:
        from recon.errors import InputError

        raise InputError(f"{output}: no {SUMMARY_NAME} and no run folders; nothing to report")
    target = Path(path) if path is not None else output / REPORT_NAME
    fileio.write_text(target, render_html(cards, title=f"recon report: {output.resolve().name}"))
    return target


def viewer_script() -> str:
    """The shipped ``<model-viewer>`` script (@google/model-viewer UMD build, three.js included)."""
    return resources.files("recon.assets").joinpath("viewer", VIEWER_SCRIPT).read_text(encoding="utf-8")


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _card_html(card: Card) -> str:
    e = html.escape
    timings = "".join(f"<tr><td>{e(k)}</td><td>{_fmt_seconds(v)}</td></tr>" for k, v in card.timings_s.items())
    memory = "n/a (CPU)" if card.peak_gpu_memory_gib is None else f"{card.peak_gpu_memory_gib:.2f} GiB"

    def figure(caption: str, uri: str | None, css: str = "") -> str:
        inner = f'<img src="{uri}" alt="{e(caption)}">' if uri else '<div class="missing">none</div>'
        return f'<figure class="{css}">{inner}<figcaption>{e(caption)}</figcaption></figure>'

    if card.glb_uri:
        viewer = (
            f'<model-viewer src="{card.glb_uri}" alt="3D view of {e(card.name)}" camera-controls '
            'auto-rotate interaction-prompt="none" shadow-intensity="0" exposure="1.1"></model-viewer>'
        )
    else:
        viewer = '<div class="missing">no mesh</div>'
    error = f'<p class="error">{e(card.error)}</p>' if card.error else ""
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in card.notes)
    smoke = '<p class="note">random guidance weights: a smoke test, not a reconstruction</p>' if card.random_weights else ""
    return f"""
<article class="card status-{e(card.status)}" data-name="{e(card.name)}" data-status="{e(card.status)}"
  data-seconds="{card.seconds if card.seconds is not None else -1}"
  data-memory="{card.peak_gpu_memory_gib if card.peak_gpu_memory_gib is not None else -1}">
  <header><h2>{e(card.name)}</h2><span class="badge">{e(card.status)}</span></header>
  {error}
  <div class="media">
    {figure("input", card.input_uri)}
    {figure("cut-out", card.cutout_uri, "checker")}
    {figure("turntable", card.turntable_uri)}
    <figure class="viewer">{viewer}<figcaption>3D (drag to turn)</figcaption></figure>
  </div>
  <details><summary>time {_fmt_seconds(card.seconds)} &middot; peak GPU memory {memory}</summary>
    <table>{timings}</table>
    <p class="path">image: {e(card.image)}<br>run folder: {e(card.run_dir)}<br>device: {e(card.device or "-")}
    &middot; model: {e(card.model or "-")}</p>
  </details>
  {smoke}{notes}
</article>"""


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
.top{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:10px 18px;z-index:2}
.top h1{font-size:18px;margin:0 0 6px}.top label{margin-right:12px;font-size:14px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px;padding:14px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 3px #0002;border-left:6px solid #999}
.card.status-finished,.card.status-skipped{border-left-color:#2e9e5b}.card.status-failed{border-left-color:#d33}
.card.status-interrupted,.card.status-running,.card.status-created{border-left-color:#e0a800}
.card header{display:flex;justify-content:space-between;align-items:center}.card h2{font-size:16px;margin:4px 0}
.badge{font-size:12px;padding:2px 8px;border-radius:10px;background:#eee}
.media{display:grid;grid-template-columns:repeat(4,1fr);gap:8px}
figure{margin:0;text-align:center;font-size:12px;color:#555}
figure img,model-viewer,.missing{width:100%;aspect-ratio:1;object-fit:contain;background:#fff;border:1px solid #e3e3e3;border-radius:4px}
.checker img{background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 50%/16px 16px}
model-viewer{display:block;--poster-color:#fff}
.missing{display:flex;align-items:center;justify-content:center;color:#aaa}
.error{color:#b00;font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;margin:4px 0}
.note{color:#8a6d00;font-size:12px;margin:4px 0}.path{font-size:12px;color:#666;word-break:break-all}
table{font-size:12px;border-collapse:collapse}td{padding:1px 10px 1px 0}
.hidden{display:none}
"""

_JS = """
const main = document.querySelector('main');
const cards = Array.from(main.querySelectorAll('.card'));
const boxes = Array.from(document.querySelectorAll('input[name=status]'));
function apply() {
  const shown = new Set(boxes.filter(b => b.checked).map(b => b.value));
  cards.forEach(c => c.classList.toggle('hidden', !shown.has(c.dataset.status)));
  const key = document.getElementById('sort').value;
  const order = {failed: 0, interrupted: 1, running: 2, created: 3, finished: 4, skipped: 5};
  const value = c => key === 'name' ? c.dataset.name : key === 'status' ? order[c.dataset.status] ?? 9
    : -parseFloat(c.dataset[key]);
  cards.slice().sort((a, b) => {
    const x = value(a), y = value(b);
    return x < y ? -1 : x > y ? 1 : a.dataset.name.localeCompare(b.dataset.name);
  }).forEach(c => main.appendChild(c));
  document.getElementById('shown').textContent = cards.filter(c => !c.classList.contains('hidden')).length;
}
boxes.forEach(b => b.addEventListener('change', apply));
document.getElementById('sort').addEventListener('change', apply);
apply();
"""


def render_html(cards: list[Card], title: str = "recon report") -> str:
    """The report page for ``cards``: filters by status, sorting, one card each, the viewer script inlined."""
    e = html.escape
    counts: dict[str, int] = {}
    for card in cards:
        counts[card.status] = counts.get(card.status, 0) + 1
    filters = "".join(
        f'<label><input type="checkbox" name="status" value="{e(s)}" checked> {e(s)} ({n})</label>' for s, n in sorted(counts.items())
    )
    sort = (
        '<label>sort by <select id="sort"><option value="name">name</option><option value="status">status</option>'
        '<option value="seconds">time</option><option value="memory">peak memory</option></select></label>'
    )
    made = time.strftime("%Y-%m-%d %H:%M")
    script = viewer_script().replace("</script", "<\\/script")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)}</title><style>{_CSS}</style>
<script>{script}</script>
</head><body>
<div class="top"><h1>{e(title)}</h1>
<div>{filters} {sort} <span class="count"><span id="shown">{len(cards)}</span> of {len(cards)} shown &middot; made {made}</span></div></div>
<main>{"".join(_card_html(c) for c in cards)}</main>
<script>{_JS}</script>
</body></html>
"""
