"""The results registry: every results JSON under ``results/<profile>/``, validated,
attributed to the paper it reproduces, and checked for freshness against git.

A results file is written by :func:`leukemia_core.reproducibility.results.write_results` (chapters and
``leukemia-core train``) and follows the schema ``leukemia-core/results/v1``: the
fields of :data:`REQUIRED` plus anything a chapter adds. A result belongs to a paper
through its ``paper`` field, else through the ``match`` rules of that paper in
``results/claims.yaml`` (e.g. ``chapter: 04_hierarchy`` or ``kind: vision_language``).

``results/claims.yaml`` holds every number that comes from a paper (claims and public
anchors, with their sources) and, per paper, the *headline metrics*: which number of
which results file stands for the reproduction. The reproducibility chapter shows those,
and :func:`freshness` compares them with the committed files (the build fails on drift).
"""
from __future__ import annotations

import fnmatch
import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leukemia_core.data.dataroot import REPO_ROOT
# The results schema lives with the writer (results.py); the registry reads it.
from leukemia_core.reproducibility.results import (OPTIONAL, REQUIRED, SCHEMA, SELECTED_ON, SELECTION_KEYS, ResultsError,  # noqa: F401
                      check, validate, write_results)

CLAIMS_FILE = REPO_ROOT / "results" / "claims.yaml"
RESULTS_DIR = REPO_ROOT / "results"
#: Folders of ``results/`` that hold run results (``bench/`` holds benchmark files).
PROFILE_DIRS = ("smoke", "ci", "reference", "full")
#: Metrics compared for freshness in a file no headline metric of claims.yaml names.
DEFAULT_FRESHNESS_METRICS = ("metrics/test/accuracy", "metrics/test/macro_f1")
REASONS = ("private_data", "no_cml_cll", "no_public_code", "contradictory_code",
           "not_in_mirror", "not_implemented")


def metric(data: dict, path: str):
    """The value at ``path`` ("metrics/test/accuracy": keys joined by '/'; keys may hold
    spaces and dots) or None where any key is missing."""
    node = data
    for key in path.split("/"):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def as_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- claims
BIB_FILE = REPO_ROOT / "book" / "references.bib"


def bibtex_keys(path: str | Path = BIB_FILE) -> set[str]:
    """The entry keys of a BibTeX file (``@type{key,``)."""
    import re
    return set(re.findall(r"^@\w+\{([^,\s]+),", Path(path).read_text(), flags=re.M))


