# ---
# jupyter:
#   book:
#     requires_data: true
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
# # Benchmarks
#
# How fast is the code, on what machine? This page runs the benchmarks of
# `leukemia-core bench` while the book builds, with small batch counts (the `ci` page
# takes under two minutes on 2 cores), so every figure below was measured on the
# machine named beside it, during this build. On a machine shared with other work the
# numbers drop; for careful measurements run `leukemia-core bench all --out
# results/bench/<machine>.json` alone on the machine, and commit the file: the last
# section lists every committed measurement, GPUs included.
#
# 1. **Data loading**: images per second of the PBC training pipeline, against a raw
#    image decode and against what training consumes.
# 2. **Engine overhead**: the book's `fit()` against a bare timm training loop on the same
#    model and tensors, as a ratio.
# 3. **Inference latency** of each chapter's main model, per image, at batch 1 and 64.
# 4. **Training time against image size**: 64, 128 and 224 px.
# 5. **The book build**: wall time and peak memory of every chapter.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: benchmark sizes and the chapters' image size
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
artifacts = "_build/artifacts"  # this page's measurements: <artifacts>/<profile>/benchmarks.json

# %%
import json
import logging
import os
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import Markdown, display

from leukemia_core.reproducibility import bench
from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.plots import use_offline_plotly
from leukemia_core.reproducibility.registry import describe_machine
from leukemia_core.reproducibility.results import hardware

use_offline_plotly()
logging.getLogger("timm").setLevel(logging.ERROR)  # short benchmark runs make timm's scheduler warn
T0 = time.perf_counter()
torch.manual_seed(seed)
SIZES = bench.BOOK_SIZES[profile]
HW = hardware()
MACHINE = describe_machine(HW)
result = {"schema": "leukemia-core/bench/v1", "profile": profile, "machine": HW,
          "torch_threads": torch.get_num_threads()}
display(Markdown(f"Measured on **{MACHINE}** ({HW['platform']}, Python {HW['python']}, "
                 f"torch {HW['torch']}), during this build of the book under `{profile}`."))


def titled(fig, title):
    """Every figure names the machine it was measured on."""
    fig.update_layout(title=dict(text=f"{title}<br><sup>{MACHINE}</sup>"), margin=dict(t=80, b=40))
    return fig


# %% [markdown]
# ## Data loading
#
# Training-split PBC images per second through the book's pipeline (decode, resize,
# augment, normalise), with the data loader in the main process (0 workers) and with
# worker processes, against decoding the same JPEG files with PIL alone. The last bar is
# what training the default model consumes (its bare training step at 64 px): the
# loader keeps the model busy when its bar is higher.

# %%
loader = bench.bench_loader(data_root, **SIZES["loader"])
result["loader"] = loader
rates = {"raw PIL decode": loader["raw_pil_decode_images_per_s"],
         **{k.replace("_", ", ").replace("workers", " workers"): v for k, v in loader["pipeline"].items()},
         "training consumes (64 px)": loader["train_consumes_images_per_s_64px"]}
fig = go.Figure(go.Bar(x=list(rates), y=list(rates.values()),
                       marker_color=["#9e9e9e"] + ["#1f77b4"] * len(loader["pipeline"]) + ["#d62728"],
                       hovertemplate="%{x}: %{y:.0f} images/s<extra></extra>"))
fig.update_layout(yaxis_title="images / s", height=380)
titled(fig, "PBC loader throughput").show()
display(Markdown(
    f"The pipeline with workers {'outpaces' if loader['loader_faster_than_training_64px_2workers'] else 'does not outpace'} "
    "training at 64 px." if "64px_2workers" in loader["pipeline"] else
    "(This profile measures the main-process loader only.)"))

# %% [markdown]
# ## `fit()` against a bare timm loop
#
# The same ConvNeXt-Atto, batch and ready-made tensors, trained by the book's engine
# (scheduler, metrics, early-stopping bookkeeping, NHWC) and by a plain loop of forward,
# loss, backward and optimiser step. A ratio near 1 means the engine costs nothing. Over
# the few steps of this page, `fit()`'s fixed cost per call (optimiser and scheduler
# set-up, the epoch's bookkeeping) weighs more than in a real run; `leukemia-core bench
# train` times 30 steps, twice.

