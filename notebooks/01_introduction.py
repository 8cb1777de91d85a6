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
# # Introduction
#
# This book reproduces recent work on classifying white blood cells (WBCs) and leukemia
# from microscope images, on public data, with code you can run. Every chapter is a
# notebook executed from top to bottom when the book is built, so every number and
# figure on these pages comes from the code beside it, run on the data described in
# {doc}`02_data`.
#
# The code lives in a small library, `leukemia_core` (data loaders, models, training and
# evaluation); the notebooks call it and explain what they do. Nothing in the library
# depends on the notebooks.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: the sizes this chapter runs at
data_root = None  # None: the LEUKEMIA_DATA environment variable, else data/ in the repository
seed = 0

# %% [markdown]
# Figures in this book are interactive [plotly](https://plotly.com/python/) graphs.
# `use_offline_plotly()` embeds plotly.js once per notebook instead of fetching it from a
# CDN, so figures work offline, in Jupyter and on these pages alike.

# %%
import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

from leukemia_core.config import CHAPTER_SIZES, PROFILES, get_profile
from leukemia_core.data import CLASSIFICATION, LOADERS
from leukemia_core.data.dataroot import resolve_data_root
from leukemia_core.plots import use_offline_plotly
from leukemia_core.data.taxonomy import Taxonomy

use_offline_plotly()
P = get_profile(profile)

# %% [markdown]
# ## The five methods
#
# | # | method | paper | what it needs from the data |
# |---|---|---|---|
# | 1 | text-guided vision-language classification: each class is described by a sentence and images are matched to descriptions | {cite:t}`vlm_leukemia_2026` | leukemia classes with images |
# | 2 | a hybrid ConvNeXtV2–Swin Transformer classifier, R3GAN {cite:p}`huang2024r3gan` images to balance rare classes, CLAHE contrast preprocessing | {cite:t}`convnextv2_swin_r3gan_2025` | an imbalanced WBC dataset |
# | 3 | hierarchical classification that follows a clinical taxonomy of the cells, one decision per level (the book's tree is shown below) | {cite:t}`hamdi2025hierarchy` | labels at several levels of the taxonomy |
# | 4 | WBC detection with morphological attributes learnt from sparse annotations, on the Large Leukemia Dataset (LLD) | {cite:t}`rehman2025lld` | boxes and per-cell attributes |
# | 5 | imbalanced domain generalisation: a classifier that holds up on cells from unseen hospitals and scanners | {cite:t}`umer2023imbalanced` | the same classes from several sources |
#
# Before any of them, {doc}`03_baseline` trains a strong, plain classifier. Published
# numbers on MedMNIST v2 {cite:p}`yang2023medmnist` and MedMNIST+
# {cite:p}`doerrich2024medmnistplus`, whose BloodMNIST is derived from the PBC dataset
# used here, anchor what "strong" means.

# %% [markdown]
# ## What public data exists, and what does not
#
# The papers above were trained on collections that are partly private or not mirrored
# here. This book uses only public data, read through one loader per dataset:

# %%
datasets = pd.DataFrame({"dataset": list(LOADERS),
                         "labelled per image": [n in CLASSIFICATION for n in LOADERS]})
display(datasets.set_index("dataset"))
display(Markdown(
    f"That is **{len(LOADERS)}** datasets, **{len(CLASSIFICATION)}** of them labelled per "
    "image. The next chapter counts their images and classes and shows what they look like."))

