"""The results registry: schema, claims file, attribution to papers, the report's tables,
and the freshness check that fails the book build on a deliberately edited result."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_module
from leukemia_core.reproducibility import registry
from leukemia_core.errors import LeukemiaError
from leukemia_core.reproducibility.registry import (ResultsError, freshness, headline_rows, load_claims, load_registry,
                                    metric, not_reproducible, paper_of, paper_status, validate)
from leukemia_core.reproducibility.results import write_results

REPO = Path(__file__).resolve().parent.parent
build = load_module("book_build", "book/build.py")


def payload(**changes) -> dict:
    """A minimal valid results payload (the fields write_results adds included)."""
    data = {"schema": registry.SCHEMA, "kind": "classification", "profile": "ci", "seeds": [0],
            "config": {"model": "m"}, "metrics": {"test": {"accuracy": 0.9, "macro_f1": 0.8}},
            "split_sha256": "a" * 64, "data_sha256": "b" * 64, "git_sha": "c" * 40,
            "hardware": {"cpu": "x", "cpu_count": 2}, "created": "2026-01-01T00:00:00+00:00",
            "wall_time_s": 1.5}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def fields(**changes) -> dict:
    """What a chapter passes to write_results."""
    return {k: v for k, v in payload(**changes).items()
            if k not in ("schema", "git_sha", "hardware", "created")}


# ------------------------------------------------------------------ schema
def test_a_valid_payload_passes():
    assert validate(payload()) == []


def test_validate_lists_every_problem():
    problems = validate(payload(seeds=None, metrics={}, wall_time_s="slow", split_sha256="",
                                schema="other/v9", paper=3))
    text = "\n".join(problems)
    for needle in ("missing field 'seeds'", "'metrics' is empty", "'wall_time_s' is str",
                   "'split_sha256' is empty", "schema 'other/v9'", "'paper' is int"):
        assert needle in text, (needle, problems)


def test_write_results_refuses_an_incomplete_payload(tmp_path):
    with pytest.raises(LeukemiaError, match="data_sha256"):
        write_results(tmp_path / "r.json", **fields(data_sha256=None))
    assert not (tmp_path / "r.json").exists()


def test_write_results_round_trip_and_attribution(tmp_path):
    claims = load_claims()
    path = write_results(tmp_path / "ci" / "h.json", **fields(kind="hierarchical", chapter="04_hierarchy",
                                                              seeds=(0, 1)))
    res = registry.load_result(path, claims)
    assert res.paper == "hamdi2025hierarchy" and res.data["seeds"] == [0, 1]
    assert res.data["hardware"]["cpu_count"] and res.data["git_sha"]


def test_a_finished_run_resumed_again_keeps_its_wall_time(tmp_path):
    """Resuming a finished run trains nothing: its results file keeps the wall time of the
    session that finished it; a session that trained more epochs records its own."""
    from leukemia_core.reproducibility.results import session_wall_time

    path = tmp_path / "results.json"
    two = [{"epoch": 0}, {"epoch": 1}]
    assert session_wall_time(path, two, 5.0) == 5.0  # no file yet
    path.write_text(json.dumps({"history": two, "wall_time_s": 3600.0}))
    assert session_wall_time(path, two, 2.0) == 3600.0  # nothing new trained
    assert session_wall_time(path, two + [{"epoch": 2}], 900.0) == 900.0  # a longer run
    path.write_text("{not json")
    assert session_wall_time(path, two, 2.0) == 2.0


def test_paper_attribution_order():
    claims = load_claims()
    assert paper_of(payload(paper="umer2023imbalanced", chapter="04_hierarchy"), claims) == "umer2023imbalanced"
    assert paper_of(payload(chapter="04_hierarchy"), claims) == "hamdi2025hierarchy"
    assert paper_of(payload(kind="vision_language"), claims) == "vlm_leukemia_2026"
    assert paper_of(payload(kind="classification", dataset="pbc"), claims) == "pbc_baseline"
    assert paper_of(payload(kind="classification", dataset="bccd"), claims) is None


def test_metric_paths_take_keys_with_spaces_and_dots():
    data = {"metrics": {"test": {"argmax leaf": {"hier. F1": 0.5}}, "rows": [{"a": 1}]}}
    assert metric(data, "metrics/test/argmax leaf/hier. F1") == 0.5
    assert metric(data, "metrics/rows/0/a") == 1
    assert metric(data, "metrics/test/missing") is None


def test_combine_seed_results(tmp_path):
    paths = []
    for s, acc in ((0, 0.8), (1, 0.9)):
        paths.append(write_results(tmp_path / f"s{s}.json", **fields(
            seeds=[s], metrics={"test": {"accuracy": acc, "n": 10, "per_class": {}}}, wall_time_s=2.0)))
    out = registry.combine_seed_results(paths, tmp_path / "ci" / "baseline_m.json", chapter="03_baseline")
    data = registry.check(json.loads(out.read_text()))
    assert data["seeds"] == [0, 1] and data["wall_time_s"] == 4.0 and data["chapter"] == "03_baseline"
    assert data["metrics"]["test"]["accuracy"] == pytest.approx(0.85)
    assert data["metrics"]["test_std"]["accuracy"] == pytest.approx(math.sqrt(0.005))
    assert len(data["metrics"]["per_seed"]) == 2
    one = registry.combine_seed_results(paths[:1], tmp_path / "one.json", paper="pbc_baseline")
    assert json.loads(one.read_text())["metrics"]["test"]["accuracy"] == 0.8


# ------------------------------------------------------------------ claims and the committed registry
def test_claims_file_is_consistent():
    claims = load_claims()
    bib = (REPO / "book" / "references.bib").read_text()
    toc = (REPO / "_toc.yml").read_text()
    for key, paper in claims["papers"].items():
        for cite in paper.get("cite") or []:
            assert f"{{{cite}," in bib, f"{key}: cite key {cite} is not in references.bib"
        if paper.get("chapter"):
            assert (REPO / "notebooks" / f"{paper['chapter']}.py").exists(), key
            assert f"notebooks/{paper['chapter']}" in toc, key
            assert paper.get("ours"), f"{key} has a chapter but no headline metric"
        for ref in (paper.get("claims") or []) + (paper.get("anchors") or []):
            assert ref.get("value") is None or 0 <= ref["value"] <= 1, (key, ref["id"])
    # the report's list of gaps covers the reasons the book names
    reasons = {item["why"] for item in not_reproducible(claims)}
    assert {"private_data", "no_cml_cll", "no_public_code", "contradictory_code"} <= reasons


def test_a_broken_claims_file_is_refused(tmp_path):
    claims = yaml.safe_load((REPO / "results" / "claims.yaml").read_text())
    claims["papers"]["hamdi2025hierarchy"]["ours"][0]["compare_to"] = "nowhere"
    claims["papers"]["rehman2025lld"]["not_reproducible"][0]["why"] = "bad luck"
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims))
    with pytest.raises(ResultsError) as err:
        load_claims(tmp_path / "claims.yaml")
    assert "nowhere" in str(err.value) and "bad luck" in str(err.value)


def test_every_claim_and_anchor_cites_a_bibtex_entry(tmp_path):
    claims = yaml.safe_load((REPO / "results" / "claims.yaml").read_text())
    claims["papers"]["umer2023imbalanced"]["anchors"][0]["cite"] = "planning_issue_7"
    del claims["papers"]["hamdi2025hierarchy"]["claims"][0]["cite"]
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims))
    with pytest.raises(ResultsError) as err:
        load_claims(tmp_path / "claims.yaml")
    assert "planning_issue_7" in str(err.value) and "accuracy_90: cite 'None'" in str(err.value)


def test_a_chapter_needs_a_preregistered_headline(tmp_path):
    claims = yaml.safe_load((REPO / "results" / "claims.yaml").read_text())
    del claims["papers"]["convnextv2_swin_r3gan_2025"]["headline"]
    claims["papers"]["umer2023imbalanced"]["headline"]["judged"].append("a row nobody reports")
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims))
    with pytest.raises(ResultsError) as err:
        load_claims(tmp_path / "claims.yaml")
    assert "convnextv2_swin_r3gan_2025: a paper with a chapter needs a headline" in str(err.value)
    assert "a row nobody reports" in str(err.value)


def test_a_selected_row_must_say_how_it_was_selected():
    assert any("selected_on" in p for p in validate(payload(metrics={"best_row": "x", "acc": 0.9})))
    assert validate(payload(metrics={"best_row": "x", "acc": 0.9}, selected_on="test")) == []
    assert any("selected_on" in p for p in validate(payload(selected_on="by eye")))


def test_no_verdict_rests_on_a_row_selected_on_test(tmp_path):
    claims = load_claims()
    reg = load_registry(claims=claims, profiles=("ci", "full"))
    assert registry.verdicts_on_test_selection(claims, reg) == []
    # the check can fail: a judged file marked as selected on test
    (tmp_path / "ci").mkdir()
    write_results(tmp_path / "ci" / "dg_headline.json", **fields(
        kind="domain_generalization", chapter="06_domain_generalization", selected_on="test",
        metrics={"lodo": {"mean_macro_f1": 0.6, "bccd_accuracy": 0.5}}))
    bad = registry.verdicts_on_test_selection(claims, load_registry(tmp_path, claims=claims))
    assert bad and all("selected_on: test" in line for line in bad)


def test_committed_results_are_valid_and_filed_under_a_paper():
    claims = load_claims()
    reg = load_registry(claims=claims, profiles=("ci", "full"))
    assert reg.problems == []
    for res in reg.results:
        assert res.paper in claims["papers"], f"{res.path} belongs to no paper of claims.yaml"


def test_report_rows(tmp_path):
    claims = load_claims()
    write_results(tmp_path / "ci" / "hierarchy_multilevel_efficientnet_lite0.json", **fields(
        kind="hierarchical", chapter="04_hierarchy",
        metrics={"test": {"path_probability": {"leaf acc": 0.75}},
                 "shortcut": {"background_leaf_accuracy": 0.5}}))
    reg = load_registry(tmp_path, claims=claims)
    rows = {r["metric"]: r for r in headline_rows(claims, reg, "hamdi2025hierarchy")}
    multi = rows["multi-level model, leaf accuracy (path-probability decoding)"]
    assert multi["ci"] == 0.75 and multi["full"] is None and multi["reference_value"] == 0.9
    assert "cores" in multi["results"]["ci"].machine()  # written by write_results on this machine
    assert rows["background-only probe, leaf accuracy (shortcut control)"]["ci"] == 0.5
    assert paper_status(claims, reg, "hamdi2025hierarchy", "ci") == "run"
    assert paper_status(claims, reg, "hamdi2025hierarchy", "full") == "not yet run"
    unwritten = {**claims, "papers": {**claims["papers"], "a_paper_without_chapter": {"chapter": None}}}
    assert paper_status(unwritten, reg, "a_paper_without_chapter", "ci") == "no chapter yet"
    assert paper_status(claims, reg, "convnextv2_swin_r3gan_2025", "ci") == "not yet run"  # chapter 08, not in tmp_path


def test_a_result_filed_under_the_wrong_profile_is_a_problem(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.json").write_text(json.dumps(payload(profile="ci")))
    (tmp_path / "full" / "broken.json").write_text("{")
    reg = load_registry(tmp_path)
    assert any("filed under full/" in p for p in reg.problems)
    assert any("broken.json" in p for p in reg.problems)


# ------------------------------------------------------------------ freshness
def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git checkout whose HEAD holds claims.yaml and the real committed baseline result."""
    root = tmp_path / "repo"
    (root / "results" / "ci").mkdir(parents=True)
    shutil.copy(REPO / "results" / "claims.yaml", root / "results" / "claims.yaml")
    committed = REPO / "results" / "ci" / "baseline_convnext_atto.json"
    (root / "results" / "ci" / "baseline_convnext_atto.json").write_text(committed.read_text())
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "results")
    return root


