# ---
# jupyter:
#   book:
#     requires_data: false
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reproducibility report
#
# The book's claim is checkable here at a glance: for every method, what its paper
# claimed, what we measured under which profile, on which data and hardware, and why
# the two differ. **No number on this page is typed by hand.** The papers' numbers and
# the public anchors come from one data file, `results/claims.yaml`, each with its
# source; ours come from the results registry, the JSON files under `results/<profile>/`
# that the chapters and `leukemia-core train` write (metrics, profile, seeds, config,
# data and split hashes, git commit, hardware, wall time), validated by
# `leukemia_core.reproducibility.registry` when they are written and again here.
#
# - `results/ci/` is written by the `ci` book build (2 CPU cores) and committed. The
#   build fails if it disagrees with the committed files beyond a stated tolerance
#   (freshness, below), so the committed numbers cannot silently drift from the code.
# - `results/full/` holds paper-scale runs on GPUs, committed with the hardware named;
#   a paper without one says so.
#
# The papers: the PBC baseline against MedMNIST {cite:p}`yang2023medmnist,doerrich2024medmnistplus`,
# text-guided vision-language classification {cite:p}`vlm_leukemia_2026`, CLAHE + R3GAN +
# ConvNeXtV2-Swin {cite:p}`convnextv2_swin_r3gan_2025`, hierarchical classification
# {cite:p}`hamdi2025hierarchy`, sparse-annotation detection {cite:p}`rehman2025lld` and
# imbalanced domain generalisation {cite:p}`umer2023imbalanced`.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: the profile this book was built with
data_root = None  # unused: this chapter reads results files only
seed = 0
results_dir = "results"  # the registry: <results_dir>/<profile>/*.json and claims.yaml

# %%
import math

import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.plots import use_offline_plotly
from leukemia_core.reproducibility.registry import (freshness, headline_rows, load_claims, load_registry,
                                    not_reproducible, paper_status)

use_offline_plotly()
root = REPO_ROOT / results_dir
claims = load_claims(root / "claims.yaml")
registry = load_registry(root, claims=claims)
# the committed profiles, plus the one this book was just built with
PROFILES = ["ci", "reference", "full"] + ([profile] if profile not in ("ci", "reference", "full") else [])
if registry.problems:
    raise ValueError("invalid results files:\n" + "\n".join(registry.problems))
papers = claims["papers"]
counts = {p: len(registry.select(p)) for p in PROFILES}
display(Markdown(
    f"The registry holds **{len(registry.results)}** valid results files: "
    + ", ".join(f"{n} under `{p}`" for p, n in counts.items())
    + f". `results/claims.yaml` describes **{len(papers)}** papers."))


def pct(v, approximate=False):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return ("≈" if approximate else "") + (f"{100 * v:.2f}%" if v >= 0.995 else f"{100 * v:.1f}%")


def short_sha(text, n=10):
    return (text or "?")[:n]


def split_hashes(text):
    """``aria:be0d…;pbc:e404…`` (one split file per dataset) shortened for a table."""
    parts = [p.split(":") for p in text.split(";")]
    return "; ".join(f"{p[0]}:{p[1][:6]}" if len(p) == 2 else p[0][:12] for p in parts)


# %% [markdown]
# ## At a glance
#
# Each paper's first headline number with a published reference: the paper's claim (or
# the public anchor, for the baseline) beside our `ci` results (trained live by this
# build), our reference checkpoints (trained to convergence once, committed, evaluated
# live by this build; `results/reference/`) and `full` results. A paper with
# no bar of ours has not been run at that profile; hover a bar for the metric and file.

