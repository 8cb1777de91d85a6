"""Mathematics renders offline: headless Chromium opens the notation page of the built
smoke book, served from 127.0.0.1 with every other host blocked, waits for MathJax (served
by the site itself from ``_static/mathjax/``) to typeset, and finds the rendered formulas.
A screenshot goes to ``_build/screenshots/notation.png`` (git-ignored)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_module

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "_build" / "screenshots"

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium "
                              "(apt-get install chromium; CI installs it)"),
]

# The served smoke book and the browser of tests/test_browser.py (one build per session).
_browser_tests = load_module("test_browser", "tests/test_browser.py")
site, browser, open_offline = _browser_tests.site, _browser_tests.browser, _browser_tests.open_offline


def typeset_math(page, timeout_ms: int = 60_000) -> dict:
    """Wait until MathJax 3 has typeset the page; what it rendered, counted."""
    page.wait_for_function(
        "window.MathJax && MathJax.startup && MathJax.startup.promise && "
        "document.querySelectorAll('mjx-container').length > 0", timeout=timeout_ms)
    page.evaluate("MathJax.startup.promise")  # resolves once typesetting has finished
    return page.evaluate("""() => ({
        inline: document.querySelectorAll('mjx-container:not([display="true"])').length,
        display: document.querySelectorAll('mjx-container[display="true"]').length,
        glyphs: document.querySelectorAll('mjx-container mjx-c').length,
        errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
        raw: [...document.querySelectorAll('span.math, div.math')]
               .filter(e => !e.querySelector('mjx-container')).length,
        version: MathJax.version})""")


def test_notation_page_typesets_offline(site, browser):
    book, base = site
    page, blocked, errors = open_offline(browser, f"{base}/book/notation.html")
    found = typeset_math(page)
    assert found["version"].startswith("3."), found
    assert found["inline"] >= 20 and found["display"] >= 4, found
    assert found["glyphs"] > 100, f"formulas without glyphs (fonts not served?): {found}"
    assert found["errors"] == 0 and found["raw"] == 0, found
    assert not blocked, f"the notation page fetched other hosts: {blocked}"
    assert not errors, f"JavaScript errors: {errors}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "notation.png"), full_page=True)
    assert (SCREENSHOTS / "notation.png").stat().st_size > 10_000
    page.close()


@pytest.mark.parametrize("chapter", ["05_vision_language", "08_r3gan_hybrid"])
def test_method_chapter_in_the_browser(site, browser, chapter):
    """A student's view of a method chapter: its equations typeset by the local MathJax, its
    generated diagram drawn, and an exercise's solution collapsed until clicked open."""
    book, base = site
    page, blocked, errors = open_offline(browser, f"{base}/notebooks/{chapter}.html")
    found = typeset_math(page)
    assert found["display"] >= 2 and found["errors"] == 0 and found["raw"] == 0, found
    diagram = page.locator("object.graphviz, img.graphviz").first
    diagram.scroll_into_view_if_needed()
    box = diagram.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 40, f"diagram not drawn: {box}"
    svg = diagram.evaluate("e => e.data || e.src")
    assert page.request.get(svg).ok, f"the diagram's SVG {svg} is not served"
    solution = page.locator("div.solution.dropdown").first
    body = solution.locator("section").first
    assert not body.is_visible(), "a solution is open before the student asks for it"
    solution.locator("button.toggle-button").first.click()
    body.wait_for(state="visible", timeout=5_000)
    assert body.inner_text().strip(), "the opened solution is empty"
    assert not blocked, f"{chapter} fetched other hosts: {blocked}"
    assert not errors, f"JavaScript errors: {errors}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{chapter}.png"), full_page=True)
    page.close()