def rewrite(path: Path, accuracy_change: float) -> float:
    data = json.loads(path.read_text())
    data["metrics"]["test"]["accuracy"] += accuracy_change
    path.write_text(json.dumps(data))
    return data["metrics"]["test"]["accuracy"]


def test_unchanged_and_in_tolerance_results_are_fresh(repo):
    path = repo / "results" / "ci" / "baseline_convnext_atto.json"
    fresh = freshness("ci", root=repo)
    assert fresh.drift == [] and {r.status for r in fresh.rows} == {"ok"}
    assert {r.metric for r in fresh.rows} == {"metrics/test/accuracy", "metrics/test/macro_f1"}
    rewrite(path, 0.02)
    assert freshness("ci", root=repo).drift == []


def test_a_deliberately_edited_result_is_drift(repo):
    path = repo / "results" / "ci" / "baseline_convnext_atto.json"
    real = json.loads(path.read_text())["metrics"]["test"]["accuracy"]
    rewrite(path, -0.10)  # someone edits the committed number...
    git(repo, "commit", "-q", "-am", "edited result")
    rewrite(path, +0.10)  # ...and the build reproduces the real one
    fresh = freshness("ci", root=repo)
    (row,) = fresh.drift
    assert row.file == "results/ci/baseline_convnext_atto.json" and row.metric == "metrics/test/accuracy"
    assert row.fresh == pytest.approx(real) and row.delta == pytest.approx(0.10)
    (line,) = fresh.problems()
    assert "baseline_convnext_atto.json" in line and "tolerance ±0.03" in line


