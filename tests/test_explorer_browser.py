"""The prediction explorer as a served web app, driven in a real browser.

A small checkpoint is trained on PBC under the smoke profile into a temporary folder,
Voilà serves the explorer for it on a free 127.0.0.1 port (every other host blocked),
and headless Chromium (Python Playwright) filters by class, clicks a confusion-matrix
cell, checks that the grid shows exactly that cell's images (``data-relpath`` against
the predictions CSV), and toggles the CAM overlay. The screenshots it takes land in
``_build/screenshots/explorer/`` (git-ignored), where the book's explorer page finds them.
"""
from __future__ import annotations

import json
import shutil
import time

import pandas as pd
import pytest

from leukemia_core.explain import explorer as ex

CHROMIUM = "/usr/bin/chromium"
PAGE_SIZE = 24  # the explorer's default

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(not shutil.which(CHROMIUM),
                       reason="needs Debian's chromium at /usr/bin/chromium "
                              "(apt-get install chromium; CI installs it)"),
]


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A smoke-sized ConvNeXt-Atto on PBC (seconds), as `leukemia-core train` writes it."""
    import torch

    from leukemia_core.config import get_profile
    from leukemia_core.pipeline import train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("explorer") / "pbc_convnext_atto_smoke_s0"
    profile = get_profile("smoke").replace(epochs=3, max_train_per_class=24, max_eval_per_class=12)
    result = train_classifier("pbc", "convnext_atto", profile, root=data_root, out_dir=out, progress=False)
    torch.set_num_threads(threads)
    return out, result


@pytest.fixture(scope="module")
def page(run, data_root):
    from playwright.sync_api import sync_playwright

    with ex.serve(run[0], data_root=data_root, timeout=180) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.errors, page.blocked = [], []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))

        def route(r):
            if r.request.url.startswith("http://127.0.0.1"):
                r.continue_()
            else:  # Voilà's template asks a CDN for icon fonts only; nothing else may leave
                page.blocked.append((r.request.resource_type, r.request.url))
                r.abort()

        page.route("**/*", route)
        page.goto(url, timeout=180_000)
        page.wait_for_selector(".lk-grid figure", timeout=240_000)
        page.wait_for_selector(".lk-explorer .js-plotly-plot .nsewdrag", timeout=60_000)
        yield page
        browser.close()


def grid(page) -> list[dict]:
    return page.eval_on_selector_all(".lk-grid figure", """figs => figs.map(f => ({
        relpath: f.dataset.relpath, label: f.dataset.label, pred: f.dataset.pred, cam: f.dataset.cam,
        alt: f.querySelector('img').alt, src: f.querySelector('img').src}))""")


def wait_grid(page, js_condition: str, start: float, timeout: int = 30_000) -> float:
    """Wait until every figure of the grid satisfies ``js_condition`` (on ``f``); the seconds
    since ``start`` (taken just before the interaction)."""
    page.wait_for_function(f"""() => {{ const figs = [...document.querySelectorAll('.lk-grid figure')];
        return figs.length > 0 && figs.every(f => {js_condition}); }}""", timeout=timeout)
    return time.perf_counter() - start


def server_ms(page) -> int:
    return int(page.get_attribute(".lk-status [data-ms]", "data-ms"))


def expected(csv: pd.DataFrame, **eq) -> list[str]:
    rows = csv
    for col, value in eq.items():
        rows = rows[rows[col] == value]
    rows = rows.sort_values(["confidence", "relpath"], ascending=[False, True], kind="stable")
    return rows["relpath"].tolist()


def test_filter_click_cell_and_cam(run, page):
    out, result = run
    csv = pd.read_csv(out / "predictions_test.csv")
    classes = result.data.classes
    timings = {}
    # the busiest off-diagonal cell if there is one (an error cell), else the busiest cell
    counts = csv.groupby(["label", "pred"]).size().sort_values(ascending=False)
    errors = counts[[t != p for t, p in counts.index]]
    true, pred = (errors if len(errors) else counts).index[0]
    assert page.errors == [], page.errors

    # 1. a class filter: the grid shows only that class, the count matches the CSV
    n_true = len(expected(csv, label=true))
    start = time.perf_counter()
    page.select_option(".lk-true select", true)
    page.wait_for_selector(f'.lk-status [data-count="{n_true}"]', timeout=30_000)
    timings["class filter (browser)"] = wait_grid(page, f"f.dataset.label === {json.dumps(true)}", start)
    timings["class filter (server)"] = server_ms(page) / 1000
    assert [g["relpath"] for g in grid(page)] == expected(csv, label=true)[:PAGE_SIZE]

    # 2. click the (true, pred) cell of the confusion matrix (rows: true classes, top down)
    box = page.locator(".lk-explorer .js-plotly-plot .nsewdrag").first.bounding_box()
    i, j = classes.index(true), classes.index(pred)
    x = box["x"] + (j + 0.5) * box["width"] / len(classes)
    y = box["y"] + (i + 0.5) * box["height"] / len(classes)
    page.mouse.move(x, y)
    start = time.perf_counter()
    page.mouse.click(x, y)
    timings["matrix click (browser)"] = wait_grid(
        page, f"f.dataset.label === {json.dumps(true)} && f.dataset.pred === {json.dumps(pred)}", start)
    timings["matrix click (server)"] = server_ms(page) / 1000
    shown = grid(page)
    want = expected(csv, label=true, pred=pred)
    assert [g["relpath"] for g in shown] == want[:PAGE_SIZE]
    assert [g["alt"] for g in shown] == want[:PAGE_SIZE]
    assert page.input_value(".lk-pred select") == pred
    page.wait_for_selector(f'.lk-status [data-count="{len(want)}"]', timeout=10_000)
    ex.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".lk-explorer").screenshot(path=str(ex.SCREENSHOTS / "explorer_cell.png"))

    # 3. CAM overlay on: the same images, each one redrawn
    start = time.perf_counter()
    page.click(".lk-cam")  # the ToggleButton's <button> itself carries the class
    timings["CAM on, Grad-CAM computed (browser)"] = wait_grid(page, "f.dataset.cam === 'Grad-CAM'", start)
    timings["CAM on, Grad-CAM computed (server)"] = server_ms(page) / 1000
    with_cam = grid(page)
    assert [g["relpath"] for g in with_cam] == [g["relpath"] for g in shown]
    assert all(a["src"] != b["src"] for a, b in zip(shown, with_cam))
    page.locator(".lk-explorer").screenshot(path=str(ex.SCREENSHOTS / "explorer_cam.png"))

    # 4. another method, and back to a cached one
    start = time.perf_counter()
    page.select_option(".lk-method select", "EigenCAM")
    timings["method EigenCAM (browser)"] = wait_grid(page, "f.dataset.cam === 'EigenCAM'", start)
    assert all(a["src"] != b["src"] for a, b in zip(with_cam, grid(page)))
    start = time.perf_counter()
    page.select_option(".lk-method select", "Grad-CAM")
    timings["back to Grad-CAM, cached (browser)"] = wait_grid(page, "f.dataset.cam === 'Grad-CAM'", start)
    timings["back to Grad-CAM, cached (server)"] = server_ms(page) / 1000
    assert [g["src"] for g in grid(page)] == [g["src"] for g in with_cam]

    assert page.errors == [], page.errors
    assert all(kind in ("stylesheet", "font") for kind, _ in page.blocked), page.blocked
    (ex.SCREENSHOTS / "shots.json").write_text(json.dumps({
        "checkpoint": "ConvNeXt-Atto, smoke profile (3 epochs, 32 px, 24 training images per class)",
        "test_accuracy": result.test["accuracy"], "cell": [true, pred], "images_in_cell": len(want),
        "timings_s": timings, "taken": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))
    # one interaction must answer within a second (server side: filter, draw, encode)
    for what, seconds in timings.items():
        if "(server)" in what:
            assert seconds < 1.0, (what, timings)