# %%
train = bench.bench_train(**SIZES["train"])
result["train"] = train
display(pd.DataFrame([{"model": train["model"], "image size": train["image_size"], "batch": train["batch"],
                       "steps": train["steps"], "bare loop (images/s)": f"{train['bare_images_per_s']:.0f}",
                       "fit() (images/s)": f"{train['fit_images_per_s']:.0f}",
                       "fit / bare": f"{train['ratio_fit_over_bare']:.2f}"}]).style.hide(axis="index"))
display(Markdown(f"`fit()` runs at **{train['ratio_fit_over_bare']:.2f}×** the speed of the bare loop "
                 f"on {MACHINE}."))

# %% [markdown]
# ## Inference latency per chapter
#
# One forward pass of each chapter's main model at the chapter's image size under this
# profile (random weights: the time does not depend on them), in evaluation mode, NHWC;
# the median of several passes after a warm-up. Batch 1 is the latency a user clicking on
# one cell sees; batch 64 divided by 64 is the cost per image when a whole smear is
# classified at once. The vision-language model's text side is computed once per prompt,
# so only its image path counts.

# %%
lat = pd.DataFrame(bench.bench_latency(profile, **SIZES["latency"]))
result["latency"] = lat.to_dict(orient="records")
lat["label"] = lat["chapter"] + ": " + lat["model"]
fig = go.Figure()
for b, part in lat.groupby("batch"):
    fig.add_bar(x=part["label"], y=part["ms_per_image"], name=f"batch {b}",
                hovertemplate="%{x}<br>%{y:.2f} ms per image<extra></extra>")
fig.update_layout(barmode="group", yaxis_title="ms per image", height=420)
titled(fig, f"Inference latency at {lat['image_size'].iloc[0]} px ({lat['device'].iloc[0]})").show()
display(lat.pivot_table(index=["chapter", "model", "params_M"], columns="batch", values="ms_per_image")
        .rename(columns=lambda b: f"ms/image, batch {b}").round(2))

# %% [markdown]
# ## Training time against image size
#
# `fit()` on the same model and batch at 64, 128 and 224 px: seconds per 1,000 training
# images. This is why the `ci` book trains at 64 px and `full` (224 px) wants a GPU.

# %%
scaling = pd.DataFrame(bench.bench_scaling(**SIZES["scaling"]))
result["scaling"] = scaling.to_dict(orient="records")
fig = go.Figure(go.Scatter(x=scaling["image_size"], y=scaling["s_per_1000_images"], mode="lines+markers",
                           hovertemplate="%{x} px: %{y:.1f} s per 1,000 images<extra></extra>"))
fig.update_layout(xaxis_title="image size (px)", yaxis_title="s per 1,000 training images", height=380)
titled(fig, f"{scaling['model'].iloc[0]} training time vs image size (batch {scaling['batch'].iloc[0]})").show()
display(scaling[["image_size", "images_per_s", "s_per_1000_images", "relative_to_smallest"]]
        .round(2).style.hide(axis="index"))
lo, hi = scaling.iloc[0], scaling.iloc[-1]
display(Markdown(f"From {lo['image_size']} to {hi['image_size']} px the pixels per image grow "
                 f"{(hi['image_size'] / lo['image_size']) ** 2:.1f}× and the training time "
                 f"{hi['s_per_1000_images'] / lo['s_per_1000_images']:.1f}×."))

# %% [markdown]
# ## The book build
#
# Wall time and peak memory (PSS of the kernel and the processes it starts) of every
# chapter, measured by `book/build.py`. While the book builds, this page reads the
# current build's measurements of the chapters executed before it
# (`_build/build_progress.json`); run alone, it reads the last complete build's report
# (`_build/build_report.json`). The page says which.

# %%
build_dir = Path(os.environ.get("LEUKEMIA_BOOK_BUILD", REPO_ROOT / "_build"))
progress, report = build_dir / "build_progress.json", build_dir / "build_report.json"
source, chapters, built_profile = None, {}, None
if progress.exists() and os.environ.get("LEUKEMIA_BOOK_BUILD"):
    data = json.loads(progress.read_text())
    source = (f"this build (profile `{data['profile']}`), the {len(data['chapters'])} chapter(s) "
              f"executed before this one")
    chapters, built_profile = data["chapters"], data["profile"]
if not chapters and report.exists():
    data = json.loads(report.read_text())
    source = f"the previous complete build (profile `{data['profile']}`, built {data['built']})"
    chapters, built_profile = data["chapters"], data["profile"]