def load_claims(path: str | Path = CLAIMS_FILE) -> dict:
    """``results/claims.yaml``, checked: every paper has a title, its references have
    sources, every headline metric names a file and a metric, every reason is known."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ResultsError(f"cannot read claims file {path}: {exc}") from exc
    problems = []
    bib_keys = bibtex_keys()
    papers = (data or {}).get("papers")
    if not isinstance(papers, dict) or not papers:
        raise ResultsError(f"{path}: no 'papers' mapping")
    for key, paper in papers.items():
        where = f"{path.name}: papers.{key}"
        if not isinstance(paper, dict) or not paper.get("title"):
            problems.append(f"{where} has no title")
            continue
        ids = set()
        for kind in ("claims", "anchors"):
            for ref in paper.get(kind) or []:
                if not ref.get("id") or not ref.get("statement") or not ref.get("source"):
                    problems.append(f"{where}.{kind}: every entry needs id, statement and source ({ref})")
                if ref.get("cite") not in bib_keys:
                    problems.append(f"{where}.{kind}.{ref.get('id')}: cite '{ref.get('cite')}' is no BibTeX "
                                    f"key of {BIB_FILE.name} (add the publication there)")
                if ref.get("value") is not None and as_number(ref["value"]) is None:
                    problems.append(f"{where}.{kind}.{ref.get('id')}: value must be a number or null")
                ids.add(ref.get("id"))
        head = paper.get("headline")
        if paper.get("chapter") and not (isinstance(head, dict) and (head.get("row") or head.get("rule"))):
            problems.append(f"{where}: a paper with a chapter needs a headline (row or rule), fixed "
                            "before any result")
        labels = {row.get("label") for row in paper.get("ours") or []}
        for label in (head or {}).get("judged") or []:
            if label not in labels:
                problems.append(f"{where}.headline.judged: '{label}' is no label of its ours list")
        for row in paper.get("ours") or []:
            if not row.get("label") or not row.get("file") or not row.get("metric"):
                problems.append(f"{where}.ours: every headline needs label, file and metric ({row})")
            if row.get("compare_to") and row["compare_to"] not in ids:
                problems.append(f"{where}.ours '{row.get('label')}': compare_to "
                                f"'{row['compare_to']}' is no claim or anchor id of this paper")
        for item in paper.get("not_reproducible") or []:
            if item.get("why") not in REASONS:
                problems.append(f"{where}.not_reproducible: reason '{item.get('why')}' is not one of {REASONS}")
    tol = (data.get("freshness") or {}).get("tolerance")
    if as_number(tol) is None or tol < 0:
        problems.append(f"{path.name}: freshness.tolerance must be a non-negative number")
    if problems:
        raise ResultsError("; ".join(problems))
    return data


def paper_of(data: dict, claims: dict) -> str | None:
    """The paper a result belongs to: its ``paper`` field, else the first paper whose
    ``match`` rules (all fields equal) fit it."""
    if data.get("paper"):
        return data["paper"]
    for key, paper in claims["papers"].items():
        for rule in paper.get("match") or []:
            if rule and all(data.get(k) == v for k, v in rule.items()):
                return key
    return None


# --------------------------------------------------------------------------- registry
@dataclass
class Result:
    path: Path
    data: dict
    paper: str | None = None

    @property
    def profile(self) -> str:
        return self.data["profile"]

    @property
    def name(self) -> str:
        return self.path.name

    def metric(self, path: str):
        return metric(self.data, path)

    def machine(self) -> str:
        """One line naming the hardware the result was produced on."""
        return describe_machine(self.data.get("hardware") or {})


def describe_machine(hw: dict) -> str:
    if not hw:
        return "unknown machine"
    if hw.get("gpu"):
        n = hw.get("gpu_count", 1)
        text = f"{n}x {hw['gpu']}" if n and n > 1 else hw["gpu"]
    else:
        text = f"{hw.get('cpu', 'CPU')}, {hw.get('cpu_count', '?')} cores, " \
               f"{hw.get('torch_threads', '?')} torch threads"
    if hw.get("world_size", 1) > 1:
        text += f", {hw['world_size']} processes (DDP)"
    return text


@dataclass
class Registry:
    root: Path
    results: list[Result] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # invalid files, one line each

    def select(self, profile: str | None = None, paper: str | None = None,
               pattern: str | None = None) -> list[Result]:
        return [r for r in self.results
                if (profile is None or r.path.parent.name == profile)
                and (paper is None or r.paper == paper)
                and (pattern is None or fnmatch.fnmatch(r.name, pattern))]

    def find(self, profile: str, pattern: str | list[str]) -> Result | None:
        """The first result (by name) of ``results/<profile>/`` matching the glob; with a
        list of globs, the first glob that matches anything wins."""
        for glob in [pattern] if isinstance(pattern, str) else pattern:
            found = sorted(self.select(profile, pattern=glob), key=lambda r: r.name)
            if found:
                return found[0]
        return None


def load_result(path: str | Path, claims: dict | None = None) -> Result:
    """One results file, validated (:class:`ResultsError` if it is not valid)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read results JSON: {exc}") from exc
    check(data, str(path))
    return Result(path, data, paper_of(data, claims) if claims else data.get("paper"))


def load_registry(results_dir: str | Path = RESULTS_DIR, profiles=PROFILE_DIRS,
                  claims: dict | None = None) -> Registry:
    """Every ``<results_dir>/<profile>/*.json``; invalid files go to ``problems``, and a
    file whose ``profile`` field differs from its folder is a problem too."""
    reg = Registry(Path(results_dir))
    known = set(claims["papers"]) if claims else None
    for profile in profiles:
        for path in sorted((reg.root / profile).glob("*.json")):
            try:
                res = load_result(path, claims)
            except ResultsError as exc:
                reg.problems.append(str(exc))
                continue
            if res.profile != profile:
                reg.problems.append(f"{path}: profile '{res.profile}' but filed under {profile}/")
            if known is not None and res.data.get("paper") and res.data["paper"] not in known:
                reg.problems.append(f"{path}: paper '{res.data['paper']}' is not in claims.yaml")
            reg.results.append(res)
    return reg


