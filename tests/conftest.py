"""Shared fixtures. Real-data tests use the mirror at ../shared/datasets (or
$LEUKEMIA_DATA) and skip, saying why, when it is absent."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MIRROR = REPO.parent / "shared" / "datasets"
if not os.environ.get("LEUKEMIA_DATA") and MIRROR.is_dir():
    os.environ["LEUKEMIA_DATA"] = str(MIRROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: Threads per test process. pytest-xdist runs its workers side by side (``make test``: 2 on
#: 2 cores), and torch's OpenMP pool in each worker, and in every kernel and CLI process a
#: test starts, would otherwise take every core: oversubscribed, the smoke book took 390 s
#: instead of 222 s (measured 2026-11-24, 2 cores, 2 vs 1 threads per kernel). Set before
#: torch is imported; children inherit it. A single-process run keeps torch's default.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


#: Test modules that read the session's smoke book (built once per process, ~6 min). Under
#: ``pytest -n 2`` (``make test``) they form one work unit, so one worker builds the book
#: once while the other runs the rest; every other module is a unit of its own (its module
#: fixtures built once). xdist's ``--dist loadgroup`` marks would say the same, but
#: pytest-xdist 3.8 cannot rename node ids under pytest 9, so the units come from this
#: scheduler instead (``pytest_xdist_make_scheduler``, xdist's hook).
SMOKE_BOOK_MODULES = {"test_book", "test_browser", "test_experiments", "test_math_browser", "test_notebooks"}


def work_unit(nodeid: str) -> str:
    """The work unit of a test: ``"smoke_book"`` or its module's path."""
    module = nodeid.split("::")[0]
    stem = Path(module).stem
    return "smoke_book" if stem in SMOKE_BOOK_MODULES or stem.startswith("test_exercise_") else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SmokeBookScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SmokeBookScheduling(config, log)


def load_module(name: str, relpath: str):
    """A repository file as a module, imported once per session (a test file that
    pytest already imported under ``name`` is reused, so its caches are shared)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def real_root() -> Path | None:
    """The dataset mirror (with its SHA256SUMS), or None when it is absent."""
    root = os.environ.get("LEUKEMIA_DATA")
    if root and (Path(root) / "pbc").is_dir() and (Path(root) / "SHA256SUMS").is_file():
        return Path(root)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_root()
    if root is None:
        pytest.skip("real-data test: no dataset mirror at ../shared/datasets or $LEUKEMIA_DATA")
    return root


@pytest.fixture(scope="session")
def pbc_table(data_root):
    from leukemia_core.data import load_dataset
    return load_dataset("pbc", data_root)


def run_exercise(chapter: str):
    """The tests' smoke book's run of ``chapter``, which executed it with its exercise's
    parameter change (tests/exercises.py): ``(executed notebook, results folder,
    artifacts folder)``; the artifacts live in the smoke book's temporary folder. Skips, like the book, without the dataset mirror."""
    import nbformat

    from exercises import EXERCISES

    assert chapter in EXERCISES, f"{chapter} has no exercise in tests/exercises.py"
    book = load_module("test_book", "tests/test_book.py").smoke_book()
    run = book.runs[f"notebooks/{chapter}"]
    assert run.ok, f"{chapter} with its exercise's change failed under smoke: {run.error}"
    nb = nbformat.read(book.html.parent / "source" / "notebooks" / f"{chapter}.ipynb", as_version=4)
    return nb, REPO / "results" / "smoke", book.html.parents[1] / "artifacts" / "smoke"


def notebook_text(nb) -> str:
    """Every text/plain, text/markdown and stream output of an executed notebook, joined."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            for mime in ("text/markdown", "text/plain"):
                if mime in o.get("data", {}):
                    out.append(o["data"][mime])
    return "\n".join(out)
