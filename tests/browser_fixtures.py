"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright (no browser download).

``.ci/run`` installs the ``chromium`` package; without it (or without the
``playwright`` package) the browser tests are skipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # WebGL through SwiftShader, so that the 3D viewers draw without a GPU.
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A Playwright Browser on the system Chromium with a fresh profile folder."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 1200}
        )
        yield context
        context.close()


def drawn_fraction(png: bytes, background: tuple[int, int, int] = (255, 255, 255), tolerance: int = 12) -> float:
    """Fraction of the screenshot's pixels that differ from ``background`` by more than ``tolerance`` (any channel)."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return float((np.abs(pixels - np.array(background)).max(axis=2) > tolerance).mean())


def save_screenshot(page: object, path: Path) -> None:
    """A full-page screenshot (kept in the test's tmp folder for a human to look at when a test fails)."""
    page.screenshot(path=str(path), full_page=True)
