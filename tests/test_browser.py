"""Plotly figures of the built book render in a real browser, offline: headless Chromium
(Python Playwright) opens pages served from 127.0.0.1, with every other host blocked,
and finds each graph drawn as SVG, not an empty div."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from conftest import load_module

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium "
                              "(apt-get install chromium; CI installs it)"),
]


def load_test_book():
    """tests/test_book.py's smoke book: built once per session, shared by both files."""
    return load_module("test_book", "tests/test_book.py").smoke_book()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    book = load_test_book()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(book.html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield book, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def open_offline(browser, url):
    """A page where every request to a host other than 127.0.0.1 is blocked and recorded."""
    page = browser.new_page()
    blocked, errors = [], []
    # Jupyter Book 1's sphinx-thebe declares THEBE_JS_URL twice on every page (upstream,
    # harmless: thebe is not used); any other JavaScript error fails the test.
    page.on("pageerror", lambda exc: "THEBE_JS_URL" in str(exc) or errors.append(str(exc)))

    def route(r):
        if r.request.url.startswith("http://127.0.0.1"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    return page, blocked, errors


def test_plotly_graphs_render_offline(site, browser):
    book, base = site
    pages = [name for name, run in book.runs.items() if run.figures.get("plotly")]
    assert "notebooks/02_data" in pages
    for name in pages:
        page, blocked, errors = open_offline(browser, f"{base}/{name}.html")
        expected = book.runs[name].figures["plotly"]
        page.wait_for_selector(".plotly-graph-div .main-svg", timeout=30_000)
        page.wait_for_function(
            f"document.querySelectorAll('.plotly-graph-div .main-svg').length > 0 && "
            f"[...document.querySelectorAll('.plotly-graph-div')]"
            f".filter(d => d.querySelector('svg.main-svg')).length >= {expected}", timeout=30_000)
        drawn = page.eval_on_selector_all(
            ".plotly-graph-div", "divs => divs.map(d => d.querySelectorAll('.main-svg path, .main-svg rect').length)")
        assert len(drawn) >= expected and all(n > 0 for n in drawn), (name, drawn)
        assert not [u for u in blocked if "plot" in u.lower()], f"{name} fetched {blocked}"
        assert not errors, f"{name}: JavaScript errors {errors}"
        page.close()


def test_landing_page_redirects_to_the_introduction(site, browser):
    book, base = site
    page, _, errors = open_offline(browser, f"{base}/index.html")
    page.wait_for_url("**/notebooks/01_introduction.html", timeout=10_000)
    assert page.locator("h1").first.inner_text().startswith("Introduction")
    assert not errors, errors
    page.close()