if chapters:
    budgets = {"ci": {}}
    try:  # the build's budgets, where the build script is at hand
        import importlib.util
        import sys
        spec = importlib.util.spec_from_file_location("book_build", REPO_ROOT / "book" / "build.py")
        book_build = sys.modules["book_build"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(book_build)
        budgets = book_build.BUDGETS
    except Exception as exc:  # noqa: BLE001 - the page still shows the measurements
        print(f"budgets unavailable: {exc}")
    table = pd.DataFrame([{"chapter": name.split("/")[-1], "wall time (s)": c["wall_s"],
                           "budget (s)": budgets.get(built_profile, {}).get(name),
                           "peak memory (MB)": c["peak_rss_mb"], "ok": c["ok"]}
                          for name, c in chapters.items()])
    fig = go.Figure()
    fig.add_bar(x=table["chapter"], y=table["wall time (s)"], name="wall time (s)",
                hovertemplate="%{x}: %{y:.0f} s<extra></extra>")
    if table["budget (s)"].notna().any():
        fig.add_scatter(x=table["chapter"], y=table["budget (s)"], mode="markers", name="budget (s)",
                        marker=dict(symbol="line-ew-open", size=28, color="#d62728"))
    fig.add_scatter(x=table["chapter"], y=table["peak memory (MB)"], name="peak memory (MB)", yaxis="y2",
                    mode="markers", marker=dict(size=10, color="#2ca02c"),
                    hovertemplate="%{x}: %{y:.0f} MB<extra></extra>")
    fig.update_layout(yaxis_title="seconds", yaxis2=dict(title="MB", overlaying="y", side="right"),
                      height=420, legend=dict(orientation="h", y=-0.25))
    titled(fig, f"Book build per chapter, from {source.split(' (')[0]}").show()
    display(Markdown(f"From {source}."))
    display(table.round(1).style.hide(axis="index"))
else:
    display(Markdown("No build measurements yet: `make book` writes them (`_build/build_report.json`)."))

# %% [markdown]
# ## Measured elsewhere
#
# Benchmark files committed under `results/bench/` (from `leukemia-core bench ... --out`),
# each with its machine. GPU figures appear here once a GPU run is committed.

# %%
rows = []
for path in sorted((REPO_ROOT / "results" / "bench").glob("*.json")):
    b = json.loads(path.read_text())
    m = b.get("machine", {})
    row = {"file": path.name, "machine": describe_machine(m), "GPU": m.get("gpu", "none")}
    if "train" in b:
        row["fit / bare"] = round(b["train"]["ratio_fit_over_bare"], 2) if "ratio_fit_over_bare" in b["train"] else None
        row["fit images/s (64 px)"] = round(b["train"].get("fit_images_per_s", float("nan")))
    if "loader" in b:
        row["loader, 64 px, 2 workers (images/s)"] = round(b["loader"]["pipeline"].get("64px_2workers", float("nan")))
    for r in b.get("latency", []):
        row[f"{r['chapter']} {r['model']}, ms/image b{r['batch']}"] = round(r["ms_per_image"], 2)
    for r in b.get("gan", []):  # bench_gan: R3GAN training and sampling rates
        row[f"R3GAN {r['image_size']} px b{r['batch']}: train images/s"] = round(r["train_images_per_s"])
        row[f"R3GAN {r['image_size']} px b{r['batch']}: samples/s"] = round(r["generator_samples_per_s"])
    for r in b.get("classifiers", []):  # bench_classifier_train
        row[f"{r['model']} {r['image_size']} px: train images/s"] = round(r["train_images_per_s"])
    for r in (b.get("predict") or {}).get("runs", []):  # bench_predict: streaming predict's memory
        row[f"predict, {r['n_images']:,} images: peak RSS growth (MB)"] = r["peak_growth_mb"]
    rows.append(row)
if rows:
    display(pd.DataFrame(rows).set_index("file").T)
else:
    display(Markdown("None committed yet."))
if not any(r["GPU"] != "none" for r in rows):
    display(Markdown("No GPU measurement is committed yet: run `leukemia-core bench all --out "
                     "results/bench/<gpu>.json` on a GPU machine and commit the file."))

# %%
out = REPO_ROOT / artifacts / profile / "benchmarks.json"
out.parent.mkdir(parents=True, exist_ok=True)
result["wall_time_s"] = time.perf_counter() - T0
out.write_text(json.dumps(result, indent=2) + "\n")
shown = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
print(f"{shown}; this page's benchmarks took {result['wall_time_s']:.0f} s")
