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
# # The data
#
# Every method in this book is only as good as the images it learns from. This chapter
# opens each public dataset the book uses and measures it: how many images of each class,
# what they look like, how large they are, which files are copies of others, and how the
# colour of the stain differs from one source to the next. It closes with what these data
# can support and what they cannot.
#
# The datasets, each read in place from the data root by its own loader:
#
# - **PBC** {cite:p}`acevedo2020pbc`: single cells from healthy donors, Hospital Clínic de
#   Barcelona (CellaVision DM96).
# - **WBCAtt** {cite:p}`tsutsui2023wbcatt`: morphological attributes for the PBC cells of
#   the white-cell classes.
# - **BCCD** {cite:p}`bccd`: smear fields with boxes around white cells, red cells and
#   platelets, and the WBC subtype of each field; **BCCD crops**: single white cells cut
#   from those fields.
# - **TXL-PBC** {cite:p}`gan2024txlpbc`: boxes on images gathered from several sources.
# - **Matek** {cite:p}`matek2019aml,matek2019tcia`: AML myeloblasts and segmented neutrophils
#   from Munich (a subset of the classes of the full release).
# - **Aria** {cite:p}`aria2021all,ghaderzadeh2022ball`: B-ALL smear fields (benign
#   hematogones and malignant stages) from Tehran.
# - **Zheng** {cite:p}`zheng2018wbc`: single white cells with nucleus/cytoplasm masks.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
montage_per_class = None  # images per class in the montages (None: the profile's size)
colour_per_source = None  # images per source for the colour statistics
size_sample = None  # images per dataset whose size is read (None: the profile's; all under ci)

# %% [markdown]
# Setup: the libraries, the offline plotly renderer (see {doc}`01_introduction`) and this
# chapter's sizes for the chosen profile.

# %%
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display
from PIL import Image, ImageDraw
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukemia_core.config import chapter_sizes, get_profile
from leukemia_core.data import ATTRIBUTES, load_dataset
from leukemia_core.data.check import find_duplicates
from leukemia_core.data.dataroot import data_root as resolve_data_root
from leukemia_core.plots import use_offline_plotly

use_offline_plotly()
plt.rcParams.update({"figure.dpi": 80, "font.size": 9})

P = get_profile(profile)
sizes = chapter_sizes("02_data", P)  # leukemia_core/config.py: CHAPTER_SIZES
montage_per_class = montage_per_class or sizes["montage_per_class"]
colour_per_source = colour_per_source or sizes["colour_per_source"]
size_sample = size_sample or sizes["size_sample"]
root = resolve_data_root(data_root)
print(f"profile {P.name}: {montage_per_class} images per class in montages, "
      f"{colour_per_source} per source for colour, sizes read for "
      f"{'every image' if size_sample is None else f'{size_sample} images per dataset'}; "
      f"data root {root}")

# %% [markdown]
# ## What is there
#
# Each loader returns one table with a row per image: its path, label, dataset, source
# domain and content hash, plus what the task needs (boxes, attributes, masks, splits).

# %%
NAMES = ["pbc", "wbcatt", "bccd", "bccd_crops", "txl_pbc", "matek", "aria", "zheng"]
KIND = {"pbc": "single cells", "wbcatt": "attributes of PBC cells",
        "bccd": "smear fields + boxes", "bccd_crops": "single cells (from BCCD)",
        "txl_pbc": "fields / cells + boxes", "matek": "single cells",
        "aria": "smear fields", "zheng": "single cells + masks"}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # hashes (for the duplicate search) are not needed for WBCAtt: its files are PBC's
    tables = {name: load_dataset(name, root, hashes=name != "wbcatt") for name in NAMES}
overview = pd.DataFrame([{
    "dataset": name, "what": KIND[name], "images": len(t),
    "with a class label": int(t["label"].notna().sum()),
    "classes": t["label"].nunique(),
    "sources": ", ".join(sorted(t["domain"].dropna().unique())),
} for name, t in tables.items()]).set_index("dataset")
display(overview)
notes = [str(w.message) for w in caught]
if notes:
    display(Markdown("The loaders noted:\n\n" + "\n".join(f"- {n}" for n in notes)))
