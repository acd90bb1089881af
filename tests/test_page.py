"""The try-it page in a real headless Chromium, over real HTTP: the app in a werkzeug server, a digits model server
behind it.

The browser is Debian's chromium (scripts/install_browser.sh puts it at /usr/bin/chromium) driven
by Playwright; `playwright install` is never used, it downloads a browser from a CDN CI cannot reach.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from scripts.processes import REPO
from tests.conftest import png, solid
from tests.live_server import serving

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Nothing but the page under test may touch the network: no updates, sync or prefetching.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Besides the test's tmp dir, so a person can look at the last run's pages without digging.
SHOTS = pathlib.Path(tempfile.gettempdir())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        # A failure, not a skip: on CI a silently skipped browser test would prove nothing.
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, live_url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 900, "height": 760}, base_url=live_url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))  # uncaught exceptions in the page's JS
    page.goto("/")
    yield page
    context.close()
    assert not errors, errors


def screenshot(page: Page, tmp_path: pathlib.Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=path, full_page=True)
    shutil.copyfile(path, SHOTS / name)


def test_a_digit_shows_its_label_as_the_top_bar(page: Page, tmp_path: pathlib.Path) -> None:
    expect(page).to_have_title("Try the image model")
    page.get_by_label("How many labels").fill("4")
    page.get_by_label("API key").fill("not-checked-here")
    with page.expect_request("**/predict") as sent:
        # The file input itself, as a keyboard or screen-reader user reaches it through its label.
        page.get_by_label("Image file").set_input_files(REPO / "samples" / "digit_3.png")
    assert sent.value.headers["authorization"] == "Bearer not-checked-here"

    result = page.locator("#result")
    expect(result).to_be_visible()
    expect(result.get_by_role("heading")).to_have_text("Top labels from digits")
    bars = result.get_by_role("listitem")
    expect(bars).to_have_count(4)
    expect(bars.first.locator(".label")).to_have_text("3")
    expect(bars.first.locator(".pct")).to_have_text(re.compile(r"^>?\d{1,3}\.\d%$"))  # e.g. 97.5% or >99.9%
    top = float(bars.first.locator(".pct").inner_text().strip(">%"))
    assert top > 50, top  # the digits model is sure of its own sample
    width = bars.first.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
    track = bars.first.locator(".track").evaluate("e => e.getBoundingClientRect().width")
    assert width == pytest.approx(track * top / 100, abs=2), (width, track, top)
    expect(page.locator("#error")).to_be_hidden()
    screenshot(page, tmp_path, "page_digit.png")


def test_a_text_file_shows_the_error_in_words(page: Page, live_url: str, tmp_path: pathlib.Path) -> None:
    text = b"shopping: eggs, milk, bread\n"
    # What the API says about this file, asked directly: the page must show exactly that message.
    answer = requests.post(f"{live_url}/predict", files={"image": ("notes.txt", text)}, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]

    page.get_by_label("Image file").set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": text})
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert.get_by_role("heading")).to_have_text("400: Bad request")
    expect(alert).to_contain_text(error["message"])
    expect(alert).to_contain_text(error["code"])
    expect(page.locator("#result")).to_be_hidden()
    screenshot(page, tmp_path, "page_error.png")


def test_predict_without_a_file_says_what_to_do(page: Page) -> None:
    page.get_by_role("button", name="Predict").click()
    expect(page.get_by_role("alert")).to_contain_text("Choose an image file first")


def test_dropping_a_file_on_the_box_predicts_it(page: Page) -> None:
    digit = list((REPO / "samples" / "digit_7.png").read_bytes())
    # What a real drag from the desktop delivers: a drop event whose DataTransfer holds the file.
    files = page.evaluate_handle(
        """bytes => {
            const dropped = new DataTransfer();
            dropped.items.add(new File([new Uint8Array(bytes)], "digit_7.png", {type: "image/png"}));
            return dropped;
        }""",
        digit,
    )
    page.locator("#drop").dispatch_event("drop", {"dataTransfer": files})
    expect(page.locator("#predictions li").first.locator(".label")).to_have_text("7")
    assert page.get_by_label("Image file").evaluate("input => input.files[0].name") == "digit_7.png"


@pytest.fixture
def two_models_page(browser: Browser, model_servers, digits, colours, make_app) -> Iterator[Page]:
    """The page of a web tier serving digits and colours (in-process, over real HTTP)."""
    model_servers.start(digits)
    model_servers.start(colours)
    with serving(make_app()) as url:
        context = browser.new_context(viewport={"width": 900, "height": 760}, base_url=url)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto("/")
        yield page
        context.close()
    assert not errors, errors


def test_a_person_picks_the_model_from_those_served(two_models_page: Page, tmp_path: pathlib.Path) -> None:
    page = two_models_page
    picker = page.get_by_label("Model")
    expect(picker.locator("option")).to_have_text(["The server's default", "colours", "digits"])
    picker.select_option("colours")
    expect(page.locator("#model-hint")).to_contain_text("16×16×3 images")
    red = tmp_path / "red.png"
    red.write_bytes(png(solid((230, 20, 20))))
    page.get_by_label("Image file").set_input_files(red)  # with two models and no default, only a named one answers
    expect(page.locator("#result").get_by_role("heading")).to_have_text("Top labels from colours")
    expect(page.locator("#predictions li").first.locator(".label")).to_have_text("red")
    expect(page.locator("#model-version")).to_have_text("1")
    screenshot(page, tmp_path, "page_models.png")

    picker.select_option("digits")
    page.get_by_label("Image file").set_input_files(REPO / "samples" / "digit_3.png")
    expect(page.locator("#result").get_by_role("heading")).to_have_text("Top labels from digits")
    expect(page.locator("#predictions li").first.locator(".label")).to_have_text("3")


def test_with_several_models_and_none_picked_the_page_shows_why(two_models_page: Page) -> None:
    two_models_page.get_by_label("Image file").set_input_files(REPO / "samples" / "digit_3.png")
    alert = two_models_page.get_by_role("alert")
    expect(alert).to_contain_text("several models are served")
    expect(alert).to_contain_text("bad_request")