# %% [markdown]
# The honest statement about them, which every chapter keeps to:
#
# - **There are no public CML or CLL images in this book's data.** The leukemia classes
#   that exist are AML myeloblasts {cite:p}`matek2019aml,matek2019tcia` and the stages of
#   B-ALL {cite:p}`aria2021all,ghaderzadeh2022ball`. Methods 1 and 3 name AML, ALL, CML and
#   CLL; here they keep the taxonomy general and train and test only on classes that have
#   images.
# - **Each leukemia class comes from a different hospital than the normal cells**
#   {cite:p}`acevedo2020pbc`, so a classifier can learn the hospital (stain, scanner,
#   framing) instead of the disease. The honest contrasts are within one source: Matek
#   myeloblasts against Matek neutrophils, Aria benign against malignant stages.
# - **The Aria images are whole low-magnification smear fields**, not single-cell crops like
#   the others; framing and scale alone separate them.
# - **The Large Leukemia Dataset of method 4 is not in the mirror.** Its two ingredients have
#   public stand-ins: cell boxes (BCCD {cite:p}`bccd`, TXL-PBC {cite:p}`gan2024txlpbc`) and
#   per-cell morphological attributes (WBCAtt {cite:p}`tsutsui2023wbcatt`).
# - **Some images are copies of others**: TXL-PBC re-uses PBC and BCCD files, and PBC has a
#   few exact duplicates. {doc}`02_data` finds them; splits keep copies on one side.
#
# The taxonomy the hierarchical and vision-language chapters work with is data, read from
# `leukemia_core/data/taxonomies/leukemia.yaml`; the figure and the list below are drawn from
# it, with the image sources of each leaf (`dataset:label`; each leaf has the same size:
# this is not a count). The baseline and domain-generalisation chapters classify the
# datasets' own classes instead.

# %%
tax = Taxonomy.from_yaml("leukemia")
names = [n for n in tax.nodes if n != tax.root]
hover = ["sources: " + (", ".join(tax[n].sources) if tax[n].sources else
                        ("none: " + tax[n].note if tax[n].note else "none") if not tax[n].children else
                        f"{sum(n in tax.path(leaf) for leaf in tax.data_leaves)} leaves with images below")
         for n in names]
fig = go.Figure(go.Sunburst(
    ids=names, labels=names, parents=["" if tax[n].parent == tax.root else tax[n].parent for n in names],
    values=[1 if not tax[n].children else 0 for n in names], branchvalues="remainder",
    marker=dict(colors=["#2a9d8f" if tax.has_data(n) else "#c0c0c0" for n in names]),
    hovertext=hover, hoverinfo="label+text"))
fig.update_layout(title="The book's taxonomy: green nodes have public images here, grey ones none",
                  margin=dict(t=50, l=0, r=0, b=0))
fig.show()

by_depth = {d: [n for n in names if tax[n].depth == d] for d in range(1, tax.depth + 1)}
missing = [n for n in tax.leaves if not tax.has_data(n)]
display(Markdown(
    f"The tree `{tax.name}` has {tax.depth} levels below its root `{tax.root}`:\n\n"
    + "\n".join(f"- level {d}: " + ("; ".join(
        f"{parent} → {', '.join(n for n in nodes if tax[n].parent == parent)}"
        for parent in dict.fromkeys(tax[n].parent for n in nodes)) if d > 1 else ", ".join(nodes))
        for d, nodes in by_depth.items())
    + f"\n\n{len(tax.leaves)} leaves, {len(tax.data_leaves)} of them with images. "
    f"Leaves without images: **{', '.join(missing)}**."))

# %% [markdown]
# ## How to read and run this book
#
# Read it in order: the data chapter explains every source and its traps, the baseline
# sets the bar, later chapters reproduce one method each against it. Each chapter opens
# with a box giving the command that runs it, and its source can be downloaded from the
# top of the page.
#
# From a clean clone, `make book` creates the virtual environment, executes every chapter
# and builds the HTML into `_build/html/` (open `_build/html/index.html`); `make test`
# runs the tests. The data root is the folder holding the datasets: the `data_root`
# parameter, else the `LEUKEMIA_DATA` environment variable, else `data/` in the
# repository. In this run it resolves to:

# %%
root, source = resolve_data_root(data_root)
display(Markdown(f"`{root}` (chosen by {source}; {'present' if root.is_dir() else 'missing'})."))

# %% [markdown]
# Every chapter takes a **profile**: the same code at different sizes. `smoke` checks in
# seconds that everything runs, `ci` is what this book is built with on a laptop-class
# CPU, `full` reproduces the papers' scale. `PROFILE=smoke make book` builds the whole
# book at a given profile. The profiles set these shared sizes; each chapter's own sizes
# per profile sit beside them in `leukemia_core/config.py` (`CHAPTER_SIZES`, listed below):

# %%
sizes = pd.DataFrame({name: p.to_dict() for name, p in PROFILES.items()}).drop(["name"])
display(sizes)
display(Markdown("Chapters with their own sizes: " + ", ".join(f"`{c}`" for c in CHAPTER_SIZES) + "."))
display(Markdown(f"This page was run under **{P.name}** (seed {seed})."))
