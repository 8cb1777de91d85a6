"""The core's layers hold: import-linter checks the contracts of pyproject.toml
(data imports no models or engine; models and the engine import no method; nothing in the
core imports the CLI), and a contract of the same kind does catch a violation."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath or cwd)}
    return subprocess.run([str(LINT), "--no-cache", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_core_layers_are_kept():
    r = lint(REPO)
    out = r.stdout + r.stderr
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", out)
    assert r.returncode == 0 and kept and int(kept.group(2)) == 0, out[-3000:]
    assert int(kept.group(1)) >= 6, out[-3000:]


def test_a_violation_breaks_the_contract(tmp_path):
    """The same kind of contract on a toy package whose data layer imports its engine."""
    pkg = tmp_path / "toy"
    (pkg / "data").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "loader.py").write_text("def load():\n    from toy.engine import train  # the violation\n")
    (pkg / "engine" / "train.py").write_text("")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = toy\n\n[importlinter:contract:data]\n"
        "name = data imports no engine\ntype = forbidden\nsource_modules = toy.data\nforbidden_modules = toy.engine\n")
    r = lint(tmp_path, "--config", str(tmp_path / ".importlinter"))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "BROKEN" in out and "toy.data.loader -> toy.engine.train" in out, out[-2000:]


def test_no_core_module_reaches_into_the_book_or_notebooks():
    """import-linter sees packages only; the book and the notebooks are not packages, so a
    plain scan: no core module imports book/build.py or executes a chapter."""
    offenders = []
    for path in (REPO / "leukemia_core").rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(?:from|import)\s+(?:book|notebooks)\b|papermill|load_module\(", text, re.M):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
