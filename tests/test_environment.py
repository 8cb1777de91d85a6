"""The environment files agree: pyproject ranges, environment.yml, and the lock."""
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def _pyproject_requirements():
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return proj["dependencies"] + [r for extra in proj["optional-dependencies"].values() for r in extra]


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {str(Requirement(r)) for r in pip if not r.startswith("-e")}
    assert listed == {str(Requirement(r)) for r in _pyproject_requirements()}


def test_lock_pins_satisfy_pyproject_ranges():
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for r in map(Requirement, _pyproject_requirements()):
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is not pinned in requirements.lock"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {r}"


def test_readme_and_ci_use_the_same_test_command():
    assert "make test" in (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "make test" in ci


def test_every_module_that_reads_the_smoke_book_is_in_its_work_unit():
    """Under ``make test`` (two xdist workers) a module that reads the smoke book outside
    its work unit makes the other worker build a second one (12 min instead of 6: this
    happened with tests/test_math_browser.py)."""
    import re

    from conftest import SMOKE_BOOK_MODULES, work_unit

    reads = re.compile(r"smoke_book\(|run_exercise\(|load_module\(\"test_(book|browser)\"")
    readers = {p.stem for p in (REPO / "tests").glob("test_*.py") if reads.search(p.read_text())}
    assert readers, "no test module reads the smoke book: the pattern is out of date"
    outside = sorted(m for m in readers if work_unit(f"tests/{m}.py::t") != "smoke_book")
    assert outside == [], f"read the smoke book but are not in SMOKE_BOOK_MODULES: {outside}"
    assert work_unit("tests/test_cli.py::test_help[args0]") == "tests/test_cli.py"
    assert SMOKE_BOOK_MODULES <= {p.stem for p in (REPO / "tests").glob("test_*.py")}
