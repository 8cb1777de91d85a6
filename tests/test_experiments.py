"""Every chapter that trains runs headless: ``leukemia-core run <chapter>`` writes the same
headline metrics as the chapter's notebook (both call ``leukemia_core.experiments``)."""
from __future__ import annotations

import ast
import inspect
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


#: Arguments the CLI passes to ``run`` itself (``--profile``, ``--seeds``, ``--out``, ...).
CLI_ARGUMENTS = {"profile", "seeds", "data_root", "out", "results_dir", "resume"}


def _parameters(tree: ast.Module, text: str) -> dict:
    """The notebook's parameters cell as {name: default value}."""
    cell = text.split('tags=["parameters"]', 1)[1].split("\n# %%", 1)[0]
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell).body
            if isinstance(node, ast.Assign)}


def _run_keywords(tree: ast.Module) -> dict[str, ast.expr]:
    """The keywords of the notebook's ``experiment.run(...)`` call; a ``**name`` whose name
    the notebook assigns from ``dict(...)`` is expanded into that call's keywords."""
    dicts = {node.targets[0].id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)
             and getattr(node.value.func, "id", None) == "dict"}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
             and getattr(node.func.value, "id", None) == "experiment"]
    assert len(calls) == 1, f"{len(calls)} experiment.run(...) calls"
    keywords = {}
    for kw in calls[0].keywords:
        if kw.arg is None:
            assert isinstance(kw.value, ast.Name) and kw.value.id in dicts, ast.unparse(kw.value)
            keywords |= {k.arg: k.value for k in dicts[kw.value.id].keywords}
        else:
            keywords[kw.arg] = kw.value
    return keywords


def default_mismatches(chapter: str, text: str) -> tuple[list[str], int]:
    """Where the notebook ``text`` hands ``experiment.run`` something other than a notebook
    parameter with ``run``'s own default (problems, and how many keywords were checked)."""
    tree = ast.parse(text)
    params, keywords = _parameters(tree, text), _run_keywords(tree)
    signature = inspect.signature(get_experiment(chapter).run)
    problems, checked = [], 0
    for name, value in keywords.items():
        if name in CLI_ARGUMENTS:
            continue
        checked += 1
        if name not in signature.parameters:
            problems.append(f"run() has no parameter '{name}'")
        elif not (isinstance(value, ast.Name) and value.id in params):
            problems.append(f"{name}={ast.unparse(value)} is not a notebook parameter passed through unchanged")
        elif params[value.id] != signature.parameters[name].default:
            problems.append(f"the notebook's {value.id} = {params[value.id]!r} but run()'s default is "
                            f"{signature.parameters[name].default!r}: the CLI would run another protocol")
    return problems, checked


@pytest.mark.parametrize("chapter", TRAINING_CHAPTERS)
def test_notebook_parameters_default_to_the_experiments_defaults(chapter):
    """With no parameter changed, the notebook and ``leukemia-core run <chapter>`` run the
    same protocol: every notebook parameter the notebook hands to ``experiment.run`` has
    the default ``run`` itself has, so the CLI, which passes only what ``--set`` names,
    runs the same thing. (The CLI's plumbing is checked end to end below.)"""
    problems, checked = default_mismatches(chapter, (REPO / "notebooks" / f"{chapter}.py").read_text())
    assert not problems, f"{chapter}: {problems}"
    assert checked, f"{chapter}: its notebook hands run() no parameter at all"


def test_a_changed_default_is_caught():
    """The check above fails when a notebook's default differs from ``run``'s."""
    text = (REPO / "notebooks" / "08_r3gan_hybrid.py").read_text()
    assert "\nimbalance_seed = 0" in text
    problems, _ = default_mismatches("08_r3gan_hybrid", text.replace("\nimbalance_seed = 0", "\nimbalance_seed = 1", 1))
    assert len(problems) == 1 and "imbalance_seed = 1" in problems[0], problems


#: The CLI-versus-notebook runs: the two cheapest chapters under smoke (about 45 s), one
#: fine-tuning and one GAN-and-ablation chapter. Every chapter's notebook and CLI call the
#: same ``run`` (test_notebooks_call_their_experiment) with the same defaults (above).
CLI_RERUN_CHAPTERS = ["03_baseline", "08_r3gan_hybrid"]


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CLI_RERUN_CHAPTERS)
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