display(Markdown(
    f"**{overview['images'].sum() - overview.loc['wbcatt', 'images']:,}** image files in all "
    f"(WBCAtt's **{overview.loc['wbcatt', 'images']:,}** rows are PBC images with attributes)."))

# %% [markdown]
# ## Classes and their imbalance
#
# Images per class for every dataset labelled per image. BCCD labels a whole field with the
# subtype of its white cell(s); fields without a single subtype are counted apart. TXL-PBC
# labels boxes, not images, and follows below. Switch the axis to a log scale to see the
# small classes.

# %%
LABELLED = ["pbc", "wbcatt", "bccd", "bccd_crops", "matek", "aria", "zheng"]
counts = pd.concat([
    tables[name]["label"].fillna("(no single subtype)").value_counts()
    .rename_axis("label").reset_index(name="images").assign(dataset=name)
    for name in LABELLED], ignore_index=True)[["dataset", "label", "images"]]
counts["class"] = counts["dataset"] + " · " + counts["label"]
fig = px.bar(counts, x="images", y="class", color="dataset", orientation="h", text="images",
             height=260 + 18 * len(counts), title="Images per class")
fig.update_yaxes(categoryorder="array", categoryarray=counts["class"][::-1], title=None)
fig.update_layout(updatemenus=[dict(
    type="buttons", direction="right", x=1, xanchor="right", y=1.02, yanchor="bottom",
    buttons=[dict(label="linear", method="relayout", args=[{"xaxis.type": "linear"}]),
             dict(label="log", method="relayout", args=[{"xaxis.type": "log"}])])])
fig.show()

# %%
real = counts[~counts["label"].str.startswith("(")]
imbalance = real.groupby("dataset").agg(
    classes=("label", "size"), largest=("images", "max"), smallest=("images", "min"),
    smallest_class=("label", lambda s: s.loc[real.loc[s.index, "images"].idxmin()]))
imbalance["largest / smallest"] = (imbalance["largest"] / imbalance["smallest"]).round(1)
imbalance = imbalance.sort_values("largest / smallest", ascending=False)
display(imbalance)
worst, flat = imbalance.index[0], imbalance.index[-1]
display(Markdown(
    f"The most imbalanced set is **{worst}**: its largest class has "
    f"{imbalance.loc[worst, 'largest / smallest']}× the images of its smallest "
    f"({imbalance.loc[worst, 'smallest_class']}: {imbalance.loc[worst, 'smallest']} "
    f"image{'s' if imbalance.loc[worst, 'smallest'] != 1 else ''}). "
    f"The most balanced is **{flat}** ({imbalance.loc[flat, 'largest / smallest']}×). "
    "Accuracy hides such tails: the book reports balanced accuracy and macro-F1, and "
    "methods 2 and 5 are about exactly this imbalance."))

# %% [markdown]
# The detection sets label boxes. TXL-PBC mixes several sources, so its boxes are counted
# per source.

# %%
def box_counts(name):
    t = tables[name].assign(source=lambda d: d["domain"] if name == "txl_pbc" else name)
    return (t[["source", "box_labels"]].explode("box_labels").dropna()
            .value_counts().rename("boxes").reset_index()
            .rename(columns={"box_labels": "box class"}).assign(dataset=name))


boxes = pd.concat([box_counts("bccd"), box_counts("txl_pbc")], ignore_index=True)
boxes["set"] = boxes["dataset"] + " · " + boxes["source"]
fig = px.bar(boxes, x="box class", y="boxes", color="set", barmode="group", text="boxes",
             title="Boxes per class in the detection sets", log_y=True)
fig.show()
per_image = boxes.groupby(["dataset", "box class"])["boxes"].sum().unstack() \
    .div(pd.Series({n: len(tables[n]) for n in ("bccd", "txl_pbc")}), axis=0).round(1)