def test_new_and_untouched_files_are_not_drift(repo, tmp_path):
    new = repo / "results" / "ci" / "new_result.json"
    new.write_text(json.dumps(payload()))
    fresh = freshness("ci", root=repo)
    assert fresh.new == ["results/ci/new_result.json"] and fresh.drift == []
    import time
    later = time.time() + 3600
    assert set(freshness("ci", root=repo, since=later).skipped) == {
        "results/ci/new_result.json", "results/ci/baseline_convnext_atto.json"}


def test_nan_and_missing_metrics(repo):
    path = repo / "results" / "ci" / "baseline_convnext_atto.json"
    data = json.loads(path.read_text())
    del data["metrics"]["test"]["macro_f1"]
    path.write_text(json.dumps(data))
    (row,) = freshness("ci", root=repo).drift
    assert row.metric == "metrics/test/macro_f1" and row.fresh is None
    assert registry._same(float("nan"), float("nan"), 0.03) and not registry._same(float("nan"), 0.5, 0.03)


def test_the_book_build_fails_on_drift(repo, monkeypatch):
    """build_book with one fake chapter that rewrites a committed result: the build lists
    the drift as a problem (and, with accept_drift, reports it without failing)."""
    (repo / "_toc.yml").write_text("format: jb-book\nroot: notebooks/01_intro\nparts:\n"
                                   "  - caption: About\n    chapters:\n      - file: book/build_report\n")
    (repo / "_config.yml").write_text("title: t\n")
    (repo / "book").mkdir()
    path = repo / "results" / "ci" / "baseline_convnext_atto.json"
    produced = path.read_text()  # what the code produces
    rewrite(path, -0.10)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a deliberately edited result")

    def fake_chapter(name, dest, profile, data_root=None, seed=0, params=None):
        path.write_text(produced)  # the chapter rewrites the result
        return build.ChapterRun(build.chapter_name(name), ok=True, title="Intro")

    monkeypatch.setattr(build, "ROOT", repo)
    monkeypatch.setattr(build, "toc_files", lambda: ["notebooks/01_intro", build.REPORT_PAGE])
    monkeypatch.setattr(build, "toc_chapters", lambda: ["notebooks/01_intro"])
    monkeypatch.setattr(build, "execute_chapter", fake_chapter)
    monkeypatch.setattr(build, "jupyter_book", lambda *a, **k: (0, []))
    monkeypatch.setattr(build, "check_site", lambda *a, **k: [])
    monkeypatch.setenv(build.BUILD_ENV, "unset")
    monkeypatch.delenv("ACCEPT_DRIFT", raising=False)
    result = build.build_book("ci", out=repo, log=lambda line: None)
    drift = [p for p in result.problems if p.startswith("results drift")]
    assert len(drift) == 1 and "baseline_convnext_atto.json" in drift[0] and "accuracy" in drift[0]
    page = (repo / "_build" / "source" / "book" / "build_report.md").read_text()
    assert "Freshness of the committed results" in page and "the build fails" in page
    assert json.loads((repo / "_build" / "build_report.json").read_text())["freshness"]["problems"]
    progress = json.loads((repo / "_build" / build.PROGRESS).read_text())
    assert list(progress["chapters"]) == ["notebooks/01_intro"]

    accepted = build.build_book("ci", out=repo, log=lambda line: None, accept_drift=True)
    assert not any(p.startswith("results drift") for p in accepted.problems)
    assert accepted.report["freshness"]["problems"]
    assert not any(p.startswith("orphan result") for p in accepted.problems)

    # a committed result no chapter writes any more fails the build, drift accepted or not
    (repo / "results" / "ci" / "old_experiment.json").write_text(produced)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a result nothing reproduces")
    orphaned = build.build_book("ci", out=repo, log=lambda line: None, accept_drift=True)
    assert [p for p in orphaned.problems if p.startswith("orphan result")] == [
        "orphan result: results/ci/old_experiment.json is committed but no chapter of this build wrote it "
        "(delete it, or make a chapter write it)"]


# ------------------------------------------------------------------ CLI and benchmarks
def test_cli_results_lists_the_registry(capsys):
    from leukemia_core.cli.main import main

    assert main(["results"]) == 0
    out = capsys.readouterr().out
    assert "ci/baseline_convnext_atto.json: paper pbc_baseline" in out


def test_bench_gan_from_the_cli(tmp_path):
    from leukemia_core.cli.main import main

    torch.set_num_threads(1)
    out = tmp_path / "gan.json"
    assert main(["bench", "gan", "--profile", "smoke", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["gan"]
    assert row["image_size"] == 16 and row["train_images_per_s"] > 0 and row["generator_samples_per_s"] > 0


def test_latency_of_a_tiny_model():
    from leukemia_core.reproducibility.bench import latency

    torch.set_num_threads(1)
    r = latency(torch.nn.Conv2d(3, 4, 3), image_size=16, batch=4, repeats=2, warmup=1, device="cpu")
    assert r["batch"] == 4 and r["ms_per_image"] == pytest.approx(r["batch_ms"] / 4) and r["images_per_s"] > 0
