"""Every chapter of ``_toc.yml`` is a paired py:percent notebook with a parameters cell,
and runs top to bottom in a fresh kernel under the ``smoke`` profile."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import load_module

REPO = Path(__file__).resolve().parent.parent


build = load_module("book_build", "book/build.py")
CHAPTERS = build.toc_chapters()


def have_data() -> bool:
    from leukemia_core.data.dataroot import resolve_data_root

    root, _ = resolve_data_root()
    return (root / "pbc").is_dir()


def test_toc_lists_the_chapters():
    assert CHAPTERS[:2] == ["notebooks/01_introduction", "notebooks/02_data"]
    assert "notebooks/03_baseline" in CHAPTERS


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_source(name):
    src = REPO / f"{name}.py"
    assert src.exists(), f"{name} is in _toc.yml but {src.relative_to(REPO)} does not exist"
    nb = build.read_chapter(name)
    assert "py:percent" in nb.metadata.get("jupytext", {}).get("formats", ""), \
        f"{src.name} is not paired as py:percent (jupytext formats: ipynb,py:percent)"
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{src.name} needs exactly one cell tagged parameters"
    params: dict = {}
    exec(cells[0].source, params)  # assignments only
    assert {"profile", "data_root", "seed"} <= params.keys(), cells[0].source
    assert params["profile"] == "ci" and params["data_root"] is None


def test_generated_notebooks_are_not_committed():
    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert tracked == [], f"generated .ipynb files are committed: {tracked}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/x.ipynb"], cwd=REPO)
    assert ignored.returncode == 0, "notebooks/*.ipynb must be git-ignored"


def smoke_book():
    """tests/test_book.py's smoke book: built once per session, shared by the test files."""
    return load_module("test_book", "tests/test_book.py").smoke_book()


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_runs_under_smoke(name, tmp_path):
    if not (REPO / f"{name}.py").exists():
        pytest.fail(f"{name} is in _toc.yml but has no source")
    if have_data():  # the smoke book executes every chapter once, in a fresh kernel each
        run = smoke_book().runs[name]
    elif build.requires_data(name):
        pytest.skip(f"{name} reads the datasets and no data root is present "
                    "(set LEUKEMIA_DATA or put the mirror at ../shared/datasets)")
    else:
        build.use_venv_kernel()
        run = build.execute_chapter(name, tmp_path, "smoke")
    assert run.ok, f"{name} failed under smoke: {run.error}"


@pytest.mark.slow
def test_a_failing_cell_fails_the_chapter(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "99_broken.py").write_text(
        '# %% tags=["parameters"]\nprofile = "ci"\ndata_root = None\nseed = 0\n\n'
        '# %%\nraise ValueError("boom")\n')
    monkeypatch.setattr(build, "ROOT", tmp_path)
    build.use_venv_kernel()
    run = build.execute_chapter("99_broken", tmp_path / "out", "smoke")
    assert not run.ok and "ValueError" in run.error and "boom" in run.error


def test_profile_sizes_live_in_one_place():
    """Every chapter's sizes come from leukemia_core.config.CHAPTER_SIZES, for every
    profile; no chapter types its own table of sizes per profile."""
    import re

    from leukemia_core.config import CHAPTER_SIZES, PROFILES, chapter_sizes

    for chapter, table in CHAPTER_SIZES.items():
        assert (REPO / "notebooks" / f"{chapter}.py").exists(), chapter
        assert set(table) == set(PROFILES), f"{chapter}: sizes for {sorted(table)}, profiles {sorted(PROFILES)}"
        assert set(table["smoke"]) == set(table["ci"]) == set(table["full"]), f"{chapter}: profiles differ in keys"
    typed = {p.name: len(re.findall(r'["\']smoke["\']\s*:\s*(?:dict\(|\{)', p.read_text()))
             for p in (REPO / "notebooks").glob("*.py")}
    assert not {k: v for k, v in typed.items() if v}, f"sizes typed per profile in chapters: {typed}"
    sizes = chapter_sizes("07_detection", "ci")
    sizes["fractions"] = ()
    assert chapter_sizes("07_detection", "ci")["fractions"], "chapter_sizes must hand out a copy"