display(per_image.rename_axis(index="boxes per image"))
display(Markdown(
    f"Red cells dominate ({per_image.loc['bccd', 'RBC']} and {per_image.loc['txl_pbc', 'RBC']} "
    f"per image in BCCD and TXL-PBC); white cells are rare ({per_image.loc['bccd', 'WBC']} and "
    f"{per_image.loc['txl_pbc', 'WBC']} per image)."))

# %% [markdown]
# WBCAtt keeps its own train/val/test split of the PBC cells and describes each cell by
# morphological attributes, each taking a few values:

# %%
wbcatt = tables["wbcatt"]
display(pd.crosstab(wbcatt["label"], wbcatt["wbcatt_split"], margins=True))
display(pd.DataFrame({"values": [", ".join(sorted(wbcatt[a].dropna().unique())) for a in ATTRIBUTES]},
                     index=ATTRIBUTES))

# %% [markdown]
# ## What the images look like
#
# A few random images of every class (or source, for TXL-PBC), with the class size on the
# left. Boxes on the detection sets: white cells red, red cells blue, platelets yellow.

# %%
BOX_COLOURS = {"WBC": (220, 30, 30), "RBC": (40, 90, 220), "Platelets": (240, 200, 0)}


def load_rgb(row, draw_boxes=False):
    with Image.open(row["path"]) as im:
        im = im.convert("RGB")
    if draw_boxes:
        draw = ImageDraw.Draw(im)
        for box, label in zip(row["boxes"], row["box_labels"]):
            draw.rectangle(box, outline=BOX_COLOURS[label], width=max(1, im.width // 150))
    return im


def montage(table, by, title, k=montage_per_class, draw_boxes=False):
    """k random images per group, one row per group."""
    groups = [(g, d) for g, d in table.groupby(by, sort=True)]
    fig, axes = plt.subplots(len(groups), k, figsize=(1.25 * k + 1.2, 1.3 * len(groups) + 0.4),
                             squeeze=False)
    for r, (group, d) in enumerate(groups):
        picks = d.sample(min(k, len(d)), random_state=seed)
        for c, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if c < len(picks):
                ax.imshow(load_rgb(picks.iloc[c], draw_boxes))
        axes[r][0].text(-0.08, 0.5, f"{group}\n({len(d):,})", transform=axes[r][0].transAxes,
                        ha="right", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()


montage(tables["pbc"], "label", f"PBC (Barcelona): {tables['pbc']['label'].nunique()} classes of normal cells")

# %%
montage(tables["matek"], "label", "Matek (Munich): AML myeloblasts and neutrophils")

# %%
montage(tables["aria"], "label", "Aria (Tehran): B-ALL smear fields, benign and malignant stages")

# %%
montage(tables["bccd_crops"], "label", "BCCD crops: single white cells")

# %%
montage(tables["zheng"], "label", "Zheng: single white cells")

# %%
bccd = tables["bccd"].assign(subtype=lambda d: d["label"].fillna("(no single subtype)"))
montage(bccd[bccd["label"].notna()], "subtype", "BCCD fields with their boxes, by subtype",
        k=min(montage_per_class, 4), draw_boxes=True)

# %%
montage(tables["txl_pbc"], "domain", "TXL-PBC by source, with its boxes",
        k=min(montage_per_class, 4), draw_boxes=True)

# %% [markdown]
# The same cell type from every source that labels single neutrophils: they differ in
# stain, framing and scale before any model sees them.

# %%
neutrophils = pd.concat([tables[n].loc[tables[n]["label"] == "neutrophil"].assign(source=n)
                         for n in ("pbc", "bccd_crops", "zheng", "matek")])
montage(neutrophils, "source", f"Neutrophils from {neutrophils['source'].nunique()} sources")

# %% [markdown]
# ## Image sizes
#
# Read from the file headers only (no decoding). These are the sizes of the images in
# the data root; the mirror used to build this book downscaled some releases (its
# `README.md` says which), a full download has the original sizes.

# %%
def image_size(path):
    with Image.open(path) as im:
        return im.size


SIZED = ["pbc", "bccd", "bccd_crops", "txl_pbc", "matek", "aria", "zheng"]
parts = []
for name in SIZED:
    t = tables[name]
    if size_sample is not None:
        t = t.sample(min(size_sample, len(t)), random_state=seed)
    with ThreadPoolExecutor(2) as pool:
        wh = list(pool.map(image_size, t["path"]))
    parts.append(pd.DataFrame(wh, columns=["width", "height"]).assign(dataset=name, source=t["domain"].to_numpy()))
image_sizes = pd.concat(parts, ignore_index=True)
image_sizes["size"] = image_sizes["width"].astype(str) + "×" + image_sizes["height"].astype(str)
size_table = image_sizes.groupby("dataset").agg(
    read=("size", "size"), distinct_sizes=("size", "nunique"),
    most_common=("size", lambda s: s.value_counts().index[0]),
    share=("size", lambda s: f"{s.value_counts(normalize=True).iloc[0]:.0%}"),
    min_width=("width", "min"), max_width=("width", "max"))
display(size_table)

by_size = image_sizes.groupby(["dataset", "source", "width", "height"]).size().rename("images").reset_index()
fig = px.scatter(by_size, x="width", y="height", size="images", color="dataset", size_max=40,
                 hover_data=["source", "images"], title="Image sizes (marker area: number of images)")
fig.show()
txl_sizes = image_sizes[image_sizes["dataset"] == "txl_pbc"]
own_size = txl_sizes.groupby("size")["source"].transform("nunique").eq(1).mean()
display(Markdown(
    f"**{int((size_table['distinct_sizes'] == 1).sum())}** of {len(size_table)} datasets have a "
    f"single image size. In TXL-PBC, **{own_size:.0%}** of the images have a size that only "
    "their own source uses: size alone gives the source away, as it does between datasets. "
    "Models therefore see every image resized to one input size, and cell scale still "
    "differs between sources."))

# %% [markdown]
# ## Copies: the duplicates the checker finds
#
# `leukemia_core.data.check.find_duplicates` groups files with the same SHA-256, within
# and across datasets (WBCAtt is left out: its rows *are* PBC files). A copy on both
# sides of a train/test split inflates test scores; a copy under two labels is a
# labelling error.

# %%
dups = find_duplicates({n: tables[n] for n in SIZED})
dup_groups = dups.groupby("sha256").agg(
    files=("relpath", "size"), datasets=("dataset", lambda s: ", ".join(sorted(set(s)))),
    labels=("label", lambda s: ", ".join(sorted(set(s.dropna())))),
    cross_dataset=("cross_dataset", "first"), cross_class=("cross_class", "first"),
    paths=("relpath", " = ".join))
summary = dup_groups.groupby("datasets").agg(groups=("files", "size"), files=("files", "sum"),
                                             across_classes=("cross_class", "sum"))
display(summary)
display(Markdown(
    f"**{len(dup_groups)}** groups of identical files (**{len(dups)}** files). Groups spanning "
    f"two datasets: **{int(dup_groups['cross_dataset'].sum())}**; groups under two different "
    f"labels: **{int(dup_groups['cross_class'].sum())}**:"))
display(dup_groups[dup_groups["cross_class"]][["datasets", "labels", "paths"]])

# %%
conflicts = dups[dups["cross_class"]]
if len(conflicts):
    n = len(conflicts)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.2), squeeze=False)
    for ax, (_, row) in zip(axes[0], conflicts.iterrows()):
        ax.imshow(load_rgb(tables[row["dataset"]].set_index("relpath").loc[row["relpath"]]))
        ax.set_title(f"{row['dataset']}: {row['label']}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle("The same file under two labels")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# Exact hashes only find byte-identical files. TXL-PBC re-used PBC and BCCD images, but the
# mirror re-encoded TXL-PBC on its own, so its copies are not byte-identical here;
# TXL-PBC's `source_map.csv` (matched by hash against the original releases) records them.

# %%
txl = tables["txl_pbc"]
provenance = pd.crosstab(txl["domain"], txl["split"], margins=True)
display(provenance)
from_pbc = txl.loc[txl["source_dataset"] == "pbc", "source_path"]
wb = tables["wbcatt"].set_index("relpath")["wbcatt_split"]
in_wbcatt = from_pbc[from_pbc.isin(wb.index)]
display(Markdown(
    f"**{int((txl['source_dataset'] == 'pbc').sum())}** TXL-PBC images are PBC files and "
    f"**{int((txl['source_dataset'] == 'bccd').sum())}** are BCCD files; "
    f"**{len(in_wbcatt)}** of the PBC copies are WBCAtt cells "
    f"({', '.join(f'{n} in its {s} split' for s, n in wb[in_wbcatt].value_counts().items())}). "
    f"Exact hashing in this data root links **{int(dups['dataset'].eq('txl_pbc').sum())}** "
    "TXL-PBC files to others. Any evaluation that mixes these sets must deduplicate through "
    "the source map first."))

# %% [markdown]
# ## Near duplicates: the same cell or field, shifted or re-encoded
#
# Exact hashes miss a cell photographed twice with a small shift, or a smear field saved
# twice with a different crop. `leukemia_core.data.near_duplicates` finds them with a
# cascade over small thumbnails (coarse colour layout first, then the correlation of their
# fine detail, best over small shifts), and the committed splits keep every cluster of
# copies on one side (`splits/<dataset>_near_duplicates.csv`; a test regenerates them from
# the images and checks that no pair straddles a split). The threshold leans towards
# recall: a false pair only keeps two different images in the same split, a missed copy
# leaks.

# %%
from leukemia_core.data.near_duplicates import clusters
from leukemia_core.data.splits import SPLIT_SPECS, read_near_duplicates, split_paths

nd_rows, nd_pairs = [], {}
for name in sorted(SPLIT_SPECS):
    pairs = nd_pairs[name] = read_near_duplicates(name)
    split = pd.read_csv(split_paths(name)[0])
    sizes = clusters(split["relpath"], pairs).value_counts()
    nd_rows.append({"dataset": name, "images": len(split), "pairs": len(pairs),
                    "clusters of 2+": int((sizes > 1).sum()), "images in them": int(sizes[sizes > 1].sum()),
                    "largest cluster": int(sizes.max()),
                    "near-identical (score ≥ 0.999)": int((pairs["correlation"] >= 0.999).sum())})
display(pd.DataFrame(nd_rows).set_index("dataset"))
aria_pairs = nd_pairs["aria"]
number = lambda rel: int(rel.rsplit("-", 1)[-1].split(".")[0])
near_numbers = float(np.mean([abs(number(a) - number(b)) <= 5 for a, b in zip(aria_pairs["a"], aria_pairs["b"])]))
straddle = 1 - sum(f ** 2 for f in SPLIT_SPECS["aria"][0])  # chance a pair splits, image by image
display(Markdown(
    f"Aria's smear fields are the most affected: **{len(aria_pairs)}** pairs, {near_numbers:.0%} of them "
    f"with file numbers at most 5 apart (the same field saved twice). Split image by image, as the book "
    f"did before, a pair lands on two sides with probability {straddle:.2f}: about "
    f"**{straddle * len(aria_pairs):.0f}** of these copies would sit across train / validation / test and "
    "inflate the within-source Aria results of chapters 04 and 05. They are now split by cluster."))

# %%
show = [nd_pairs[n].sort_values("correlation").iloc[0] for n in ("aria", "pbc", "bccd_crops") if len(nd_pairs[n])]
folders = {"aria": tables["aria"], "pbc": tables["pbc"], "bccd_crops": tables["bccd_crops"]}
fig, axes = plt.subplots(1, 2 * len(show), figsize=(2.2 * 2 * len(show), 2.6), squeeze=False)
for k, (name, pair) in enumerate(zip(("aria", "pbc", "bccd_crops"), show)):
    t = folders[name].set_index("relpath")
    for j, rel in enumerate((pair["a"], pair["b"])):
        ax = axes[0][2 * k + j]
        ax.imshow(load_rgb(t.loc[rel]))
        ax.set_title(f"{name}\n{rel.split('/')[-1]}" + (f"\nscore {pair['correlation']:.2f}" if j else ""),
                     fontsize=7)
        ax.set_axis_off()
fig.suptitle("The least similar confirmed pair of each dataset (left / right: one pair)")
fig.tight_layout()
plt.show()

# %% [markdown]
# WBCAtt keeps its own train/validation/test split of PBC cells. Copies of one cell (PBC's
# clusters above, exact copies included) that sit in two of its splits are dropped from the
# less held-out side, so its published test set stays whole and nothing leaks into it:

# %%
dropped = load_dataset("wbcatt", data_root, hashes=False).attrs["cross_split_copies"]
display(dropped)

# %% [markdown]
# ## Colour and stain: every source looks different
#
# Each source stains, scans and compresses differently. For a random sample of images per
# source we compute the mean and spread of each CIELAB channel (L* lightness, a*
# green–red, b* blue–yellow) over the whole image, background included, and pool all pixels
# into per-source histograms.

# %%
def lab_pixels(path, side=64):
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR))
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    return lab * np.float32([100 / 255, 1, 1]) - np.float32([0, 128, 128])


