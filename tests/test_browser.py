"""A real browser (headless Debian chromium via Playwright) uploads a real galaxy to a live server.

Runs wherever chromium and Playwright are installed, and always under CI (where their absence is a
failure). Playwright never downloads a browser here: it drives the system's chromium.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from galaxy10.dataset import CLASS_NAMES
from main import create_app

from helpers import biased_checkpoint, listening_socket

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("cpu_inference")]  # the references are CPU float32

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
MODEL = "based_on_balanced_data_model"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system chromium's path, or a skip (a failure under CI) where it or Playwright is missing."""
    path = shutil.which("chromium")
    missing = "chromium is not installed (apt install chromium)" if path is None else None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install playwright; no browser download needed)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; the browser test must run under CI")
        pytest.skip(missing)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live uvicorn server on a loopback port it holds from the start, serving a tiny 32 px checkpoint."""
    models = tmp_path_factory.mktemp("models")
    # A spread of confidences, so the bars have something to show.
    biased_checkpoint(models / f"{MODEL}.pth", (0.2, 0.9, 2.4, 1.6, -0.5, 0.6, 0.3, 1.1, -0.2, 0.8))
    with listening_socket() as sock:
        host, port = sock.getsockname()
        live = uvicorn.Server(uvicorn.Config(create_app(models), log_level="warning"))
        thread = threading.Thread(target=live.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not live.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://{host}:{port}"
        live.should_exit = True
        thread.join(10)


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SCREENSHOT_DIR"):
        target = Path(os.environ["SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def test_upload_a_real_galaxy_in_a_browser(
    chromium: str, server: str, real_galaxies: list[tuple[Path, int]], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    galaxy, _ = real_galaxies[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server + "/")
            assert page.get_attribute("html", "lang") == "en"
            assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgba(0, 0, 0, 0)"
            assert page.locator("select#network option").all_inner_texts() == [MODEL]
            save_screenshot(page, tmp_path, "index.png")
            page.get_by_label("Galaxy image").set_input_files(str(galaxy))
            page.get_by_role("button", name="Classify").click()
            page.wait_for_url(server + "/upload-file/")

            assert page.get_by_role("heading", name="Result").is_visible()
            bars = page.locator("ol.bars > li")
            assert bars.count() == 10
            labels = page.locator("ol.bars label").all_inner_texts()
            assert sorted(labels) == sorted(CLASS_NAMES)
            assert page.locator("#verdict-class").inner_text() == labels[0]
            values = page.locator("ol.bars meter").evaluate_all("meters => meters.map(m => m.value)")
            assert values == sorted(values, reverse=True)
            cam = page.get_by_alt_text("Grad-CAM heat map", exact=False)
            assert cam.is_visible()
            assert page.evaluate("img => img.complete && img.naturalWidth", cam.element_handle()) == 256
            save_screenshot(page, tmp_path, "result.png")

            page.set_viewport_size({"width": 375, "height": 800})  # a phone: nothing may overflow sideways
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            save_screenshot(page, tmp_path, "result-phone.png")

            page.get_by_role("link", name="Classify another image").click()
            not_an_image = {"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text\n" * 40}
            page.get_by_label("Galaxy image").set_input_files(not_an_image)
            with page.expect_response(server + "/upload-file/") as answer:
                page.get_by_role("button", name="Classify").click()
            assert answer.value.status == 415
            assert page.get_by_role("heading", name="Not an image this server can read").is_visible()
            assert page.get_by_role("alert").is_visible()
            save_screenshot(page, tmp_path, "error-phone.png")
        finally:
            browser.close()
