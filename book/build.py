#!/usr/bin/env python3
"""Build the book: execute every chapter of ``_toc.yml`` with papermill, then the HTML.

    python book/build.py                        # profile ci  -> _build/html/index.html
    python book/build.py --profile smoke        # a quick look
    python book/build.py --notebook 02_data     # execute one chapter only, no HTML

Everything lands under ``<out>/_build/`` (``<out>`` is the repository by default):
``source/`` is the book Jupyter Book 1 sees (``_config.yml``, ``_toc.yml``, the ``book/``
pages, the executed ``notebooks/*.ipynb`` and their ``.py`` sources), ``html/`` the site,
``build_report.json`` the measurements (also rendered as the book page ``book/build_report``).

The build fails, listing every problem, if a chapter raises, a page of the table of contents
is missing from the site, a figure of an executed notebook is missing from its page, a page
loads plotly.js, MathJax or any other script from a CDN (the book must work offline; MathJax
is copied into the site from the pinned ``sphinx-mathjax-offline`` wheel), or Jupyter Book
emits any warning (``-W -n --keep-going``). Papermill's injected-parameters cell is tagged
``remove-cell``: the page shows the chapter's own parameters cell, not the injected one.

It also fails if a results file the chapters just rewrote under ``results/<profile>/``
disagrees with its committed version (``git show HEAD:``) on a headline metric of
``results/claims.yaml`` by more than the tolerance stated there (freshness: committed
results cannot silently drift from what the code produces). After an intentional change,
``ACCEPT_DRIFT=1 make book`` (or ``--accept-drift``) lists the drift without failing;
commit the rewritten ``results/ci/*.json`` with the change.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jupytext
import nbformat
import papermill
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {"smoke": "a quick look: seconds, a few images per class",
            "ci": "the sizes this book is built with (CPU, minutes)",
            "full": "paper scale (hours; a GPU helps)"}
#: Wall-time budgets in seconds; the ``ci`` book must fit CI (2 cores): at most 30 minutes
#: on a quiet machine, so that a machine twice as slow still lands within CI's 90 (issue 18).
BUDGETS = {"ci": {"total": 30 * 60, "notebooks/02_data": 60, "notebooks/03_baseline": 5 * 60,
                  "notebooks/04_hierarchy": 5 * 60, "notebooks/05_vision_language": 4 * 60,
                  "notebooks/06_domain_generalization": 5 * 60, "notebooks/07_detection": 6 * 60,
                  "notebooks/08_r3gan_hybrid": 7 * 60,
                  "notebooks/09_explain": 2 * 60, "notebooks/10_explorer": 60,
                  "notebooks/11_reproducibility": 60, "notebooks/12_benchmarks": 60}}
#: The build folder, for chapters that read what this build measured so far
#: (``build_progress.json``, rewritten after every chapter).
BUILD_ENV = "LEUKEMIA_BOOK_BUILD"
PROGRESS = "build_progress.json"
#: What a chapter reads that other chapters of the same build write. With ``jobs`` > 1
#: (several kernels at once: the tests' smoke book) a chapter starts only after these have
#: finished; ``"*"``: every chapter before it in the table of contents. A chapter not listed
#: reads nothing another chapter writes (tests/test_book.py checks the notebooks for it).
NEEDS: dict[str, tuple[str, ...] | str] = {
    "notebooks/09_explain": ("notebooks/03_baseline",),  # the two baselines' checkpoints
    "notebooks/10_explorer": ("notebooks/03_baseline",),  # the ConvNeXt baseline's run folder
    "notebooks/11_reproducibility": "*",  # every chapter's results
    "notebooks/12_benchmarks": "*",  # this build's chapter timings (build_progress.json)
}
REPORT_PAGE = "book/build_report"
KERNEL = "python3"
#: How often the kernels' memory is sampled: reading PSS (smaps_rollup) of a kernel holding
#: gigabytes costs CPU; at 0.5 s the sampler took 4% of a core beside a training kernel.
MEMORY_SAMPLE_S = 2.0
PLOTLY_DIV = re.compile(r'class="plotly-graph-div"')
OUTPUT_IMG = re.compile(r'<img[^>]*src="[^"]*_images/')
CDN_PLOTLY = re.compile(r'<script[^>]*src="(?:https?:)?//[^"]*plot\.?ly', re.I)
#: Any script fetched from another host (MathJax's CDN default, require.js, ...).
CDN_SCRIPT = re.compile(r'<script[^>]*\ssrc=["\']((?:https?:)?//[^"\']+)', re.I)
#: Where MathJax 3 comes from: the pinned wheel's files, staged into ``source/<MATHJAX_STAGE>``
#: (an ``html_static_path`` of ``_config.yml``), so the site serves ``_static/mathjax/``.
MATHJAX_DIST = "sphinx-mathjax-offline"
MATHJAX_STAGE = "_vendor"
#: Of MathJax's files, those the book does not load (other output formats, bundles, node).
MATHJAX_SKIP = ("output/svg", "adaptors", "node-main.js", "tex-svg*.js", "tex-mml-*.js",
                "mml-*.js", "tex-chtml-full*.js")  # relative to MathJax's folder
INJECTED_TAG, HIDE_TAG = "injected-parameters", "remove-cell"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")


class BuildError(RuntimeError):
    """The book is broken; the message lists every problem found."""


# --------------------------------------------------------------------------- table of contents
def toc_files(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every file of the table of contents in reading order, root first, without suffix."""
    data = yaml.safe_load(Path(toc).read_text())
    files = [data["root"]]

    def walk(node):
        if "file" in node:
            files.append(node["file"])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key) or []:
                walk(child)

    walk(data)
    return [str(Path(f).with_suffix("")) for f in files]


