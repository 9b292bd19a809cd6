"""GET /docs in a real browser: Debian's chromium driven by Playwright against a real server."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import ARTIFACTS, CARS, ROOT, TINY_LABELS, Server, running_service
from tests.system import require_executable

pytestmark = pytest.mark.slow
SCREENSHOT = ROOT / "docs" / "docs-page.png"
BENTLEY = CARS / "bentleycgtc2007.jpg"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_executable("chromium")
    with sync_playwright() as playwright:
        # `playwright install` cannot download its own browser here: drive the system's chromium.
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("docs-page") / "server.log"
    with running_service(ARTIFACTS, log) as s:
        yield s


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    opened = context.new_page()
    opened.goto(f"{server.url}/docs")
    yield opened
    context.close()


def _generated_photo(path: Path) -> Path:
    # A smooth gradient with a dark "car" block: a real, decodable photo-sized image, different from any test colour.
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 639, y * 255 // 479, np.full_like(x, 140)], axis=-1).astype(np.uint8)
    pixels[260:400, 120:520] = (40, 44, 52)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def _api_answer(server: Server, photo: Path) -> dict[str, object]:
    response = httpx.post(
        f"{server.url}/infer", params={"top_k": 5}, files={"image": (photo.name, photo.read_bytes())}, timeout=30
    )
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def _check_rendered(page: Page, server: Server, photo: Path) -> None:
    page.set_input_files("#file", str(photo))
    expect(page.locator("#result")).to_be_visible()
    answer = _api_answer(server, photo)
    expect(page.locator("#class")).to_have_text(str(answer["class"]))
    bars = page.locator("#bars .bar")
    expect(bars).to_have_count(5)
    top_k = answer["top_k"]
    assert isinstance(top_k, list)
    assert bars.locator(".label span:first-child").all_text_contents() == [item["class"] for item in top_k]
    expect(page.locator("#latency")).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#preview")).to_be_visible()
    # The committed artifact is the untrained reference model: the page must say so plainly.
    expect(page.locator("#untrained")).to_be_visible()
    expect(page.locator("#untrained")).to_contain_text("Untrained reference model")
    expect(page.locator("#error")).to_be_hidden()


@pytest.mark.skipif(not BENTLEY.exists(), reason=f"{BENTLEY} is not there (../shared is absent)")
def test_a_real_photo_renders_the_apis_class_and_five_bars(page: Page, server: Server, tmp_path: Path) -> None:
    _check_rendered(page, server, BENTLEY)
    # The README's picture is refreshed on request only: a test run must not leave the checkout modified.
    shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_a_generated_photo_renders_the_apis_class_and_five_bars(page: Page, server: Server, tmp_path: Path) -> None:
    _check_rendered(page, server, _generated_photo(tmp_path / "generated.jpg"))


def test_a_dropped_photo_is_classified(page: Page, server: Server, tmp_path: Path) -> None:
    photo = _generated_photo(tmp_path / "dropped.jpg")
    dropped = page.evaluate_handle(
        """(bytes) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], "dropped.jpg", { type: "image/jpeg" }));
            return transfer;
        }""",
        list(photo.read_bytes()),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#class")).to_have_text(str(_api_answer(server, photo)["class"]))
    expect(page.locator("#bars .bar")).to_have_count(5)
    expect(page.locator("#filename")).to_contain_text("dropped.jpg")


def test_the_untrained_banner_shows_before_any_upload(page: Page) -> None:
    expect(page.locator("#untrained")).to_be_visible()
    expect(page.locator("#model")).to_contain_text("classes")
    expect(page.locator("#auth")).to_be_hidden()


def test_errors_are_shown_as_the_api_returns_them(page: Page, server: Server, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.jpg"
    bogus.write_bytes(b"this is not an image")
    api = httpx.post(f"{server.url}/infer", params={"top_k": 5}, files={"image": (bogus.name, bogus.read_bytes())})
    assert api.status_code == 400
    page.set_input_files("#file", str(bogus))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-code")).to_have_text(api.json()["error"]["code"])
    expect(page.locator("#error-message")).to_have_text(api.json()["error"]["message"])
    expect(page.locator("#error-status")).to_have_text("(HTTP 400)")
    expect(page.locator("#result")).to_be_hidden()


def test_the_page_loads_nothing_from_outside_the_service(browser: Browser, server: Server, tmp_path: Path) -> None:
    context = browser.new_context()
    opened = context.new_page()
    requested: list[str] = []
    opened.on("request", lambda request: requested.append(request.url))
    response = opened.goto(f"{server.url}/docs")
    assert response is not None and response.ok
    assert "default-src 'none'" in response.headers["content-security-policy"]
    opened.set_input_files("#file", str(_generated_photo(tmp_path / "photo.jpg")))
    expect(opened.locator("#result")).to_be_visible()
    context.close()
    outside = [url for url in requested if not url.startswith((server.url, "blob:", "data:"))]
    assert requested and not outside


def test_with_an_api_key_the_page_asks_for_it(browser: Browser, tiny_artifact: Path, tmp_path: Path) -> None:
    photo = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(photo)
    with running_service(tiny_artifact, tmp_path / "server.log", API_KEY="s3cret-key") as keyed:
        context = browser.new_context()
        opened = context.new_page()
        opened.goto(f"{keyed.url}/docs")
        expect(opened.locator("#auth")).to_be_visible()
        opened.set_input_files("#file", str(photo))
        expect(opened.locator("#error-code")).to_have_text("unauthorized")
        opened.fill("#api-key", "s3cret-key")
        opened.set_input_files("#file", str(photo))
        expect(opened.locator("#class")).to_have_text("red")
        # The tiny test model is "trained": no banner for it.
        expect(opened.locator("#untrained")).to_be_hidden()
        assert opened.locator("#bars .bar").count() == min(5, len(TINY_LABELS))
        context.close()