# --------------------------------------------------------------------------- chapters' helpers
def combine_seed_results(paths, dest: str | Path, overwrite: bool = True, **extra) -> Path:
    """One results file for a model trained with several seeds, from the per-seed files
    of :func:`leukemia_core.pipeline.train_classifier`.

    One seed: that file, with ``extra`` fields (e.g. ``chapter``, ``paper``) added. Several:
    ``metrics.test`` holds the mean of each scalar test metric, ``metrics.test_std`` their
    standard deviation and ``metrics.per_seed`` every seed's metrics."""

    paths = [Path(p) for p in paths]
    runs = [json.loads(p.read_text()) for p in paths]
    if not runs:
        raise ResultsError("combine_seed_results needs at least one results file")
    first = runs[0]
    fields = {k: v for k, v in first.items() if k not in ("schema", "git_sha", "hardware", "created")}
    fields["seeds"] = [s for r in runs for s in r["seeds"]]
    fields["wall_time_s"] = float(sum(r["wall_time_s"] for r in runs))
    if len(runs) > 1:
        tests = [r["metrics"]["test"] for r in runs]
        scalar = [k for k, v in tests[0].items() if as_number(v) is not None]
        fields["metrics"] = {
            "test": {k: statistics.fmean(t[k] for t in tests) for k in scalar},
            "test_std": {k: statistics.stdev(t[k] for t in tests) for k in scalar},
            "per_seed": [r["metrics"] for r in runs]}
        fields["history"] = [r.get("history") for r in runs]
    fields["source_results"] = [str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)
                                for p in (q.resolve() for q in paths)]
    return write_results(dest, overwrite=overwrite, **{**fields, **extra})


