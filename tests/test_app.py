"""`recon app` in a real headless Chromium: upload, bad input, live progress, cancel + resume, 3D viewer, downloads."""

from __future__ import annotations

import io
import json
import re
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from browser_fixtures import browser, drawn_fraction, save_screenshot  # noqa: F401 - browser is a fixture
from PIL import Image
from test_fit import TINY, make_rgba

from recon.cli.main import main

pytest.importorskip("gradio")

from recon.cli.app import AppCommand, build_app, launch, obj_zip


def test_obj_zip_holds_the_obj_its_mtl_and_textures(tmp_path):
    (tmp_path / "mesh.obj").write_text("mtllib mesh.mtl\nv 0 0 0\n")
    (tmp_path / "mesh.mtl").write_text("newmtl m\nmap_Kd mesh_albedo.png\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "mesh_albedo.png")
    archive = obj_zip({"glb": str(tmp_path / "mesh.glb"), "obj": str(tmp_path / "mesh.obj")})
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["mesh.mtl", "mesh.obj", "mesh_albedo.png"]
    assert obj_zip({"glb": "mesh.glb"}) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(page) -> str:
    return page.evaluate("document.querySelector('#status .recon-status')?.innerText ?? ''")


def _wait_status(page, pattern: str, timeout_s: float = 120.0, seen: list[str] | None = None) -> str:
    """Polls the status line until it matches the regular expression ``pattern``; records every distinct line in ``seen``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = _status(page)
        if seen is not None and text and (not seen or seen[-1] != text):
            seen.append(text)
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"status never showed {pattern!r}; last: {_status(page)!r}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    command = AppCommand(
        port=_free_port(), output=out / "runs", model="random-tiny", preset="cpu", device="cpu",
        set=[*TINY, "checkpoint_every=5", "preview_every=5", "export.turntable_frames=6", "export.turntable_resolution=48"],
    )
    demo = build_app(command)
    launch(demo, command, block=False)
    yield command
    demo.close()


def _bad_inputs(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("not a picture")
    Image.new("RGB", (8000, 7000), (200, 100, 50)).save(folder / "huge.png")
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(folder / "clear.png")
    return [folder / "notes.txt", folder / "huge.png", folder / "clear.png"]


@pytest.mark.slow
def test_app_end_to_end(app, browser, tmp_path, capsys, monkeypatch):  # noqa: F811
    bad = _bad_inputs(tmp_path / "bad")
    monkeypatch.chdir(bad[0].parent)
    expected = []
    for path in bad:  # what the CLI prints for each
        assert main(["fit", path.name, "-o", str(tmp_path / "cli"), "--preset", "cpu", "--model", "random-tiny", "--device", "cpu", "--quiet"]) == 2
        expected.append(next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")))
    good = make_rgba(tmp_path / "disc.png", 64)

    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"http://127.0.0.1:{app.port}/")
    upload = page.locator("#upload input[type=file]")
    upload.wait_for(state="attached", timeout=60_000)
    for path, line in zip(bad, expected):
        upload.set_input_files(str(path))
        assert _wait_status(page, "^" + re.escape(line) + "$", 60) == line
        page.click("#start")  # starting anyway shows the same line and starts nothing
        page.wait_for_timeout(1000)
        assert _status(page) == line
        page.locator("#upload button[aria-label='Clear']").click()
        _wait_status(page, "^$", 30)
    assert not any(app.output.glob("*/config.yaml"))

    upload.set_input_files(str(good))
    _wait_status(page, "cut-out:", 60)
    page.fill("#steps input", "24")
    page.click("#start")
    seen: list[str] = []
    _wait_status(page, r"stage coarse: step [1-9]", 120, seen)
    save_screenshot(page, tmp_path / "app-running.png")
    page.click("#cancel")
    cancelled = _wait_status(page, "cancelled at step", 120, seen)
    [run_dir] = [p.parent for p in app.output.glob("*/config.yaml")]
    assert json.loads((run_dir / "progress.json").read_text())["status"] == "interrupted"
    assert any((run_dir / "checkpoints").glob("*.pt")) and str(run_dir) in cancelled
    resumed: list[str] = []
    page.click("#resume")
    _wait_status(page, "done in", 420, resumed)

    def steps(lines: list[str]) -> list[int]:
        return [int(m.group(1)) for line in lines if (m := re.search(r"overall (\d+) /", line))]

    # progress was shown while it ran, before the cancel and after the resume (how many steps the 0.2 s polls
    # catch depends on the machine's speed: at least one each)
    assert steps(seen), seen
    assert steps(resumed), resumed
    page.wait_for_timeout(3000)  # the viewer loads the GLB
    save_screenshot(page, tmp_path / "app-finished.png")
    viewer = page.locator("#viewer canvas").first
    assert drawn_fraction(viewer.screenshot()) > 0.02

    links = page.eval_on_selector_all("#downloads a[href]", "els => els.map(e => e.href)")
    files = {link.rsplit("/", 1)[-1].split("?")[0]: page.request.get(link).body() for link in links}
    assert set(files) >= {"mesh.glb", "mesh_obj.zip"}
    glb = files["mesh.glb"]
    assert glb[:4] == b"glTF" and int.from_bytes(glb[4:8], "little") == 2 and int.from_bytes(glb[8:12], "little") == len(glb)
    names = zipfile.ZipFile(io.BytesIO(files["mesh_obj.zip"])).namelist()
    assert sorted(names) == ["mesh.mtl", "mesh.obj", "mesh_albedo.png"]
    assert all(url.startswith((f"http://127.0.0.1:{app.port}/", "data:", "blob:")) for url in requests), {
        url.split("/")[2] for url in requests
    }
    page.close()


@pytest.mark.slow
def test_app_answers_the_gradio_client(app, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(f"http://127.0.0.1:{app.port}/", verbose=False)
    image = make_rgba(tmp_path / "client.png", 48)
    status, _, glb, _, files = client.predict(
        handle_file(str(image)), "cpu", "zero123", 1, 0, [], 0.85, True, api_name="/reconstruct"
    )
    assert "done in" in status
    assert Path(glb).read_bytes()[:4] == b"glTF" and len(files) == 1


def test_the_ratio_slider_starts_at_the_framing_the_weights_record(tmp_path):
    from recon.guidance.checkpoints import foreground_ratio_for

    starts = {}
    for model in ("tiny", "random-tiny"):  # the shipped prior records its framing, random weights record none
        demo = build_app(AppCommand(output=tmp_path, model=model, preset="cpu", device="cpu"))
        starts[model] = [c["props"]["value"] for c in demo.config["components"] if c["props"].get("label") == "foreground ratio"]
    assert starts == {"tiny": [foreground_ratio_for("tiny")], "random-tiny": [0.85]} and foreground_ratio_for("tiny") != 0.85
