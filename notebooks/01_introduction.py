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
import plotly.express as px
from IPython.display import Markdown, display

from leukemia_core.config import PROFILES, get_profile
from leukemia_core.data import CLASSIFICATION, LOADERS
from leukemia_core.dataroot import resolve_data_root
from leukemia_core.plots import use_offline_plotly

use_offline_plotly()
P = get_profile(profile)

# %% [markdown]
# ## The five methods
#
# | # | method | paper | what it needs from the data |
# |---|---|---|---|
# | 1 | text-guided vision-language classification: each class is described by a sentence and images are matched to descriptions | {cite:t}`vlm_leukemia_2026` | leukemia classes with images |
# | 2 | a hybrid ConvNeXtV2–Swin Transformer classifier, R3GAN {cite:p}`huang2024r3gan` images to balance rare classes, CLAHE contrast preprocessing | {cite:t}`convnextv2_swin_r3gan_2025` | an imbalanced WBC dataset |
# | 3 | hierarchical classification that follows the clinical taxonomy (normal / leukemia, acute / chronic, myeloid / lymphoid) | {cite:t}`hamdi2025hierarchy` | labels at several levels of the taxonomy |
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
# The figure shows the taxonomy the methods work with and which of its leaves have images
# here (each leaf has the same size: this is not a count).

# %%
taxonomy = pd.DataFrame([
    ("normal / reactive", "white blood cells", "neutrophil", "PBC, BCCD, Zheng, Matek"),
    ("normal / reactive", "white blood cells", "lymphocyte", "PBC, BCCD, Zheng"),
    ("normal / reactive", "white blood cells", "monocyte", "PBC, BCCD, Zheng"),
    ("normal / reactive", "white blood cells", "eosinophil", "PBC, BCCD, Zheng"),
    ("normal / reactive", "white blood cells", "basophil", "PBC, BCCD, Zheng"),
    ("normal / reactive", "other cells", "immature granulocyte", "PBC"),
    ("normal / reactive", "other cells", "erythroblast", "PBC"),
    ("normal / reactive", "other cells", "platelet", "PBC"),
    ("normal / reactive", "benign precursors", "hematogone", "Aria"),
    ("acute leukemia", "AML", "myeloblast", "Matek"),
    ("acute leukemia", "ALL", "early pre-B", "Aria"),
    ("acute leukemia", "ALL", "pre-B", "Aria"),
    ("acute leukemia", "ALL", "pro-B", "Aria"),
    ("chronic leukemia", "CML", "CML cells", None),
    ("chronic leukemia", "CLL", "CLL cells", None),
], columns=["group", "type", "class", "sources"])
taxonomy["images here"] = taxonomy["sources"].notna().map({True: "public images", False: "no public images"})
taxonomy["sources"] = taxonomy["sources"].fillna("none")
fig = px.sunburst(taxonomy, path=["group", "type", "class"], color="images here",
                  color_discrete_map={"public images": "#2a9d8f", "no public images": "#c0c0c0",
                                      "(?)": "#e9c46a"},
                  hover_data=["sources"], title="Which classes of the taxonomy have public images here")
fig.update_layout(margin=dict(t=50, l=0, r=0, b=0))
fig.show()

missing = taxonomy.loc[taxonomy["sources"] == "none", "type"].tolist()
display(Markdown(f"Leaves without images: **{', '.join(missing)}** "
                 f"({len(missing)} of {len(taxonomy)} leaves)."))

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
# book at a given profile. The profiles set these sizes:

# %%
sizes = pd.DataFrame({name: p.to_dict() for name, p in PROFILES.items()}).drop(["name", "extra"])
display(sizes)
display(Markdown(f"This page was run under **{P.name}** (seed {seed})."))