# %%
fig = go.Figure()
series = {"claim": ([], [], []), **{p: ([], [], []) for p in PROFILES}}
for key, paper in papers.items():
    rows = headline_rows(claims, registry, key, PROFILES)
    row = next((r for r in rows if r["reference_value"] is not None), None)
    label = paper.get("short", key)
    if row is None:  # no headline of ours: show the paper's own number, if it has one
        ref = next((c for c in paper.get("claims") or [] if c.get("value") is not None), None)
        if ref:
            series["claim"][0].append(label)
            series["claim"][1].append(ref["value"])
            series["claim"][2].append(f"{ref['statement']}<br>{ref['source']}<br>not yet run here")
        continue
    series["claim"][0].append(label)
    series["claim"][1].append(row["reference_value"])
    series["claim"][2].append(f"{row['reference']}")
    for p in PROFILES:
        if row[p] is not None:
            res = row["results"][p]
            series[p][0].append(label)
            series[p][1].append(row[p])
            series[p][2].append(f"{row['metric']}<br>{res.path.parent.name}/{res.name}<br>{res.machine()}")
colours = {"claim": "#9e9e9e", "ci": "#1f77b4", "reference": "#9467bd", "full": "#2ca02c", profile: "#ff7f0e"}
names = {"claim": "paper's claim / public anchor", "ci": "ours, ci (CPU, trained live)",
         "reference": "ours, reference checkpoint (trained to convergence once, evaluated live)",
         "full": "ours, full (GPU)"}
for name, (x, y, text) in series.items():
    fig.add_bar(x=x, y=y, name=names.get(name, f"ours, {name} (this build)"), marker_color=colours[name],
                hovertext=text, hovertemplate="%{x}: %{y:.1%}<br>%{hovertext}<extra></extra>")
fig.update_layout(barmode="group", yaxis_tickformat=".0%", yaxis_range=[0, 1.05], height=420,
                  title="Claimed vs measured, first headline metric per paper",
                  margin=dict(t=60, b=40), legend=dict(orientation="h", y=-0.15))
fig.show()

# %% [markdown]
# ## Paper by paper
#
# For each paper: its claims and the public anchors, our headline numbers under each
# profile, how the data and protocol differ, and which run produced each number
# (machine, commit, wall time, data and split hashes). Δ is our `ci` number minus the
# reference; with different data and protocols it measures the distance, not a failure.

# %%
def selected_on(row):
    """How the row behind a headline metric was chosen (its results file's ``selected_on``)."""
    how = {res.data.get("selected_on") for res in row["results"].values() if res is not None} - {None}
    return ("**test** (shown, never a verdict)" if "test" in how else
            ", ".join(sorted(how)) if how else "fixed row")


status_words = {"run": "results below", "no chapter yet": "**no chapter yet**: not yet run",
                "not yet run": "chapter written, **not yet run** under this profile"}
