"""report.html: one self-contained card per image, opened from disk (file://) in a real headless Chromium."""

from __future__ import annotations

import re

import pytest
from browser_fixtures import browser, drawn_fraction, save_screenshot  # noqa: F401 - browser is a fixture
from test_fit import TINY, make_rgba, shared_models  # noqa: F401 - shared_models is a fixture

from recon.cli.main import main
from recon.errors import InputError
from recon.systems.report import Card, render_html, write_report


def test_render_html_escapes_and_inlines_everything():
    cards = [
        Card(name="a<b", image="a<b.png", run_dir="out/a", status="finished", seconds=3.0, timings_s={"coarse": 1.5}),
        Card(name="bad", image="bad.png", run_dir="out/bad", status="failed", error="bad.png: not an image <x>"),
    ]
    page = render_html(cards, title="t")
    assert page.count('<article class="card') == 2
    assert "a&lt;b" in page and "bad.png: not an image &lt;x&gt;" in page and "<x>" not in page
    assert 'data-status="failed"' in page and 'value="failed" checked' in page
    assert "customElements.define(\"model-viewer\"" in page  # the viewer script is inlined ...
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', page)  # ... and nothing is fetched


def test_report_needs_a_folder_with_runs(tmp_path):
    with pytest.raises(InputError, match="nothing to report"):
        write_report(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        write_report(tmp_path / "missing")


@pytest.mark.slow
def test_batch_report_opens_from_disk(tmp_path, shared_models, browser):  # noqa: F811
    import recon

    photos = tmp_path / "photos"
    photos.mkdir()
    make_rgba(photos / "a_disc.png", 64)
    make_rgba(photos / "b_disc.png", 48)
    (photos / "c_broken.png").write_bytes((photos / "a_disc.png").read_bytes()[:60])
    out = tmp_path / "out"
    overrides = [*TINY, "export.turntable_frames=6", "export.turntable_resolution=48"]
    results = recon.fit(photos, out, "cpu", overrides, model="random-tiny", formats="glb", device="cpu", quiet=True)
    assert [r.status for r in results] == ["finished", "finished", "failed"]
    report = out / "report.html"
    assert report.is_file()  # written automatically at the end of the batch
    (out / "b_disc" / "exports" / "mesh.glb").unlink()  # a finished run without a GLB still gets a card
    assert main(["report", str(out)]) == 0  # the command rewrites it

    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.resolve().as_uri())
    cards = page.locator("article.card")
    assert cards.count() == 3
    assert page.locator("article[data-status=failed] .error").inner_text() == results[2].error
    assert "c_broken.png" in results[2].error
    viewer = page.locator("article[data-name=a_disc] model-viewer")
    viewer.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('article[data-name=a_disc] model-viewer').loaded", timeout=60_000)
    page.wait_for_timeout(500)
    assert drawn_fraction(viewer.screenshot()) > 0.05  # the mesh is drawn, not just the white background
    assert page.locator("article[data-name=b_disc] model-viewer").count() == 0
    for name in ("a_disc", "b_disc"):  # input, cut-out and turntable decode in the browser
        sizes = page.eval_on_selector_all(f"article[data-name={name}] figure img", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) == 3 and min(sizes) > 0
    save_screenshot(page, tmp_path / "report.png")
    # filter by status and sort
    page.uncheck("input[name=status][value=finished]")
    assert page.locator("article.card:not(.hidden)").count() == 1
    page.check("input[name=status][value=finished]")
    page.select_option("#sort", "status")
    assert page.eval_on_selector_all("article.card", "els => els.map(e => e.dataset.name)")[0] == "c_broken"
    assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
    page.close()