def toc_chapters(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The notebook chapters (``notebooks/NAME``) of the table of contents."""
    return [f for f in toc_files(toc) if f.startswith("notebooks/")]


def chapter_name(name: str) -> str:
    """``02_data``, ``notebooks/02_data`` or ``notebooks/02_data.py`` -> ``notebooks/02_data``."""
    return f"notebooks/{Path(name).stem}"


def read_chapter(name: str):
    """The chapter's notebook, read from its py:percent source (the source of truth)."""
    return jupytext.read(ROOT / f"{name}.py")


def requires_data(name: str) -> bool:
    """False only where the notebook says ``book: {requires_data: false}`` in its header."""
    return read_chapter(name).metadata.get("book", {}).get("requires_data", True)


# --------------------------------------------------------------------------- execution
@dataclass
class ChapterRun:
    name: str
    ok: bool = False
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    error: str = ""
    figures: dict = field(default_factory=dict)  # in the executed notebook
    html_figures: dict = field(default_factory=dict)  # on the built page
    title: str = ""


class PeakRSS:
    """Largest summed memory of this process's children (the kernel and what it starts,
    e.g. data-loader workers), sampled every ``interval`` seconds. It sums the
    proportional set size (PSS), so pages that forked workers share with the kernel are
    split between them rather than counted once per process; RSS where PSS is unknown."""

    def __init__(self, interval: float | None = None):
        self.interval, self.peak = MEMORY_SAMPLE_S if interval is None else interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for proc in me.children(recursive=True):
                try:
                    info = proc.memory_full_info()
                    total += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def use_venv_kernel() -> None:
    """Make kernel ``python3`` the interpreter running this script (the venv's).

    The venv's kernelspec says ``python``, which jupyter_client replaces by
    ``sys.executable``; putting the venv's share/jupyter first on JUPYTER_PATH stops a
    user-level ``python3`` kernelspec from taking over."""
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(Path(sys.prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p)
    from jupyter_client.kernelspec import KernelSpecManager

    exe = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    v = sys.version_info
    if exe not in {"python", f"python{v[0]}", f"python{v[0]}.{v[1]}"} and \
            Path(exe).resolve() != Path(sys.executable).resolve():
        raise BuildError(f"kernel '{KERNEL}' runs {exe}, not {sys.executable}; run "
                         f"`{sys.executable} -m ipykernel install --sys-prefix` and retry")


def count_figures(nb) -> dict:
    """Figure outputs of an executed notebook: plotly graphs and static images."""
    found = {"plotly": 0, "image": 0}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html = data.get("text/html", "")
            html = "".join(html) if isinstance(html, list) else html
            if "application/vnd.plotly.v1+json" in data or PLOTLY_DIV.search(html):
                found["plotly"] += max(1, len(PLOTLY_DIV.findall(html)))
            elif any(mime in data for mime in IMAGE_MIMES):
                found["image"] += 1
    return found


def notebook_title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def execute_chapter(name: str, dest: Path, profile: str, data_root: str | None = None,
                    seed: int = 0, params: dict | None = None) -> ChapterRun:
    """Execute chapter ``name`` top to bottom in a fresh kernel into ``dest/<stem>.ipynb``.

    The kernel's working directory is the repository root, like every ``make`` command.
    ``params`` overrides more of the chapter's parameters (the exercises' changes)."""
    name = chapter_name(name)
    run, src = ChapterRun(name), ROOT / f"{name}.py"
    if not src.exists():
        run.error = f"source {src.relative_to(ROOT)} does not exist"
        return run
    nb = read_chapter(name)
    run.title = notebook_title(nb)
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        run.error = f'{src.name} has no cell tagged "parameters"'
        return run
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    extra, params = dict(params or {}), {"profile": profile, "seed": seed}
    if data_root:
        params["data_root"] = str(data_root)
    params.update(extra)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{src.stem}.ipynb"
    start = time.perf_counter()
    with PeakRSS() as mem:
        try:
            papermill.execute_notebook(nb, str(out), parameters=params, kernel_name=KERNEL,
                                       cwd=str(ROOT), progress_bar=False, log_output=False)
            run.ok = True
        except papermill.PapermillExecutionError as exc:
            run.error = f"cell [{exc.exec_count}] raised {exc.ename}: {exc.evalue}"
        except Exception as exc:  # the kernel died, would not start, ...
            run.error = f"{type(exc).__name__}: {exc}"
    run.wall_s, run.peak_rss_mb = time.perf_counter() - start, mem.peak / 2**20
    if out.exists():
        executed = nbformat.read(out, as_version=4)
        run.figures = count_figures(executed)
        hide_injected_parameters(executed)
        drop_unshown_widget_state(executed)
        if run.ok:
            insert_run_box(executed, run, profile)
        nbformat.write(executed, out)
    shutil.copy2(src, dest / src.name)  # the .py source, downloadable from the page
    return run


def hide_injected_parameters(nb) -> int:
    """Tag papermill's injected-parameters cell ``remove-cell`` so that the page leaves it
    out (the executed .ipynb keeps it); the chapter's own ``parameters`` cell stays on the
    page. Returns the number of cells tagged."""
    n = 0
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if INJECTED_TAG in tags and HIDE_TAG not in tags:
            tags.append(HIDE_TAG)
            n += 1
    return n


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_unshown_widget_state(nb) -> bool:
    """Drop the saved ipywidgets state when no widget is shown on the page.

    nbclient stores the state of every widget a chapter created in the notebook's
    metadata, and myst-nb then loads require.js and the widget manager from CDNs on that
    page, even when the widget's output is removed (the explorer's ``remove-output``
    cell). A widget actually shown on the page keeps its state (and the CDN check reports
    it). Returns whether the state was dropped."""
    if "widgets" not in nb.metadata:
        return False
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if {"remove-cell", "remove-output", "remove_cell", "remove_output"} & set(tags):
            continue
        if any(WIDGET_VIEW in out.get("data", {}) for out in cell.get("outputs", [])):
            return False
    del nb.metadata["widgets"]
    return True


def insert_run_box(nb, run: ChapterRun, profile: str) -> None:
    """Put a "run this chapter yourself" box under the chapter's title."""
    stem = Path(run.name).name
    rows = "\n".join(f"| `{p}` | {use} | `make notebook NB={stem} PROFILE={p}` |"
                     for p, use in PROFILES.items())
    box = f""":::{{admonition}} Run this chapter yourself
:class: tip

This page was executed by `make book` under the **{profile}** profile in
{run.wall_s:.0f} s (peak memory {run.peak_rss_mb:.0f} MB).

| profile | for | command (from the repository root) |
|---|---|---|
{rows}

`make notebook` runs `notebooks/{stem}.py` top to bottom with papermill and writes
`_build/source/notebooks/{stem}.ipynb`; `PROFILE=smoke make book` rebuilds the whole book.
To explore, open `notebooks/{stem}.py` in JupyterLab (Jupytext opens it as a notebook)
and change the parameters cell. Download the source: {{download}}`{stem}.py <{stem}.py>`;
the executed notebook is under the download button at the top of the page.
:::"""
    at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(at, nbformat.v4.new_markdown_cell(box, metadata={"tags": ["run-box"]}))


# --------------------------------------------------------------------------- reference tier
def reference_text(checks: list[dict]) -> str:
    """The build report's section on the reference checkpoints (issue 18): each expected
    one verified against reference/MANIFEST.sha256, missing (not trained yet) or corrupt."""
    if not checks:
        return ""
    lines = ["## Reference checkpoints\n",
             "Trained to convergence once, committed with a model card and SHA-256 manifest, and "
             "evaluated live by the chapters that show them (`results/reference/`).\n",
             "| checkpoint | status | detail |", "|---|---|---|"]
    lines += [f"| `reference/{c['chapter']}/{c['name']}` | "
              f"{'**' + c['status'] + '**' if c['status'] != 'verified' else c['status']} | {c['message']} |"
              for c in checks]
    return "\n".join(lines) + "\n"


def reference_problems() -> list[str]:
    """A committed reference checkpoint that fails its manifest fails the build; one not yet
    trained is listed in the report (and in its chapter), not a failure."""
    from leukemia_core.reproducibility.reference import status

    return [f"reference checkpoint corrupt: {c['message']}" for c in status() if c["status"] == "corrupt"]


# --------------------------------------------------------------------------- freshness
def check_freshness(profile: str, since: float | None, root: Path | None = None, baseline=None) -> dict:
    """Headline metrics of the ``results/<profile>/*.json`` modified since ``since`` against
    their committed versions (see :func:`leukemia_core.reproducibility.registry.freshness`): a summary
    whose ``problems`` list one line per drifted metric."""
    from leukemia_core.reproducibility.registry import freshness

    from leukemia_core.reproducibility.registry import committed_text

    root = root or ROOT
    fresh = freshness(profile, root=root, since=since, baseline=baseline)
    committed = baseline or (lambda p: committed_text(p, root))
    # a committed result that no chapter rewrote: nothing in the book reproduces it
    orphans = [f for f in fresh.skipped if committed(root / f) is not None]
    return {"profile": profile, "tolerance": fresh.tolerance,
            "checked": [{"file": r.file, "label": r.label, "metric": r.metric, "committed": r.committed,
                         "fresh": r.fresh, "status": r.status, "tolerance": r.tolerance} for r in fresh.rows],
            "new": fresh.new, "skipped": fresh.skipped, "orphans": orphans, "problems": fresh.problems()}


def accept_drift_from_env() -> bool:
    return os.environ.get("ACCEPT_DRIFT", "").lower() in ("1", "true", "yes")


def freshness_text(fresh: dict | None, accepted: bool) -> str:
    """The build report's section on freshness."""
    if fresh is None:
        return ""
    n_files = len({c["file"] for c in fresh["checked"]})
    lines = ["## Freshness of the committed results\n",
             f"The chapters rewrote {n_files + len(fresh['new'])} file(s) under "
             f"`results/{fresh['profile']}/`; {len(fresh['checked'])} headline metric(s) of {n_files} "
             f"committed file(s) were compared with `git show HEAD:` (tolerance ±{fresh['tolerance']}, "
             f"from `results/claims.yaml`)."]
    if fresh["problems"]:
        verdict = "accepted (`ACCEPT_DRIFT`): commit the rewritten files" if accepted else "the build fails"
        lines.append(f"\n**Drift, {verdict}:**\n")
        lines += [f"- {p}" for p in fresh["problems"]]
    else:
        lines[-1] += " Every one is within tolerance."
    if fresh["new"]:
        lines.append("\nNew (no committed version yet): " + ", ".join(f"`{f}`" for f in fresh["new"]) + ".")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- report
def fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return f"`{out}`" + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(path: Path, runs: dict[str, ChapterRun], profile: str, html_s: float | None,
                 problems: list[str], data_root: str | None, fresh: dict | None = None,
                 accept_drift: bool = False, exec_s: float | None = None, jobs: int = 1) -> dict:
    """Write the build report page (Markdown) and return its numbers. ``exec_s``: the
    execution's wall time (default: the chapters' summed, right when ``jobs`` is 1)."""
    budgets = BUDGETS.get(profile, {})
    exec_s = sum(r.wall_s for r in runs.values()) if exec_s is None else exec_s
    rows = []
    for name, r in runs.items():
        link = f"{{doc}}`{r.title or name} <../{name}>`" if r.ok else f"`{name}`"
        status = "ran" if r.ok else f"**FAILED**: {r.error}"
        budget = budgets.get(name)
        btext = "–" if budget is None else \
            f"{fmt_time(budget)} ({'within' if r.wall_s <= budget else '**over**'})"
        fig = r.figures or {"plotly": 0, "image": 0}
        rows.append(f"| {link} | {status} | {fmt_time(r.wall_s)} | {btext} | "
                    f"{r.peak_rss_mb:.0f} MB | {fig['plotly']} / {fig['image']} |")
    total_s = exec_s + (html_s or 0)
    total_budget = budgets.get("total")
    verdict = ("" if total_budget is None else
               f" of a {fmt_time(total_budget)} budget: "
               f"{'within budget' if total_s <= total_budget else '**over budget**'}")
    html_line = (f"the HTML build took {fmt_time(html_s)}, so the book took **{fmt_time(total_s)}**{verdict}."
                 if html_s is not None else
                 f"the HTML build had not run when this page was written; execution alone took "
                 f"{fmt_time(exec_s)}{verdict}.")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from leukemia_core.reproducibility.reference import status as reference_checks

    reference_status = reference_checks()
    from leukemia_core.data.dataroot import resolve_data_root
    root, source = resolve_data_root(data_root)
    checks = ("All checks passed: every chapter ran, every page of the table of contents "
              "exists, and every figure output reached its page." if not problems else
              "**Problems found:**\n\n" + "\n".join(f"- {p}" for p in problems))
    parallel = ("" if jobs <= 1 else
                f" This build ran up to {jobs} chapters at once, so their wall times overlap and each "
                "peak memory is that of every kernel running at the time.")
    text = f"""# Build report

`make book` wrote this page. It executed every chapter below from its `.py` source, top
to bottom in a fresh kernel (papermill), under the **{profile}** profile, then built the
HTML with Jupyter Book. Peak memory is the largest summed memory (PSS: shared pages split
between the processes sharing them) of the kernel and the processes it started, sampled
every {MEMORY_SAMPLE_S:g} s; figures count the plotly graphs and static
images each notebook produced, each of which must reach its page.{parallel}

| chapter | status | wall time | budget | peak memory | figures (plotly / static) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Executing the chapters took **{fmt_time(exec_s)}**; {html_line}

{checks}

{reference_text(reference_status)}
{freshness_text(fresh, accept_drift)}
Built {now} with Python {platform.python_version()} on {platform.system()}
({os.cpu_count()} CPUs), git commit {git_commit()}, data root `{root}` (from {source}).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"profile": profile, "built": now, "jobs": jobs, "execution_s": exec_s, "html_s": html_s,
            "total_s": total_s, "budget_s": total_budget, "problems": problems,
            "freshness": fresh, "reference_checkpoints": reference_status,
            "chapters": {n: asdict(r) for n, r in runs.items()}}


# --------------------------------------------------------------------------- HTML
def stage(build: Path) -> Path:
    """A fresh book source under ``build/source``: config, TOC and the book/ pages."""
    src = build / "source"
    shutil.rmtree(src, ignore_errors=True)
    (src / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "book", src / "book",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.pyc"))
    stage_mathjax(src / MATHJAX_STAGE / "mathjax")
    return src


def mathjax_source() -> Path:
    """MathJax 3's browser files, as the pinned ``sphinx-mathjax-offline`` wheel installs them."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MATHJAX_DIST)
    except metadata.PackageNotFoundError:
        raise BuildError(f"{MATHJAX_DIST} is not installed: the book serves MathJax itself "
                         f"(pip install -r requirements.lock)") from None
    path = Path(dist.locate_file(f"{MATHJAX_DIST}/static/mathjax"))
    if not (path / "tex-chtml.js").is_file():
        raise BuildError(f"{path / 'tex-chtml.js'} missing: reinstall {MATHJAX_DIST}")
    return path


def stage_mathjax(dest: Path) -> Path:
    """Copy MathJax (the ``tex-chtml`` bundle, its fonts and the extensions and
    accessibility components it loads on demand) to ``dest``; Sphinx serves it as
    ``_static/mathjax/`` (``mathjax_path`` in ``_config.yml``)."""
    import fnmatch

    top = mathjax_source()

    def skip(folder, names):
        rel = Path(folder).relative_to(top)
        return {n for n in names
                if any(fnmatch.fnmatch((rel / n).as_posix(), pat) for pat in MATHJAX_SKIP)}

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(top, dest, ignore=skip)
    return dest


def jupyter_book(src: Path, out: Path, everything: bool, log=print) -> tuple[int, list[str]]:
    """``jupyter-book build`` (warnings are errors); returns the exit code and warnings."""
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe), "build", str(src), "--path-output", str(out), "-W", "-n", "--keep-going"]
    if everything:
        cmd.append("--all")  # re-read every page so that no warning is cached away
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip()))  # no terminal colours
        log(line.rstrip())
    warnings = [l for l in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", l)]
    return proc.wait(), warnings


def check_site(html: Path, files: list[str], runs: dict[str, ChapterRun]) -> list[str]:
    """Every page present, every figure kept, plotly.js embedded and MathJax (any script)
    served by the site rather than fetched from a CDN."""
    problems = [] if (html / "index.html").exists() else [f"{html / 'index.html'} missing"]
    for name in files:
        page = html / f"{name}.html"
        if not page.exists():
            problems.append(f"page missing: {page.relative_to(html.parent)}")
            continue
        text = page.read_text(errors="replace")
        if CDN_PLOTLY.search(text):
            problems.append(f"{name}: loads plotly.js from a CDN (the book must work offline)")
        for url in sorted({u for u in CDN_SCRIPT.findall(text) if not re.search(r"plot\.?ly", u, re.I)}):
            what = "MathJax" if "mathjax" in url.lower() else "a script"
            problems.append(f"{name}: loads {what} from a CDN ({url}); the book must work offline")
        run = runs.get(name)
        if run and run.figures:
            run.html_figures = {"plotly": len(PLOTLY_DIV.findall(text)),
                                "image": len(OUTPUT_IMG.findall(text))}
            for kind, n in run.figures.items():
                if run.html_figures[kind] < n:
                    problems.append(f"{name}: the notebook has {n} {kind} figure(s), its page "
                                    f"{run.html_figures[kind]}: figure output dropped")
    return problems


@dataclass
class BookBuild:
    html: Path
    runs: dict[str, ChapterRun]
    problems: list[str]
    report: dict


def write_progress(build: Path, profile: str, started: float, runs: dict[str, ChapterRun]) -> None:
    """What this build has measured so far, for chapters that report on the build."""
    build.mkdir(parents=True, exist_ok=True)
    (build / PROGRESS).write_text(json.dumps(
        {"profile": profile, "started": started, "chapters": {n: asdict(r) for n, r in runs.items()}},
        indent=2))


def needs(name: str, chapters: list[str]) -> list[str]:
    """The chapters of ``chapters`` that ``name`` must wait for (:data:`NEEDS`)."""
    want = NEEDS.get(name, ())
    return chapters[:chapters.index(name)] if want == "*" else [c for c in want if c in chapters]


def execute_all(chapters: list[str], execute, jobs: int = 1, done=lambda name, run: None) -> dict:
    """``execute(name)`` for every chapter, in order; ``jobs`` > 1 runs up to ``jobs`` at once,
    each after the chapters it :func:`needs`. ``done(name, run)`` is called (in this thread)
    as each finishes. Returns ``{name: run}`` in the order of ``chapters``."""
    runs = {}
    if jobs <= 1:
        for name in chapters:
            runs[name] = execute(name)
            done(name, runs[name])
        return runs
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending, running = list(chapters), {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for name in list(pending):
                if len(running) < jobs and all(n in runs for n in needs(name, chapters)):
                    pending.remove(name)
                    running[pool.submit(execute, name)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                runs[name] = future.result()
                done(name, runs[name])
    return {name: runs[name] for name in chapters}


def build_book(profile: str = "ci", out: Path = ROOT, data_root: str | None = None,
               seed: int = 0, log=print, accept_drift: bool | None = None,
               params: dict[str, dict] | None = None, jobs: int = 1) -> BookBuild:
    """Execute every chapter, check the results' freshness, write the report page,
    build and check the HTML. ``params`` maps a chapter's stem to parameter overrides
    (the tests' smoke book runs each chapter with its exercise's change). ``jobs``: how
    many chapters execute at once (:data:`NEEDS` orders them); the book that reports
    timings (``ci``) runs one at a time, since chapters running side by side slow each
    other and their memory is sampled together."""
    use_venv_kernel()
    accept_drift = accept_drift_from_env() if accept_drift is None else accept_drift
    build = Path(out).resolve() / "_build"
    files = toc_files()
    problems = [f"page source missing: {f}.md" for f in files
                if not f.startswith("notebooks/") and f != REPORT_PAGE
                and not (ROOT / f"{f}.md").exists()]
    src = stage(build)
    runs = {}
    started = time.time()
    os.environ[BUILD_ENV] = str(build)
    write_progress(build, profile, started, runs)

    def execute(name: str) -> ChapterRun:
        log(f"[book] executing {name} under profile {profile} ...")
        return execute_chapter(name, src / "notebooks", profile, data_root, seed,
                               params=(params or {}).get(Path(name).name))

    def done(name: str, run: ChapterRun) -> None:
        runs[name] = run
        log(f"[book] {name}: {'ok' if run.ok else 'FAILED: ' + run.error} "
            f"({fmt_time(run.wall_s)}, peak {run.peak_rss_mb:.0f} MB, figures {run.figures})")
        if not run.ok:
            problems.append(f"{name}: {run.error}")
        write_progress(build, profile, started, runs)

    exec_start = time.perf_counter()
    runs = execute_all(toc_chapters(), execute, jobs, done)
    exec_s = time.perf_counter() - exec_start
    fresh = check_freshness(profile, since=started)
    log(f"[book] freshness: {len(fresh['checked'])} headline metric(s) compared with the committed "
        f"results/{profile}/, {len(fresh['problems'])} drift(s), {len(fresh['new'])} new file(s)")
    if profile != "reference":  # the reference checkpoints' live evaluations, fixed weights
        ref = check_freshness("reference", since=started)
        log(f"[book] freshness: {len(ref['checked'])} metric(s) of the reference checkpoints' live evaluations "
            f"compared with the committed results/reference/, {len(ref['problems'])} drift(s), "
            f"{len(ref['new'])} new file(s)")
        fresh["checked"] += ref["checked"]
        fresh["new"] += ref["new"]
        fresh["problems"] += ref["problems"]
    if not accept_drift:
        problems += [f"results drift: {p}" for p in fresh["problems"]]
    problems += [f"orphan result: {f} is committed but no chapter of this build wrote it (delete it, or "
                 "make a chapter write it)" for f in fresh["orphans"]]
    problems += reference_problems()
    report_md = src / f"{REPORT_PAGE}.md"
    write_report(report_md, runs, profile, None, problems, data_root, fresh, accept_drift, exec_s, jobs)
    start = time.perf_counter()
    rc, warnings = jupyter_book(src, build.parent, everything=True, log=log)
    html_s = time.perf_counter() - start
    if rc:
        problems.append(f"jupyter-book build failed (exit {rc}); {len(warnings)} warning(s):")
        problems += [f"  {w}" for w in warnings]
    html = build / "html"
    problems += check_site(html, files, runs)
    report = write_report(report_md, runs, profile, html_s, problems, data_root, fresh, accept_drift,
                          exec_s, jobs)
    if not rc:  # rebuild only the report page, now that it knows the HTML time
        rc2, _ = jupyter_book(src, build.parent, everything=False, log=lambda _: None)
        if rc2:
            problems.append(f"rebuilding the report page failed (exit {rc2})")
    (build / "build_report.json").write_text(json.dumps(report, indent=2))
    return BookBuild(html, runs, problems, report)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "ci"), choices=sorted(PROFILES))
    ap.add_argument("--out", type=Path, default=ROOT, help="the build goes to OUT/_build (default: the repository)")
    ap.add_argument("--data-root", default=None, help="data root (default: LEUKEMIA_DATA, else data/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="chapters executed at once (default 1: the timings the report states are then each "
                         "chapter's own; more is faster where chapters leave cores idle, e.g. --profile smoke)")
    ap.add_argument("--notebook", nargs="+", metavar="NB",
                    help="only execute these chapters (e.g. 02_data), without building the HTML")
    ap.add_argument("--accept-drift", action="store_true", default=accept_drift_from_env(),
                    help="list results that drifted from their committed version without failing "
                         "(also: ACCEPT_DRIFT=1); then commit the rewritten results")
    args = ap.parse_args(argv)
    if args.notebook:
        use_venv_kernel()
        dest = args.out.resolve() / "_build" / "source" / "notebooks"
        failed = 0
        started = time.time()
        for name in args.notebook:
            run = execute_chapter(name, dest, args.profile, args.data_root, args.seed)
            print(f"{run.name}: {'ok' if run.ok else 'FAILED: ' + run.error} in "
                  f"{fmt_time(run.wall_s)}, peak memory {run.peak_rss_mb:.0f} MB -> "
                  f"{dest / (Path(run.name).name + '.ipynb')}")
            failed += not run.ok
        fresh = check_freshness(args.profile, since=started)
        for p in fresh["problems"]:
            print(f"results drift{' (accepted)' if args.accept_drift else ''}: {p}", file=sys.stderr)
        if fresh["new"]:
            print("new results (no committed version): " + ", ".join(fresh["new"]))
        return 1 if failed or (fresh["problems"] and not args.accept_drift) else 0
    result = build_book(args.profile, args.out, args.data_root, args.seed,
                        accept_drift=args.accept_drift, jobs=args.jobs)
    rep = result.report
    print(f"\n[book] profile {args.profile}: execution {fmt_time(rep['execution_s'])}, HTML "
          f"{fmt_time(rep['html_s'])}, total {fmt_time(rep['total_s'])}"
          + (f" (budget {fmt_time(rep['budget_s'])})" if rep["budget_s"] else ""))
    if result.problems:
        print("\n[book] BUILD FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems),
              file=sys.stderr)
        return 1
    print(f"[book] open {result.html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