for key, paper in papers.items():
    chapter = paper.get("chapter")
    status = {p: paper_status(claims, registry, key, p) for p in PROFILES}
    display(Markdown(
        f"**{paper['title']}** (`{key}`)" + (f", chapter `{chapter}`" if chapter else "") + ". "
        + "; ".join(f"`{p}`: {status_words[s]}" for p, s in status.items()) + "."))
    head = paper.get("headline") or {}
    if head:
        display(Markdown("*Headline, fixed before any result:* "
                         + (f"the row **{head['row']}**" if head.get("row") else f"the rule: {head['rule'].strip()}")
                         + (f" ({head['why']})" if head.get("why") else "") + "."))
    refs = [{"": kind[:-1], "statement": r["statement"],
             "value": pct(r.get("value"), r.get("approximate")) if r.get("value") is not None else "qualitative",
             "metric": r.get("metric", ""), "source": r["source"]}
            for kind in ("claims", "anchors") for r in paper.get(kind) or []]
    if refs:
        display(pd.DataFrame(refs).style.hide(axis="index"))
    rows = headline_rows(claims, registry, key, PROFILES)
    if rows:
        table = pd.DataFrame([{
            "our metric": r["metric"],
            "paper / anchor": (f"{pct(r['reference_value'], r['reference_approximate'])} ({r['reference_kind']})"
                          if r["reference_value"] is not None else (r["reference"] or "–")),
            **{f"ours, {p}": pct(r[p]) for p in PROFILES},
            "Δ ci − paper/anchor": (f"{100 * (r['ci'] - r['reference_value']):+.1f} pts"
                                 if r["ci"] is not None and r["reference_value"] is not None else "–"),
            "row selected on": selected_on(r),
        } for r in rows])
        display(table.style.hide(axis="index"))
        used = {res.path: res for r in rows for res in r["results"].values() if res is not None}
        if used:
            display(pd.DataFrame([{
                "file": f"{res.path.parent.name}/{res.name}", "machine": res.machine(),
                "git commit": short_sha(res.data["git_sha"]), "seeds": res.data["seeds"],
                "wall time (min)": f"{res.data['wall_time_s'] / 60:.1f}",
                "data sha256": short_sha(res.data["data_sha256"], 12),
                "split sha256": split_hashes(res.data["split_sha256"]),
                "created": res.data["created"][:16],
            } for res in used.values()]).style.hide(axis="index"))
    else:
        display(Markdown("No headline metric of ours yet: the paper's claims stand unanswered."))
    display(Markdown(f"*Data.* {paper.get('data', '–')}\n\n*Protocol.* {paper.get('protocol', '–')}"))

# %% [markdown]
# ## What could not be reproduced, and why
#
# Gaps are part of the result. Each item names what is missing and the reason, from
# `results/claims.yaml`.

# %%
gaps = pd.DataFrame(not_reproducible(claims))
display(gaps[["short", "what", "reason", "detail"]].rename(columns={"short": "paper"})
        .style.hide(axis="index"))
by_reason = gaps.groupby("reason")["short"].agg(lambda s: ", ".join(dict.fromkeys(s)))
display(Markdown("\n".join(f"- **{reason}**: {who}" for reason, who in by_reason.items())))

# %% [markdown]
# ## Freshness
#
# The committed `ci` results must be what the code produces. After executing every
# chapter, `make book` compares each `results/<profile>/*.json` it rewrote with its
# committed version (`git show HEAD:`) on the headline metrics above and **fails** if
# one moved by more than the tolerance; a file with no committed version is listed as
# new. This table is the same comparison, made when this page ran (the build repeats
# it once every chapter has run).

# %%
fresh = freshness(profile, root=REPO_ROOT, claims=claims)
display(Markdown(f"Tolerance: **±{fresh.tolerance}** (absolute). Why: "
                 f"{claims['freshness'].get('why', '')}"))
if fresh.rows:
    display(pd.DataFrame([{"file": r.file, "metric": r.label, "committed": pct(r.committed),
                           "this build": pct(r.fresh),
                           "difference": f"{100 * r.delta:+.2f} pts" if r.delta is not None else "–",
                           "status": r.status} for r in fresh.rows]).style.hide(axis="index"))
display(Markdown(
    (f"New under `{profile}` (no committed version yet): " + ", ".join(f"`{f}`" for f in fresh.new) + ". "
     if fresh.new else "")
    + (f"**{len(fresh.drift)} drift(s)**: the build fails on them." if fresh.drift
       else "No drift beyond the tolerance.")))

# %% [markdown]
# ## The registry
#
# Every results file, the paper it is filed under, and where it was produced.

# %%
display(pd.DataFrame([{
    "file": f"{r.path.parent.name}/{r.name}", "paper": r.paper or "–",
    "chapter / kind": r.data.get("chapter") or r.data.get("kind"),
    "model": str(r.data.get("model", "–"))[:40], "seeds": r.data["seeds"], "machine": r.machine(),
    "wall time (min)": f"{r.data['wall_time_s'] / 60:.1f}", "git commit": short_sha(r.data["git_sha"]),
} for r in registry.results]).style.hide(axis="index"))