sources = pd.concat([tables[n].assign(source=n) for n in ("pbc", "bccd", "bccd_crops", "matek", "aria", "zheng")]
                    + [txl.assign(source="txl_pbc · " + txl["domain"])], ignore_index=True)
sample = pd.concat([d.sample(min(colour_per_source, len(d)), random_state=seed)
                    for _, d in sources.groupby("source")], ignore_index=True)
with ThreadPoolExecutor(2) as pool:
    pixels = list(pool.map(lab_pixels, sample["path"]))
CHANNELS = ["L*", "a*", "b*"]
stats = pd.DataFrame([np.r_[p.mean(0), p.std(0)] for p in pixels],
                     columns=[f"mean {c}" for c in CHANNELS] + [f"std {c}" for c in CHANNELS])
stats[["source", "label", "relpath"]] = sample[["source", "label", "relpath"]]
display(stats.groupby("source")[[f"mean {c}" for c in CHANNELS]].mean().round(1))

# %%
features = stats[[c for c in stats.columns if c.startswith(("mean", "std"))]].to_numpy()
embedding = PCA(n_components=2, random_state=seed).fit(StandardScaler().fit_transform(features))
xy = embedding.transform(StandardScaler().fit_transform(features))
stats["PC 1"], stats["PC 2"] = xy[:, 0], xy[:, 1]
fig = px.scatter(stats, x="PC 1", y="PC 2", color="source", hover_data=["label", "relpath"],
                 opacity=0.7, title=f"Colour statistics of each image (PCA of {features.shape[1]} CIELAB statistics)")
