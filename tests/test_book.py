"""The book builds under the smoke profile with zero warnings, every page and figure
present; and the checks that make a broken build fail actually catch breakage."""
from __future__ import annotations

import atexit
import html as htmllib
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, load_module

REPO = Path(__file__).resolve().parent.parent


build = load_module("book_build", "book/build.py")


def scratch_folders(chapter: str, out: Path) -> dict:
    """The parameters that put ``chapter``'s checkpoints and training state under ``out``
    (``artifacts``, or ``runs_dir`` for the detection chapter), as its notebook names them."""
    import ast

    nb = build.read_chapter(build.chapter_name(chapter))
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    return {name: str(out / folder) for name, folder in (("artifacts", "artifacts"), ("runs_dir", "runs"))
            if name in params}


def smoke_book():
    """The smoke book, built once per test session into a temporary folder, two chapters at a
    time (build.NEEDS orders them). Every method
    chapter runs with its exercise's parameter change (tests/exercises.py), which the
    exercise tests check; the ci book runs the defaults."""
    from leukemia_core.data.dataroot import resolve_data_root

    if not (resolve_data_root()[0] / "pbc").is_dir():
        pytest.skip("the book executes the data chapter and no data root is present "
                    "(set LEUKEMIA_DATA or put the mirror at ../shared/datasets)")
    if not hasattr(build, "smoke_result"):
        out = Path(tempfile.mkdtemp(prefix="book-smoke-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        from exercises import exercise_params  # each method chapter runs its exercise's change

        # every chapter's checkpoints and training state in the temporary folder too (GBs
        # under smoke that nothing reads after the session; CI's disk is shared)
        params = {ch: {**scratch_folders(ch, out), **p} for ch, p in exercise_params(out / "exercises").items()}
        params.update({ch: scratch_folders(ch, out) for ch in ("09_explain", "10_explorer", "12_benchmarks")
                       if ch not in params})
        build.smoke_result = build.build_book("smoke", out=out, log=lambda line: None, jobs=2, params=params)
    return build.smoke_result


# ------------------------------------------------------------------ the checks themselves
def notebook_with(outputs):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fig.show()")
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    nb.cells.append(cell)
    return nb


PLOTLY_HTML = {"output_type": "display_data", "metadata": {},
               "data": {"text/html": '<div id="a" class="plotly-graph-div"></div>'}}
PLOTLY_MIME = {"output_type": "display_data", "metadata": {},
               "data": {"application/vnd.plotly.v1+json": {"data": []}, "text/plain": "Figure"}}
PNG = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo="}}


def test_count_figures():
    assert build.count_figures(notebook_with([PLOTLY_HTML, PNG, PNG])) == {"plotly": 1, "image": 2}
    assert build.count_figures(notebook_with([PLOTLY_MIME])) == {"plotly": 1, "image": 0}


def test_dropped_figures_and_missing_pages_are_reported(tmp_path):
    html = tmp_path / "html"
    (html / "notebooks").mkdir(parents=True)
    (html / "index.html").write_text("")
    (html / "notebooks" / "02_data.html").write_text('<img src="../_images/a.png">')
    run = build.ChapterRun("notebooks/02_data", ok=True, figures={"plotly": 1, "image": 1})
    problems = build.check_site(html, ["notebooks/02_data", "notebooks/03_baseline"],
                                {run.name: run})
    assert any("plotly figure(s)" in p and "dropped" in p for p in problems), problems
    assert not any("image figure(s)" in p for p in problems), problems
    assert any("page missing" in p and "03_baseline" in p for p in problems), problems


def test_plotly_from_a_cdn_is_reported(tmp_path):
    (tmp_path / "index.html").write_text("")
    (tmp_path / "p.html").write_text('<script src="https://cdn.plot.ly/plotly-3.0.1.min.js"></script>')
    assert any("CDN" in p for p in build.check_site(tmp_path, ["p"], {}))


def test_mathjax_or_any_script_from_a_cdn_is_reported(tmp_path):
    (tmp_path / "index.html").write_text("")
    (tmp_path / "m.html").write_text(
        '<script async="async" src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>')
    (tmp_path / "r.html").write_text("<script src='//cdnjs.cloudflare.com/require.min.js'></script>")
    (tmp_path / "ok.html").write_text('<script defer="defer" src="../_static/mathjax/tex-chtml.js"></script>')
    problems = build.check_site(tmp_path, ["m", "r", "ok"], {})
    assert any(p.startswith("m:") and "MathJax" in p and "CDN" in p for p in problems), problems
    assert any(p.startswith("r:") and "CDN" in p for p in problems), problems
    assert not any(p.startswith("ok:") for p in problems), problems


def test_mathjax_is_staged_from_the_pinned_wheel(tmp_path):
    dest = build.stage_mathjax(tmp_path / "mathjax")
    assert (dest / "tex-chtml.js").is_file()
    assert list((dest / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (dest / "input" / "tex" / "extensions").is_dir()  # loaded on demand (\boldsymbol, ...)
    assert not (dest / "output" / "svg").exists() and not (dest / "tex-svg.js").exists()
    config = __import__("yaml").safe_load((REPO / "_config.yml").read_text())["sphinx"]["config"]
    assert config["mathjax_path"] == "mathjax/tex-chtml.js"
    assert build.MATHJAX_STAGE in config["html_static_path"]


def test_injected_parameters_cell_is_hidden_and_own_parameters_kept():
    nb = nbformat.v4.new_notebook()
    own = nbformat.v4.new_code_cell('profile = "ci"', metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["injected-parameters"]})
    other = nbformat.v4.new_code_cell("x = 1")
    nb.cells += [own, injected, other]
    assert build.hide_injected_parameters(nb) == 1
    assert "remove-cell" in injected.metadata["tags"] and "injected-parameters" in injected.metadata["tags"]
    assert own.metadata["tags"] == ["parameters"]
    assert "remove-cell" not in other.metadata.get("tags", [])
    assert build.hide_injected_parameters(nb) == 0  # idempotent


def test_widget_state_is_dropped_unless_a_widget_is_shown():
    view = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
            "data": {build.WIDGET_VIEW: {"model_id": "m"}, "text/plain": "App()"}}
    state = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb = notebook_with([view])
    nb.cells[0].metadata["tags"] = ["remove-output"]
    nb.metadata["widgets"] = dict(state)
    assert build.drop_unshown_widget_state(nb) and "widgets" not in nb.metadata
    shown = notebook_with([view])
    shown.metadata["widgets"] = dict(state)
    assert not build.drop_unshown_widget_state(shown) and "widgets" in shown.metadata


def test_peak_memory_counts_the_children():
    """PeakRSS sees a child process's memory (the kernel is a child of the build)."""
    import subprocess
    import sys

    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    with build.PeakRSS(interval=0.2) as mem:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert mem.peak / 2**20 > 250
    assert build.PeakRSS().interval == build.MEMORY_SAMPLE_S


def test_parallel_execution_keeps_each_chapters_needs():
    """With jobs=2 at most two chapters run at once, none starts before what it needs has
    finished (09/10 after 03; 11 and 12 after everything before them), and the runs come
    back in the table of contents' order, as with one job."""
    import threading
    import time as _time

    chapters = build.toc_chapters()
    lock, live, spans, most = threading.Lock(), [0], {}, [0]

    def execute(name):
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        start = _time.perf_counter()
        _time.sleep(0.05 if name.endswith("03_baseline") else 0.01)
        with lock:
            live[0] -= 1
        spans[name] = (start, _time.perf_counter())
        return name

    order = []
    runs = build.execute_all(chapters, execute, jobs=2, done=lambda name, run: order.append(name))
    assert list(runs) == chapters and list(runs.values()) == chapters
    assert most[0] == 2 and sorted(order) == sorted(chapters)
    assert order != chapters  # something overtook the slow 03_baseline
    for name in chapters:
        for need in build.needs(name, chapters):
            assert spans[name][0] >= spans[need][1], f"{name} started before {need} finished"
    assert build.needs("notebooks/12_benchmarks", chapters) == chapters[:chapters.index("notebooks/12_benchmarks")]
    assert build.execute_all(chapters[:3], lambda n: n.upper(), jobs=1) == {n: n.upper() for n in chapters[:3]}


def test_needs_names_every_chapter_that_reads_another():
    """A chapter that reads the baseline's run folders needs 03_baseline; one that reads the
    registry or this build's timings needs everything before it (else, with jobs > 1, it
    could read a half-written file or miss a chapter)."""
    root = Path(build.ROOT)
    for name in build.toc_chapters():
        text = (root / f"{name}.py").read_text()
        if name != "notebooks/03_baseline" and re.search(r"pbc_(convnext_atto|efficientnet_lite0\w*)_s0", text):
            assert "notebooks/03_baseline" in build.needs(name, build.toc_chapters()), name
        if re.search(r"load_registry|build_progress|LEUKEMIA_BOOK_BUILD", text):
            assert build.NEEDS.get(name) == "*", name


def test_toc_files_read_in_order():
    files = build.toc_files()
    assert files[0] == "notebooks/01_introduction"
    assert {"book/references", build.REPORT_PAGE} <= set(files)
    for f in files:
        if not f.startswith("notebooks/") and f != build.REPORT_PAGE:
            assert (REPO / f"{f}.md").exists(), f"{f}.md missing"


# ------------------------------------------------------------------ the built book
@pytest.mark.slow
def test_smoke_book_builds_cleanly():
    book = smoke_book()
    assert book.problems == [], "\n".join(book.problems)
    assert (book.html / "index.html").exists()


@pytest.mark.slow
def test_every_page_and_figure_is_there():
    book = smoke_book()
    for name in build.toc_files():
        assert (book.html / f"{name}.html").exists(), f"page {name} missing"
    for name, run in book.runs.items():
        assert run.ok, run.error
        assert all(run.html_figures[k] >= n for k, n in run.figures.items()), (name, run)
    data = book.runs["notebooks/02_data"].figures
    assert data["plotly"] >= 4 and data["image"] >= 5, data


@pytest.mark.slow
def test_chapters_have_run_box_and_downloads():
    book = smoke_book()
    for name in build.toc_chapters():
        page = (book.html / f"{name}.html").read_text()
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page))
        stem = Path(name).name
        assert "Run this chapter yourself" in text, name
        for profile in build.PROFILES:
            assert f"make notebook NB={stem} PROFILE={profile}" in text, (name, profile)
        assert f"{stem}.py" in page and list(book.html.glob(f"_downloads/*/{stem}.py")), \
            f"{name}: .py source not downloadable"
        assert (book.html / "_sources" / f"{name}.ipynb").exists(), f"{name}: .ipynb not downloadable"


