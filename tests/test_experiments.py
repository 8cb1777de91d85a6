"""Every chapter that trains runs headless: ``leukemia-core run <chapter>`` writes the same
headline metrics as the chapter's notebook (both call ``leukemia_core.experiments``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia_core.experiments import EXPERIMENTS, get_experiment
from leukemia_core.reproducibility.registry import headline_specs, load_claims, metric

REPO = Path(__file__).resolve().parent.parent
TRAINING_CHAPTERS = sorted(p.stem for p in (REPO / "notebooks").glob("0[3-8]_*.py"))


def test_every_training_chapter_has_an_experiment():
    assert sorted(EXPERIMENTS) == TRAINING_CHAPTERS
    for chapter in EXPERIMENTS:
        run = get_experiment(chapter).run
        assert list(run.__code__.co_varnames[:6]) == ["profile", "seeds", "data_root", "out", "results_dir",
                                                       "resume"], chapter


def test_notebooks_call_their_experiment():
    """The protocol lives in the core: each notebook calls its experiment's ``run`` and
    assembles no results JSON itself."""
    for chapter, module in EXPERIMENTS.items():
        text = (REPO / "notebooks" / f"{chapter}.py").read_text()
        assert f"leukemia_core.experiments.{module}" in text or f"experiments import {module}" in text, chapter
        for forbidden in ("write_results(", "combine_seed_results(", "json.dump("):
            assert forbidden not in text, f"{chapter} still assembles results itself ({forbidden})"


def test_unknown_chapter_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "leukemia_core.cli", "run", "99_nothing"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "03_baseline" in r.stderr


def _cli_args(params: dict) -> list[str]:
    args = []
    for k, v in params.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("chapter", TRAINING_CHAPTERS)
def test_cli_writes_the_notebooks_headline_metrics(chapter, tmp_path):
    """Under smoke, with the same parameters as the tests' smoke book (its exercise's
    change), the CLI's results JSONs hold the notebook's headline metrics."""
    from conftest import run_exercise
    from exercises import exercise_params

    _, nb_results, _ = run_exercise(chapter)
    params = exercise_params(tmp_path / "exercises").get(chapter, {})
    out, res = tmp_path / "artifacts", tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "leukemia_core.cli", "run", chapter, "--profile", "smoke",
                        "--out", str(out), "--results-dir", str(res), *_cli_args(params)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    written = sorted((res / "smoke").glob("*.json"))
    assert written, r.stdout
    claims = load_claims()
    compared = 0
    for path in written:
        notebook = json.loads((nb_results / path.name).read_text())
        cli = json.loads(path.read_text())
        for spec in headline_specs(claims, path.name):
            a, b = metric(notebook, spec["metric"]), metric(cli, spec["metric"])
            assert a == pytest.approx(b, abs=1e-6), f"{path.name} {spec['metric']}: notebook {a}, CLI {b}"
            compared += 1
    assert compared, f"no headline metric among {[p.name for p in written]}"