# --------------------------------------------------------------------------- freshness
def committed_text(path: Path, root: Path = REPO_ROOT) -> str | None:
    """The file's content at git ``HEAD`` (None: untracked, or not a git checkout)."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve())
        out = subprocess.run(["git", "show", f"HEAD:{rel.as_posix()}"], cwd=root,
                             capture_output=True, text=True)
    except (OSError, ValueError):
        return None
    return out.stdout if out.returncode == 0 else None


def headline_specs(claims: dict, filename: str) -> list[dict]:
    """The headline metrics of claims.yaml whose ``file`` glob matches ``filename``, each
    with its tolerance; the default metrics where none does."""
    tol = float(claims["freshness"]["tolerance"])
    specs = [{"label": row["label"], "metric": row["metric"],
              "tolerance": float(row.get("tolerance", tol))}
             for paper in claims["papers"].values() for row in paper.get("ours") or []
             if any(fnmatch.fnmatch(filename, g) for g in _globs(row["file"]))]
    return specs or [{"label": m.split("/")[-1], "metric": m, "tolerance": tol}
                     for m in DEFAULT_FRESHNESS_METRICS]


def _globs(pattern: str | list[str]) -> list[str]:
    return [pattern] if isinstance(pattern, str) else list(pattern)


@dataclass
class FreshRow:
    file: str  # results/<profile>/<name>
    label: str
    metric: str
    committed: float | None
    fresh: float | None
    tolerance: float
    status: str  # ok | DRIFT | new | unreadable

    @property
    def delta(self) -> float | None:
        if self.committed is None or self.fresh is None:
            return None
        return self.fresh - self.committed


@dataclass
class Freshness:
    profile: str
    tolerance: float
    rows: list[FreshRow] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # files with no committed version
    skipped: list[str] = field(default_factory=list)  # not rewritten since `since`

    @property
    def drift(self) -> list[FreshRow]:
        return [r for r in self.rows if r.status in ("DRIFT", "unreadable")]

    def problems(self) -> list[str]:
        """One line per drifted metric: what the build reports when it fails."""
        return [f"{r.file}: {r.label} ({r.metric}) is {_fmt(r.fresh)} in this build, "
                f"{_fmt(r.committed)} committed"
                + (f" (difference {r.delta:+.4f}, tolerance ±{r.tolerance})" if r.delta is not None else "")
                + ("" if r.status == "DRIFT" else f": {r.status}")
                for r in self.drift]


def _fmt(v) -> str:
    return "missing" if v is None else ("NaN" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}")


def _same(a: float | None, b: float | None, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol + 1e-12


def freshness(profile: str = "ci", root: str | Path = REPO_ROOT, since: float | None = None,
              claims: dict | None = None, baseline=None) -> Freshness:
    """Compare each ``results/<profile>/*.json`` of the working tree with its committed
    version (``git show HEAD:...``) on the headline metrics of claims.yaml.

    ``since`` (a ``time.time()``): only files modified since then, i.e. those a build
    just rewrote; the others are listed in ``skipped``. ``baseline(path) -> text|None``
    replaces git as the source of the committed version (tests, non-git trees). A file
    with no committed version is listed as new, not as drift."""
    root = Path(root)
    claims = claims or load_claims(root / "results" / "claims.yaml")
    baseline = baseline or (lambda p: committed_text(p, root))
    tol = claims["freshness"].get("reference_tolerance") if profile == "reference" else None
    report = Freshness(profile, float(tol if tol is not None else claims["freshness"]["tolerance"]))
    for path in sorted((root / "results" / profile).glob("*.json")):
        rel = path.relative_to(root).as_posix()
        if since is not None and path.stat().st_mtime < since:
            report.skipped.append(rel)
            continue
        old_text = baseline(path)
        if old_text is None:
            report.new.append(rel)
            continue
        try:
            new, old = json.loads(path.read_text()), json.loads(old_text)
        except ValueError as exc:
            report.rows.append(FreshRow(rel, f"results JSON ({exc})", "-", None, None,
                                        report.tolerance, "unreadable"))
            continue
        for spec in headline_specs(claims, path.name):
            if tol is not None:  # fixed weights: the tight tolerance, whatever the paper's rows say
                spec = {**spec, "tolerance": float(tol)}
            a, b = as_number(metric(old, spec["metric"])), as_number(metric(new, spec["metric"]))
            if a is None and b is None:
                continue  # this metric is not part of this file
            status = "ok" if _same(a, b, spec["tolerance"]) else "DRIFT"
            report.rows.append(FreshRow(rel, spec["label"], spec["metric"], a, b, spec["tolerance"], status))
    return report


# --------------------------------------------------------------------------- the report's tables
def references(paper: dict) -> dict[str, dict]:
    """A paper's claims and anchors by id, each tagged with ``kind`` (claim | anchor)."""
    return {r["id"]: {**r, "kind": kind[:-1]} for kind in ("claims", "anchors")
            for r in paper.get(kind) or []}


def paper_status(claims: dict, reg: Registry, key: str, profile: str) -> str:
    """``run`` (results under ``profile``), ``no chapter yet`` or ``not yet run``."""
    if reg.select(profile, paper=key):
        return "run"
    return "no chapter yet" if not claims["papers"][key].get("chapter") else "not yet run"


def headline_rows(claims: dict, reg: Registry, key: str, profiles=("ci", "full")) -> list[dict]:
    """One row per headline metric of paper ``key``: its reference (claim or anchor) and
    our value under each profile, read from the results file the row names (None where
    that profile has no such file, or the file lacks the metric)."""
    paper = claims["papers"][key]
    refs = references(paper)
    rows = []
    for spec in paper.get("ours") or []:
        ref = refs.get(spec.get("compare_to")) or {}
        row = {"metric": spec["label"], "file": spec["file"], "path": spec["metric"],
               "reference": ref.get("statement"), "reference_kind": ref.get("kind"),
               "reference_value": as_number(ref.get("value")),
               "reference_approximate": bool(ref.get("approximate")), "results": {}}
        for profile in profiles:
            res = reg.find(profile, spec["file"])
            row[profile] = as_number(res.metric(spec["metric"])) if res else None
            row["results"][profile] = res
        rows.append(row)
    return rows


def verdicts_on_test_selection(claims: dict, reg: Registry, profiles=PROFILE_DIRS) -> list[str]:
    """Headline metrics compared with a paper's claim or an anchor (a verdict) whose
    results file says its row was selected on test: one line each (must be empty)."""
    out = []
    for key, paper in claims["papers"].items():
        for spec in paper.get("ours") or []:
            for profile in profiles:
                res = reg.find(profile, spec["file"])
                if res is not None and spec.get("compare_to") and res.data.get("selected_on") == "test":
                    out.append(f"{key}: '{spec['label']}' compares {res.path.name} (selected_on: test) "
                               f"with {spec['compare_to']}")
    return out


def not_reproducible(claims: dict) -> list[dict]:
    """Everything claims.yaml lists as not reproducible, with the reason in words."""
    words = claims.get("reasons") or {}
    return [{"paper": key, "short": paper.get("short", key), "what": item["what"], "why": item["why"],
             "reason": words.get(item["why"], item["why"]), "detail": item.get("detail", "")}
            for key, paper in claims["papers"].items() for item in paper.get("not_reproducible") or []]