@pytest.mark.slow
def test_plotly_is_embedded_not_fetched():
    book = smoke_book()
    page = (book.html / "notebooks" / "02_data.html").read_text()
    assert not build.CDN_PLOTLY.search(page)
    assert "cdn.plot.ly/plotly" not in page
    assert page.count("plotly-graph-div") >= book.runs["notebooks/02_data"].figures["plotly"]
    assert "Plotly.newPlot" in page and len(page) > 3_000_000, "plotly.js is not embedded"


@pytest.mark.slow
def test_report_and_bibliography_pages():
    book = smoke_book()
    report = (book.html / f"{build.REPORT_PAGE}.html").read_text()
    assert "smoke" in report and "peak memory" in report
    for run in book.runs.values():
        assert run.title in report, run.name
    refs = (book.html / "book" / "references.html").read_text()
    for needle in ("10.1016/j.dib.2020.105474", "2303.07771", "2502.10899", "WBCAtt",
                   "10.7937/tcia.2019.36f5o9ld", "MedMNIST", "10.1007/s44163-026-01239-7"):
        assert needle in refs, needle
    assert book.report["profile"] == "smoke" and book.report["execution_s"] > 0


def page_text(page: str) -> str:
    """A built page's visible text: tags dropped, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", htmllib.unescape(re.sub(r"<[^>]+>", "", page)))


GLOSSARY_TERMS = [
    "test-time BatchNorm adaptation", "TTA-BN", "AdaBN", "batch normalization", "group normalization",
    "domain generalization", "leave-one-domain-out", "LODO", "macro-F1", "KID", "FID",
    "train-on-synthetic/test-on-real", "TSTR", "R1 regularisation", "R2 regularisation", "RpGAN",
    "EMA generator", "mode collapse", "RoIAlign", "FPN", "FCOS", "mAP@0.5", "pseudo-label",
    "sparse annotation", "hierarchical F1", "mistake severity", "path consistency", "FCMAE",
    "global response normalisation", "GRN", "CLAHE", "contrastive loss", "InfoNCE", "CLIP loss",
    "zero-shot classification", "SupCon", "SWA", "stain normalisation", "Reinhard normalisation",
    "near-duplicate", "data leakage", "stratified split", "perceptual hash", "Grad-CAM", "ROAD",
    "reference checkpoint", "papermill", "profile"]


@pytest.mark.slow
def test_glossary_page_defines_every_term():
    book = smoke_book()
    page = (book.html / "book" / "glossary.html").read_text()
    terms = {htmllib.unescape(t) for t in re.findall(r'<dt id="term-[^"]*">(.*?)<a class="headerlink"', page, re.S)}
    terms = {re.sub(r"<[^>]+>", "", t).strip() for t in terms}
    missing = [t for t in GLOSSARY_TERMS if t not in terms]
    assert not missing, f"glossary lacks {missing}; has {sorted(terms)}"
    # the other new pages link into it ({term} roles; -W -n fails on an unknown term)
    for name in ("notation", "instructors"):
        other = (book.html / "book" / f"{name}.html").read_text()
        assert len(set(re.findall(r'href="glossary\.html#term-[^"]+"', other))) >= 5, name


@pytest.mark.slow
def test_notation_page_math_uses_the_local_mathjax():
    book = smoke_book()
    page = (book.html / "book" / "notation.html").read_text()
    inline = re.findall(r'<span class="math notranslate nohighlight">\\\(', page)
    display = re.findall(r'<div class="math notranslate nohighlight">\s*\\\[', page)
    assert len(inline) >= 20 and len(display) >= 4, (len(inline), len(display))
    assert "$" not in page_text(page).replace("$$", ""), "unparsed $...$ math on the page"
    scripts = re.findall(r'<script[^>]*\ssrc="([^"]+)"', page)
    local = [s for s in scripts if re.match(r"(\.\./)?_static/mathjax/tex-chtml\.js", s)]
    assert local, f"no local MathJax script among {scripts}"
    assert (book.html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert list((book.html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    for path in book.html.rglob("*.html"):  # no page of the site fetches a script from elsewhere
        found = build.CDN_SCRIPT.findall(path.read_text(errors="replace"))
        assert not found, f"{path.relative_to(book.html)} loads {found}"


@pytest.mark.slow
def test_injected_parameters_hidden_own_parameters_shown():
    book = smoke_book()
    source = book.html.parent / "source" / "notebooks"
    for name in build.toc_chapters():
        nb = nbformat.read(source / f"{Path(name).name}.ipynb", as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        own = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and "remove-cell" in injected[0].metadata["tags"], name
        assert own and "remove-cell" not in own[0].metadata["tags"], name
        page = (book.html / f"{name}.html").read_text()
        assert "tag_injected-parameters" not in page, f"{name}: the injected cell is on the page"
        assert 'profile = "smoke"' not in page_text(page), f"{name}: injected values shown"
        assert "tag_parameters" in page and 'profile = "ci"' in page_text(page), \
            f"{name}: the chapter's own parameters cell is missing"


#: The method chapters: each teaches one published method (issue 23's textbook elements).
METHOD_CHAPTERS = ["03_baseline", "04_hierarchy", "05_vision_language", "06_domain_generalization",
                   "07_detection", "08_r3gan_hybrid", "09_explain"]


def textbook_elements(page: str) -> dict:
    """What a chapter page offers a student, counted from its HTML."""
    return {
        "objectives": len(re.findall(r'class="[^"]*\bobjectives\b[^"]*admonition', page)),
        "equations": len(re.findall(r'<div class="math notranslate nohighlight"', page)),
        "package code": len(re.findall(r"From <code[^>]*><span class=\"pre\">leukemia_core/", page)),
        "diagram": len(re.findall(r'<(?:img|object)[^>]+class="graphviz', page)),
        "exercises": len(re.findall(r'class="[^"]*\bexercise\b[^"]*admonition', page)),
        "solutions": len(re.findall(r'class="[^"]*\bsolution\b[^"]*\bdropdown\b|class="[^"]*\bdropdown\b[^"]*\bsolution\b', page)),
        "takeaways": len(re.findall(r'class="[^"]*\btakeaways\b[^"]*admonition', page)),
    }


def missing_textbook_elements(found: dict) -> list[str]:
    need = {"objectives": (1, 1), "equations": (2, 99), "package code": (1, 99), "diagram": (1, 99),
            "exercises": (3, 5), "takeaways": (1, 1)}
    out = [f"{k}: {found[k]} (needs {lo}..{hi})" for k, (lo, hi) in need.items() if not lo <= found[k] <= hi]
    if found["solutions"] != found["exercises"]:
        out.append(f"{found['exercises']} exercises but {found['solutions']} collapsed solutions")
    return out


def test_textbook_elements_are_counted():
    """The counter finds each element in HTML as Jupyter Book 1 writes it, and the check
    names what a page lacks."""
    page = ('<div class="tip objectives admonition"></div>'
            '<div class="math notranslate nohighlight">a</div><div class="math notranslate nohighlight">b</div>'
            '<p>From <code class="docutils literal notranslate"><span class="pre">leukemia_core/vl/loss.py</span></code></p>'
            '<img src="../_images/graphviz-1.svg" class="graphviz" />'
            + '<div class="exercise admonition" id="ex-a"></div>'
            '<div class="solution dropdown admonition" id="s-a"></div>' * 3
            + '<div class="important takeaways admonition"></div>')
    assert missing_textbook_elements(textbook_elements(page)) == []
    assert missing_textbook_elements(textbook_elements(page.replace("takeaways", "x"))) == ["takeaways: 0 (needs 1..1)"]
    two = page.replace('<div class="solution dropdown admonition" id="s-a"></div>', "", 1)
    assert missing_textbook_elements(textbook_elements(two)) == ["3 exercises but 2 collapsed solutions"]


@pytest.mark.slow
@pytest.mark.parametrize("chapter", METHOD_CHAPTERS)
def test_method_chapter_teaches(chapter):
    """Issue 23: objectives, two or more equations, the method's code from the package, a
    generated diagram, 3-5 exercises with collapsed solutions, and a takeaways box."""
    book = smoke_book()
    page = (book.html / "notebooks" / f"{chapter}.html").read_text()
    missing = missing_textbook_elements(textbook_elements(page))
    assert not missing, f"{chapter}: {missing}"
    # The code shown is the package's source read at run time, not a copy in the notebook.
    shown = re.findall(r"From <code[^>]*><span class=\"pre\">(leukemia_core/[^<]+)</span>", page)
    assert all((REPO / p).is_file() for p in shown), shown