fig.update_traces(marker=dict(size=5))
fig.show()

# %%
BINS = {"L*": np.linspace(0, 100, 51), "a*": np.linspace(-40, 60, 51), "b*": np.linspace(-60, 40, 51)}
rows = []
for source, idx in sample.groupby("source").groups.items():
    pooled = np.concatenate([pixels[i] for i in idx])
    for j, channel in enumerate(CHANNELS):
        hist, edges = np.histogram(pooled[:, j], bins=BINS[channel], density=True)
        rows.append(pd.DataFrame({"source": source, "channel": channel,
                                  "value": (edges[:-1] + edges[1:]) / 2, "density": hist}))
histograms = pd.concat(rows, ignore_index=True)
fig = px.line(histograms, x="value", y="density", color="source", facet_col="channel",
              title="Pixel histograms per source (CIELAB)", height=420)
fig.update_xaxes(matches=None, title=None)
fig.show()

# %% [markdown]
# How much of the source does colour alone give away? A linear classifier on the colour
# statistics of each image, cross-validated:

# %%
n_sources = stats["source"].nunique()
folds = int(min(5, stats["source"].value_counts().min()))
clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
scores = cross_val_score(clf, features, stats["source"], scoring="balanced_accuracy",
                         cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
pair = stats["source"].isin(["pbc", "matek"])
pair_scores = cross_val_score(clf, features[pair], stats.loc[pair, "source"], scoring="balanced_accuracy",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
display(Markdown(
    f"From **{features.shape[1]}** colour statistics per image, it names the source among "
    f"**{n_sources}** with a balanced accuracy of "
    f"**{scores.mean():.0%}** (± {scores.std():.0%} over {folds} folds; chance "
    f"{1 / n_sources:.0%}). PBC (all normal cells) against Matek (where the myeloblasts "
    f"are): **{pair_scores.mean():.0%}**. A leukemia-versus-normal classifier trained across "
    "these sources can score well by recognising the lab, which is why the book's leukemia "
    "comparisons stay within one source."))

# %% [markdown]
# ## What these data can and cannot support
#
# Everything below is computed from the tables above (expand the cell to see how).

# %% tags=["hide-input"]
LEUKEMIA = {"myeloblast": "AML", "early_pre_b": "B-ALL", "pre_b": "B-ALL", "pro_b": "B-ALL"}
WBC = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
labels = counts.groupby("label")["dataset"].apply(lambda s: sorted(set(s) - {"wbcatt", "bccd"}))
all_labels = " ".join(counts["label"]).lower()
has_chronic = any(word in all_labels for word in ("cml", "cll", "chronic"))
leukemia_sources = {lab: labels[lab] for lab in LEUKEMIA if lab in labels.index}
matek_n = tables["matek"]["label"].value_counts()
aria_n = tables["aria"]["label"].value_counts()
aria_size = size_table.loc["aria", "most_common"]
shared_wbc = {w: labels[w] for w in WBC if w in labels.index}

display(Markdown(f"""
**They cannot support:**

- *Chronic leukemia.* {'No' if not has_chronic else 'Some'} class name in any dataset mentions
  CML, CLL or chronic leukemia. The leukemia classes that exist are
  {', '.join(f'{lab} ({LEUKEMIA[lab]}, from {", ".join(src)})' for lab, src in leukemia_sources.items())}.
  Any claim about CML or CLL is out of reach; the taxonomy stays general and the
  chronic branch stays empty.
- *Leukemia versus normal across sources.* Each leukemia class comes from a single source
  ({', '.join(sorted({s for src in leukemia_sources.values() for s in src}))}); the normal
  cells of PBC come from another hospital. Besides leukemia, those sources hold only
  {'; '.join(f'{", ".join(sorted(set(tables[s]["label"]) - set(LEUKEMIA)))} ({s})' for s in sorted({s for src in leukemia_sources.values() for s in src}))}.
  Colour statistics alone tell PBC from Matek with {pair_scores.mean():.0%} balanced accuracy.
- *Cell-level comparisons with Aria.* Aria images are smear fields ({aria_size} pixels here)
  showing several cells each, while the other classification sets are single-cell crops:
  framing alone separates them.
- *Naive pooling.* {int((txl['source_dataset'] == 'pbc').sum())} TXL-PBC images are PBC files
  and {int((txl['source_dataset'] == 'bccd').sum())} are BCCD files, and {len(dup_groups)}
  groups of byte-identical files exist ({int(dup_groups['cross_class'].sum())} under two labels):
  deduplicate before splitting.

**They can support:**

- *Within-source leukemia contrasts:* Matek myeloblasts ({matek_n.get('myeloblast', 0):,})
  against Matek neutrophils ({matek_n.get('neutrophil', 0):,}); Aria benign
  ({aria_n.get('benign', 0):,}) against the malignant stages
  ({int(aria_n.drop('benign', errors='ignore').sum()):,}).
- *WBC classification and its imbalance:* PBC's {len(tables['pbc']):,} cells in
  {tables['pbc']['label'].nunique()} classes, with rare classes in BCCD crops and Zheng.
- *Domain generalisation:* the WBC classes from several sources:
  {'; '.join(f'{w}: {", ".join(src)}' for w, src in shared_wbc.items())}.
- *Detection and attributes* (the stand-ins for method 4's data):
  {int(boxes['boxes'].sum()):,} boxes in BCCD and TXL-PBC, and {len(wbcatt):,} cells with
  {len(ATTRIBUTES)} WBCAtt attributes.
"""))
