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
# # Domain generalisation across hospitals, judged by macro-F1
#
# A white-cell classifier trained in one hospital meets, in the next one, another
# scanner, another stain, another magnification and another mix of cell types.
# {cite:t}`umer2023imbalanced` study exactly this: *imbalanced* domain generalisation,
# where the class mix differs from domain to domain and rare cell types matter, judged
# by macro-F1 on domains never seen in training. Their domains are Matek-19, an
# in-house set (INT-20) and Acevedo-20 (PBC); the in-house set is private.
#
# This chapter builds the setting from the public domains in the mirror: PBC
# (Barcelona, CellaVision), the BCCD crops, Zheng Dataset 1 (Jiangxi Tecom), and Matek
# (Munich) neutrophils as a one-class probe. It trains on two hospitals, tests on the
# third (leave-one-domain-out), and compares plain training with the remedies for each
# shift: class-balanced sampling and loss (imbalance), stain augmentation (colour),
# scale normalisation (magnification and framing), a supervised contrastive loss across
# domains (as in SADA, arXiv:2412.02976), and weight averaging or test-time BatchNorm
# adaptation. An **in-domain ceiling** per domain (the same recipe trained on that
# domain's own training split) tells how much of the gap is the domain shift and how much
# is simply a small model on small data.
#
# :::{admonition} Learning objectives
# :class: tip objectives
# After this chapter you can
# - set up {term}`leave-one-domain-out <leave-one-domain-out>` evaluation over hospitals,
#   with the epoch and the headline row chosen on the training hospitals' validation
#   splits only, and say why a recipe designed on held-out scores cannot be the headline;
# - write down and implement the remedies for each shift: class-balanced sampling and the
#   class-balanced {term}`focal loss` (effective number of samples), the supervised
#   contrastive loss ({term}`SupCon`), {term}`stain normalisation` and stain augmentation,
#   nucleus-based scale normalisation, {term}`SWA`, and {term}`TTA-BN` / {term}`AdaBN`;
# - explain why {term}`batch normalization` ties a network to its training hospitals, and
#   what {term}`GroupNorm <group normalization>` and re-estimating the statistics on the
#   target images change;
# - judge a {term}`domain generalization` result by {term}`macro-F1` against the in-domain
#   ceiling, chance and seed noise, and score a checkpoint on your own hospital's folder.
#
# **Prerequisites:** chapters {doc}`02_data` (the datasets, the committed
# {term}`stratified splits <stratified split>` and the near-duplicate check) and
# {doc}`03_baseline` (fine-tuning EfficientNet-Lite0, model selection by validation
# macro-F1); the batch-normalization formula of the {doc}`notation <../book/notation>`.
# :::

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
seeds = None  # None: the profile's seeds (one under ci, three under full)
results_dir = "results"  # results JSON: <results_dir>/<profile>/dg_*.json
artifacts = "_build/artifacts"  # checkpoints: <artifacts>/<profile>/dg_*/ (relative: from the repository root)
supcon_weight = 0.5  # weight of the supervised contrastive term (rows SupCon and combined)

# %%
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display

from leukemia_core import dg
from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.data.domains import CLASSES, DOMAINS, SHARED, class_counts
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.experiments import domain_generalization as experiment
from leukemia_core.plots import image_grid, show_source, use_offline_plotly
from leukemia_core.reproducibility.registry import load_claims

use_offline_plotly()
CHAPTER_START = time.perf_counter()
# the whole protocol (leukemia_core/experiments/domain_generalization.py): data, every training,
# the headline rule, the in-domain ceiling, the combined checkpoint and results/<profile>/dg_*.json
res = experiment.run(profile, seeds=seeds, data_root=data_root, out=Path(artifacts) / profile,
                     results_dir=results_dir, seed=seed, supcon_weight=supcon_weight)
P, SIZES, seeds = res["P"], res["sizes"], res["seeds"]  # sizes: leukemia_core/config.py, CHAPTER_SIZES
S, SCALE = SIZES["image_size"], experiment.SCALE
print(f"profile {P.name}: EfficientNet-Lite0 (ImageNet) at {S}px, {SIZES['epochs']} epochs, "
      f"PBC train cap {SIZES['pbc_train_cap']}/class, seeds {seeds}")

# %% [markdown]
# ## The domains
#
# Every domain keeps its committed split. Before anything is compared, files are
# deduplicated **by content across domains** (same SHA-256 under two names: the first
# domain keeps it, in the order PBC, BCCD, Zheng, Matek). The repackaged detection set
# TXL-PBC, which reuses PBC and BCCD files, is not used here at all.

# %%
table, removed = res["table"], res["removed"]
display(Markdown(f"Cross-domain duplicates removed: **{len(removed)}**" +
                 (f" ({removed.groupby(['domain', 'kept_in']).size().to_dict()})" if len(removed) else "")))
display(class_counts(table).style.format(precision=1))

# %% [markdown]
# The class mix differs wildly. PBC is nearly balanced by design (the authors picked
# cells per class); BCCD and Zheng are dominated by neutrophils, as a blood smear is,
# and have a handful of monocytes and basophils. Basophils exist in numbers only in PBC:
# models predict them, but macro-F1 is taken over the four shared classes, and basophil
# recall is reported where a domain has any. Matek contributes neutrophils only.

# %%
shown = experiment.example_images(table)  # (path, title): a random image per domain and class
image_grid([p for p, _ in shown], [t for _, t in shown], ncols=8, size=1.5)

# %% [markdown]
# ## The shifts, measured
#
# - **Colour**: mean RGB and the share of "purple" (nucleus-channel) pixels.
# - **Scale and framing**: the image size, and the nucleus's extent as a share of the
#   image side, from the same nucleus segmentation the scale normalisation uses. A
#   BCCD crop is a zoom on one cell, a PBC image shows the cell among red cells, a
#   Zheng image is a tight 120-pixel crop.

# %%
stats = experiment.shift_stats(table, 30 if profile != "smoke" else 4)
display(stats.drop(columns="label").groupby("domain").agg(["mean", "std"])
        .round(2).loc[:, [("width", "mean"), ("R", "mean"), ("G", "mean"), ("B", "mean"),
                          ("nucleus extent / side", "mean"), ("nucleus extent / side", "std")]])
px.box(stats, x="domain", y="nucleus extent / side", color="label", points=False,
       title="apparent nucleus size by domain and class (before scale normalisation)").show()

# %% [markdown]
# ## Scale normalisation, checked against the Zheng masks
#
# `leukemia_core.dg.ScaleNorm` segments the nucleus (Otsu's threshold on blue minus
# green, a small opening, and the lobes grouped by dilation; the group nearest the
# centre wins), then crops a square around it so that the nucleus spans a fixed
# fraction of the side (`dg.ScaleNorm`), padding with the border colour where needed. Zheng
# Dataset 1 has expert masks (nucleus 255, cytoplasm 128): the nucleus IoU tells how far
# to trust the segmentation, and the extent ratio how far to trust the *scale*, which is
# what the normalisation uses.

# %%
seg_check = res["seg_check"]
display(Markdown(
    f"Zheng, {seg_check['n']} images: nucleus IoU mean **{seg_check['nucleus_iou_mean']:.2f}** (median "
    f"{seg_check['nucleus_iou_median']:.2f}); predicted / true nucleus extent median "
    f"**{seg_check['extent_ratio_median']:.2f}**, within ±20% for "
    f"{seg_check['extent_within_20pct']:.0%} of the cells."))
before = [np.asarray(read_image(p)) for p, _ in shown]
after = [SCALE(im, 96)[0] for im in before]
image_grid(before[::2] + after[::2] + [dg.reinhard(im) for im in after[::2]], [t for _, t in shown][::2] * 3,
           ncols=8, size=1.5)

# %% [markdown]
# Top: as stored; middle: scale-normalised; bottom: scale-normalised, then Reinhard colour
# normalisation (each LAB channel of the image standardised to fixed target statistics,
# `leukemia_core.dg.reinhard`), the deterministic preprocessing of the normalised recipes. The IoU is modest: Zheng's cytoplasm is
# stained deeply, and the threshold often takes part of it with the nucleus. The
# extent, which is all the normalisation needs, is closer. Scale normalisation removes
# the absolute size of the cell, a real cue (a lymphocyte is smaller than a monocyte),
# but one that is not comparable across microscopes anyway; the nucleus-to-cell ratio
# and the shapes stay.
#
# ## The protocol
#
# Leave one domain out of {PBC, BCCD, Zheng}; train on the others' **training splits**,
# select the epoch by macro-F1 on their **validation splits** (never on the held-out
# domain), and test on the held-out domain: PBC's committed test split (subsampled per
# class under `ci`), and for the small domains BCCD and Zheng **all their images**, since
# nothing of them was used in that fold. Matek neutrophils (test split) are a probe every
# fold's model is tested on: neutrophil recall in a hospital no fold trained on.
#
# ```{graphviz}
# :caption: The leave-one-domain-out protocol, run for each held-out domain and seed. Only the training domains' validation splits choose anything (the epoch inside train_dg, the headline row across folds); the held-out domain is scored once, and its unlabelled images enter only the TTA-BN rows.
# digraph lodo {
#   rankdir=LR; node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];
#   edge [fontname="Helvetica", fontsize=9];
#   subgraph cluster_fold {
#     label="for each held-out domain d in {pbc, bccd, zheng}, each seed, each recipe";
#     fontname="Helvetica"; fontsize=10; style=dashed;
#     train [label="training domains d' ≠ d\ntrain splits, joined\n(per-class caps of the profile)"];
#     val [label="training domains d' ≠ d\nvalidation splits, joined"];
#     fit [label="train_dg(recipe)\nEfficientNet-Lite0 (ImageNet)\n+ projection head (DGNet)\nK = 5 logits"];
#     epoch [label="keep the best epoch:\nmax validation macro-F1\n(4 shared classes)"];
#     variants [label="rows: as trained;\n+ SWA (ERM-BN);\n+ TTA-BN (ERM-BN, combined)"];
#     held [label="held-out domain d\npbc: test split\nbccd, zheng: all images"];
#     score [label="score once:\nmacro-F1, accuracy,\nper-class recall"];
#   }
#   matek [label="Matek neutrophils\n(test split): probe"];
#   head [label="headline row: max mean\nvalidation macro-F1 over folds\n(not the combined rows)"];
#   table [label="LODO table: mean over folds\nresults/<profile>/dg_*.json", shape=note];
#   train -> fit; fit -> epoch [label="each epoch"]; val -> epoch;
#   epoch -> variants; held -> variants [label="unlabelled images\n(TTA-BN only)", style=dashed];
#   variants -> score; held -> score [label="labels"]; matek -> score;
#   score -> table; val -> head [label="scored as the row is used"]; head -> table [label="marks"];
# }
# ```
#
# In symbols: for each held-out domain $d \in \mathcal{D} = \{\text{PBC}, \text{BCCD},
# \text{Zheng}\}$, the weights $\theta_e$ after epoch $e$ are trained on
# $\bigcup_{d' \neq d} S^{d'}_{\text{train}}$, the epoch is chosen on the joined validation
# splits, and the chosen model $f_{\theta^{(-d)}}$ is scored on the held-out sample
# $S^{d}_{\text{held}}$ (PBC's test split, or all of BCCD's or Zheng's images). The number the
# setting asks for is the mean over held-out domains (and over seeds, when there are several):
#
# $$
# e^\star = \arg\max_{e} \ \text{macro-F1}\Big(f_{\theta_e};\ \bigcup_{d' \neq d} S^{d'}_{\text{val}}\Big),
# \qquad
# \overline{F}_{1} = \frac{1}{|\mathcal{D}|} \sum_{d \in \mathcal{D}}
#   \text{macro-F1}\big(f_{\theta^{(-d)}};\ S^{d}_{\text{held}}\big),
# \quad \theta^{(-d)} = \theta_{e^\star} .
# $$ (eq-dg-lodo)
#
# The models predict $K = 5$ classes (the four shared ones and basophil), but
# {term}`macro-F1` is averaged over the shared classes $\mathcal{K}_S$ that occur in the sample
# scored, with precision $P_k$ and recall $R_k$ as in the notation:
#
# $$
# \text{macro-F1}(f; S) = \frac{1}{|\mathcal{K}_S|} \sum_{k \in \mathcal{K}_S} \frac{2 P_k R_k}{P_k + R_k},
# \qquad \mathcal{K}_S = \{k \in \text{shared} : k \text{ occurs among the labels of } S\} .
# $$ (eq-dg-macro-f1)
#
# A neutrophil predicted as basophil still costs the neutrophil's recall; basophil's own
# F1 is not in the mean, and a class that is never predicted correctly scores
# $F_1^{(k)} = 0$. The function (used for the epoch, the headline rule and the table alike):

# %% tags=["remove-input"]
show_source(dg.macro_f1)

# %%
parts, cache = res["parts"], res["cache"]  # (domain, role) -> rows, and their decoded images
display(pd.DataFrame({f"{d} {r}": rows["label"].value_counts() for (d, r), rows in parts.items() if r != "test"})
        .reindex(CLASSES).fillna(0).astype(int).T)

# %% [markdown]
# ## Methods
#
# All fine-tune the same ImageNet EfficientNet-Lite0 (the only offline ImageNet image
# weights) at the same size, epochs, learning rate and images; only the named piece
# changes.
#
# | row | what changes | shift it targets |
# |---|---|---|
# | ERM-BN | plain cross-entropy, BatchNorm | – |
# | ERM-GN | every BatchNorm swapped for GroupNorm (8 groups), ImageNet weights kept | batch statistics that encode the training hospitals |
# | CB sampling + CB focal | each (domain, class) cell sampled equally; focal loss (γ=2) with effective-number class weights (β=0.99) | class imbalance per domain |
# | stain aug + scale norm | Reinhard colour normalisation to fixed LAB statistics, HED stain jitter (σ=0.2) + colour jitter; nucleus-based scale normalisation | colour, scale, framing |
# | SupCon | + 0.5 × supervised contrastive loss over mixed-domain batches (τ=0.1) | domain-specific features |
# | ERM-BN + SWA | average of the weights of epochs 2.., BN re-estimated on the training images | sharp minima |
# | ERM-BN + TTA-BN | BN statistics re-estimated on the unlabelled held-out images | stain / scale in feature statistics |
# | combined | scale norm + Reinhard + SupCon + **domain-wise BN** (below); scored as trained and with TTA-BN | colour, scale, domain features, feature statistics |
#
# TTA-BN is *transductive*: it looks at the held-out images (not their labels) before
# predicting. It is reported as such. *Domain-wise BN* makes training agree with TTA-BN
# (AdaBN, Li et al. 2016): each training domain's share of a batch goes through the
# network on its own, so BatchNorm normalises every hospital with that hospital's
# statistics, and the epoch is chosen on validation images normalised the same way. A
# model trained so expects target statistics at test time: its TTA-BN variant is the
# intended use, its plain row (running statistics averaged over the training hospitals)
# is shown for completeness. The GroupNorm row keeps the ImageNet convolutions
# but not BatchNorm's affine parameters: copied into GroupNorm they make the features
# almost constant across inputs.
#
# **How the combined recipe was designed, and why it cannot be the headline**: its pieces
# were picked in earlier sweeps that *looked at the held-out scores* (first on a separate
# 16-core machine, then at these `ci` sizes on the book's 2-core machine; MixStyle (Zhou et
# al. 2021) and frozen ImageNet BatchNorm statistics were dropped that way). Its held-out
# score is therefore optimistic by that selection. Its rows are shown and marked
# `selected_on: test` in their results files; they decide nothing.
#
# **The headline row, fixed before any result is computed** (`HEADLINE_RULE` below): among
# the rows *not* designed on held-out scores, the one with the highest mean macro-F1 on the
# **training domains' validation splits**, scored the way the row is used: plain rows with
# their running BatchNorm statistics, a TTA-BN row with its statistics re-estimated on each
# validation domain separately (as it would be on a new hospital). The held-out domain is
# touched once, to score that row. Every verdict below (targets, gain over ERM, the
# in-domain ceiling, the anchors) uses it.
#
# ### The pieces, in equations
#
# **Imbalance.** The *CB sampling* row draws each batch, with replacement, so that every
# (domain, class) cell of the training set carries the same total probability (function
# `dg.sample_weights` below):
#
# $$
# \Pr(\text{draw } i) \ \propto\ \frac{1}{\big|\{\, j : d_j = d_i,\ y_j = y_i \,\}\big|} .
# $$ (eq-dg-sampler)
#
# Its loss is the class-balanced {term}`focal loss` (Lin et al. 2017, with the weights of
# Cui et al. 2019). The *effective number* $E_{N}$ of $N$ samples of a class grows like $N$
# for small $N$ and saturates at $1/(1-\beta)$; class $k$ is weighted by its inverse,
# rescaled so that the weights average 1 over the $K_{+}$ classes that have training images
# ($N_k$: the fold's training images of class $k$, pooled over its training domains, and
# counted before the sampler):
#
# $$
# E_{N} = \frac{1 - \beta^{N}}{1 - \beta}, \qquad
# w_k = \frac{K_{+} \, E_{N_k}^{-1}}{\sum_{j : N_j > 0} E_{N_j}^{-1}} \ \ (N_k > 0),
# \qquad w_k = 0 \ \ (N_k = 0) ,
# $$ (eq-dg-cb-weights)
#
# with $\beta$ = `Recipe.cb_beta` (the table's β) and $N$ clamped to at least 1. The focal factor $(1 - p)^{\gamma}$, $\gamma = 2$, shrinks the loss of
# images the model already classifies confidently; over a batch $B$,
#
# $$
# \mathcal{L}_{\text{CB-focal}}(\theta; B) = -\frac{1}{|B|} \sum_{i \in B}
#   w_{y_i} \big(1 - p_\theta(y_i \mid x_i)\big)^{\gamma} \log p_\theta(y_i \mid x_i) .
# $$ (eq-dg-focal)
#
# With $\gamma = 0$ and all $w_k = 1$ it is the cross-entropy of every other row.
#
# **Domain-specific features.** `DGNet` puts a projection head (two linear layers) on the
# backbone's pooled features; its output, normalised to $\lVert z_i \rVert_2 = 1$, enters
# the supervised contrastive loss ({term}`SupCon`, Khosla et al. 2020) with one view per
# image. With $s_{ij} = z_i^{\top} z_j / \tau$, the positives of anchor $i$ are the other
# images of its class in the batch, $P(i) = \{p \neq i : y_p = y_i\}$, whatever their
# domain, and $A$ is the set of anchors that have at least one:
#
# $$
# \mathcal{L}_{\text{SupCon}} = \frac{1}{|A|} \sum_{i \in A} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
#   \log \frac{e^{s_{ip}}}{\sum_{a \neq i} e^{s_{ia}}},
# \qquad
# \mathcal{L} = \mathcal{L}_{\text{CE}} + \lambda \, \mathcal{L}_{\text{SupCon}} ,
# $$ (eq-dg-supcon)
#
# with $\tau = 0.1$ and $\lambda$ = `supcon_weight` (parameters cell). The batches mix the
# training domains, so a class's positives come from several hospitals; `supcon_loss` can
# restrict them to other domains (`cross_domain=True`), which `train_dg` does not use.

# %% tags=["remove-input"]
show_source(dg.sample_weights, dg.class_balanced_weights, dg.focal_loss, dg.DGNet.forward, dg.supcon_loss)

# %% [markdown]
# **Feature statistics.** {term}`TTA-BN` ({term}`AdaBN`) keeps every weight and replaces the
# running mean and variance of each {term}`batch normalization` layer by those of the
# target images. `dg.adapt_bn` passes the target images through a copy of the model in
# training mode, in $M$ batches $B_1, \dots, B_M$ of at most 128, with the running
# averages reset and `momentum=None`, so each layer ends with the plain average over
# batches of its channel's batch mean and (unbiased) batch variance, taken over images and
# positions:
#
# $$
# \mu \leftarrow \frac{1}{M} \sum_{m=1}^{M} \mu(B_m), \qquad
# \sigma^2 \leftarrow \frac{1}{M} \sum_{m=1}^{M} \sigma^2(B_m) ,
# $$ (eq-dg-adabn)
#
# and then predicts with $\operatorname{BN}(h) = \gamma (h - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta$
# as in the notation. A TTA-BN row adapts once per held-out domain, on all of its
# images; for the headline rule it adapts on each training domain's validation images
# separately (`dg.predict_per_domain`). *Domain-wise BN* in training (the combined row)
# sorts each batch by domain and passes each domain's share through the network on its
# own, so BatchNorm normalises every hospital with its own batch statistics there too.
#
# {term}`SWA` averages the weights $\theta_e$ after each epoch $e$ from the second on (the
# single epoch's weights under a one-epoch profile such as `smoke`), and then re-estimates the average's
# BatchNorm statistics on the training images by the same rule {eq}`eq-dg-adabn`:
#
# $$
# \theta_{\text{SWA}} = \frac{1}{E - 1} \sum_{e=2}^{E} \theta_e .
# $$ (eq-dg-swa)

# %% tags=["remove-input"]
show_source(dg._reestimate_bn, dg.adapt_bn)

# %% tags=["remove-input"]
show_source(experiment.recipes, experiment.lodo)

# %% [markdown]
# ## The leave-one-domain-out table
#
# Macro-F1 over the four shared classes on each held-out domain, and its mean over the
# three folds (the number the paper's setting asks for). The last column is the
# validation macro-F1 on the *training* domains (mean over folds): what the headline rule
# sees. The headline row is marked in green. Written out, with $\mathcal{M}$ the rows and
# $\mathcal{M}_{\text{test}}$ the two combined rows (designed on held-out scores), the rule
# is the validation analogue of {eq}`eq-dg-lodo`:
#
# $$
# m^\star = \arg\max_{m \in \mathcal{M} \setminus \mathcal{M}_{\text{test}}} \
#   \frac{1}{|\mathcal{D}|} \sum_{d \in \mathcal{D}}
#   \text{macro-F1}\Big(f^{m}_{\theta^{(-d)}};\ \bigcup_{d' \neq d} S^{d'}_{\text{val}}\Big) .
# $$ (eq-dg-headline)

# %%
scores, order, per_fold, acc, val_mean = (res[k] for k in ("scores", "order", "per_fold", "acc", "val_mean"))
best, erm_f1, best_f1, predictions = res["best"], res["erm_f1"], res["best_f1"], res["predictions"]
DESIGNED_ON_HELDOUT, HEADLINE_RULE = experiment.DESIGNED_ON_HELDOUT, experiment.HEADLINE_RULE
lodo = res["lodo"].copy()
lodo.index = [f"{m} (selected on test)" if m in DESIGNED_ON_HELDOUT else m for m in lodo.index]
display(lodo.style.format("{:.1%}").apply(
    lambda r: ["background-color: #d4edda" if r.name == best else "" for _ in r], axis=1))
if len(seeds) > 1:
    sd = scores.groupby(["method", "seed"])["macro_f1"].mean().groupby("method").std().reindex(order)
    display(Markdown("Std over seeds of the mean held-out macro-F1: " +
                     ", ".join(f"{m} {v:.1%}" for m, v in sd.items())))
bccd_acc = acc.loc[best, "bccd"]
top_test = per_fold["mean"].idxmax()
display(Markdown(
    f"Headline row (rule: {HEADLINE_RULE}): **{best}**, validation macro-F1 {val_mean[best]:.1%}; "
    f"mean held-out macro-F1 **{best_f1:.1%}** vs ERM-BN **{erm_f1:.1%}** "
    f"(**{100 * (best_f1 - erm_f1):+.1f} points**); held-out BCCD accuracy **{bccd_acc:.1%}**. "
    + ("It is also the row with the highest held-out score." if top_test == best else
       f"The highest held-out score belongs to {top_test} ({per_fold.loc[top_test, 'mean']:.1%}); "
       "picking it by that score would be selection on test, so it is reported, not used.")))
rho = val_mean.corr(per_fold["mean"].reindex(val_mean.index), method="spearman")
display(Markdown(
    f"How good a guide is the training domains' validation score? Across the {len(val_mean)} rows, its "
    f"rank correlation with the held-out score is Spearman ρ = **{rho:+.2f}**: "
    + ("it ranks the rows much as the new hospitals do." if rho >= 0.5 else
       "it says little about which row will do best on a hospital it has not seen. Validation images "
       "from the training hospitals share their stain, scale and optics; a held-out *training* domain "
       "(leave one training domain out for validation, inside each fold) would be a closer proxy, and "
       "is the next step for this chapter.")))

# %%
TARGETS = {"ci": 0.75, "smoke": 0.75, "reference": 0.85, "full": 0.85}
DG_CLAIMS = load_claims()["papers"]["umer2023imbalanced"]
tsutsui = max((a for a in DG_CLAIMS["anchors"] if a["id"].startswith("tsutsui_bccd")), key=lambda a: a["value"])
gap = best_f1 - TARGETS[profile]
display(Markdown(
    f"Targets under `{profile}`, judged on the headline row ({best}): mean held-out macro-F1 ≥ "
    f"{TARGETS[profile]:.2f}: **{'met' if gap >= 0 else f'missed by {-gap:.2f}'}**; at least +10 points "
    f"over ERM-BN: **{'met' if best_f1 - erm_f1 >= 0.10 else 'missed'}**; held-out BCCD accuracy above "
    f"the best Tsutsui anchor ({tsutsui['statement']}: {tsutsui['value']:.1%}): "
    f"**{'yes' if bccd_acc > tsutsui['value'] else 'no'}** ({bccd_acc:.1%})."))

# %%
f1 = per_fold["mean"]
tta_gain = f1["ERM-BN + TTA-BN"] - f1["ERM-BN"]
piece_gain = {m: f1[m] - f1["ERM-BN"] for m in ["ERM-GN", "CB sampling + CB focal", "stain aug + scale norm",
                                                  "SupCon", "ERM-BN + SWA"]}
display(Markdown(
    f"Measured in this build: TTA-BN adds **{100 * tta_gain:+.1f} points** to ERM-BN; the single "
    "training-time pieces add " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in piece_gain.items()) +
    " points."
    + (f" Against ERM-BN *with* TTA-BN (the fair baseline for a transductive headline row), {best} is "
       f"**{100 * (best_f1 - f1['ERM-BN + TTA-BN']):+.1f} points**."
       if best.endswith("TTA-BN") and best != "ERM-BN + TTA-BN" else "")))

# %% [markdown]
# What the table says, and what it does not (every statement below is computed from the
# rows above, in this build):

# %%
def top_class(method, held):
    return experiment.top_class(predictions, seeds, method, held)


erm_val = val_mean["ERM-BN"]
gn_top = {h: top_class("ERM-GN", h) for h in DOMAINS}
heldout_counts = {h: parts[h, "heldout"]["label"].value_counts() for h in ("bccd", "zheng")}
rare = {h: int(c.reindex(SHARED).fillna(0).min()) for h, c in heldout_counts.items()}
trainers = [m for m in piece_gain if m not in ("ERM-BN + SWA",)]
largest = max(trainers, key=piece_gain.get)
one_seed = len(seeds) == 1
bullets = [
    f"**Does plain training transfer?** ERM-BN scores {erm_val:.1%} macro-F1 on the training domains' "
    f"validation images and {erm_f1:.1%} on the held-out hospital ({100 * (erm_f1 - erm_val):+.1f} points): "
    + ("the in-domain number says little about the next hospital." if erm_val - erm_f1 > 0.15 else
       "here the drop is small."),
    f"**BatchNorm statistics.** Re-estimating them on the new hospital's unlabelled images (TTA-BN) "
    f"changes ERM-BN by {100 * tta_gain:+.1f} points"
    + (f", more than any training-time piece (largest: {largest}, {100 * piece_gain[largest]:+.1f})."
       if tta_gain > max(piece_gain[m] for m in trainers) else
       f"; the largest training-time piece, {largest}, changes it by {100 * piece_gain[largest]:+.1f}.")
    + " TTA-BN needs a batch of unlabelled images from the target hospital (`leukemia-core predict --adapt-bn`).",
    "**Training-time pieces** against ERM-BN: " + ", ".join(
        f"{m} {100 * piece_gain[m]:+.1f}" for m in trainers) + " points. " +
    ("With one seed per row under this profile, differences of a few points cannot be told from "
     "seed noise; `full` runs three seeds." if one_seed else
     "The standard deviation over seeds is printed under the table."),
    "**The GroupNorm row**: its most-predicted class per held-out domain is " + ", ".join(
        f"{h}: {c} ({v:.0%} of predictions)" for h, (c, v) in gn_top.items()) +
    ". It keeps ImageNet convolutions trained *with* BatchNorm; Tsutsui et al.'s GroupNorm "
    "advantage was with a network pretrained with GroupNorm.",
    f"**Small held-out domains.** The rarest shared class has {rare['bccd']} images in BCCD and "
    f"{rare['zheng']} in Zheng (all their images are held out): a handful of errors moves macro-F1 "
    "by points.",
]
display(Markdown("\n".join(f"- {b}" for b in bullets)))

# %% [markdown]
# Is the headline row better than guessing? The reference is a classifier that draws its
# prediction uniformly at random among the model's classes, scored by the same
# {eq}`eq-dg-macro-f1` on the same held-out images (no model involved).

# %%
chance = res["chance"]
near_chance = best_f1 < chance + 0.10
vs_chance = ("below random guessing" if best_f1 < chance else "close to random guessing" if near_chance
             else "above random guessing")
display(Markdown(
    f"Random guessing among the {len(CLASSES)} classes: mean held-out macro-F1 **{chance:.1%}**. The headline "
    f"row {best}: **{best_f1:.1%}** on the held-out hospitals, {val_mean[best]:.1%} on the training hospitals' "
    "validation images. " + (
        f"**On new hospitals the headline row is {vs_chance}: it fails there.** " + (
            "Its validation score shows that it has learned the classes in the hospitals it saw; on a hospital "
            "with another stain, scale and framing its features fall where one class wins most votes."
            if val_mean[best] >= 0.5 else
            "Its validation score is low as well: at this profile's sizes the model has hardly learned the "
            "classes, so the shift is not the only cause.") +
        " Its most-predicted class per held-out domain: " + ", ".join(f"{h}: {c} ({v:.0%} of predictions)"
                                        for h, (c, v) in ((h, top_class(best, h)) for h in DOMAINS)) +
        f". The best held-out row of the table, {top_test} ({per_fold.loc[top_test, 'mean']:.1%}"
        + (", selected on test" if top_test in DESIGNED_ON_HELDOUT else "") +
        "), shows how much of that the remedies recover at these sizes."
        if near_chance else
        "It is clearly above guessing; the distance between its two scores is what the shift costs.")))

# %% [markdown]
# ## How far could it go? The in-domain ceiling
#
# The target is a number about the *shift*, but these domains are also small, and the
# model is fine-tuned at small size for a few epochs. To separate the two, the headline
# row's recipe is trained on each domain's **own** training split (PBC capped as above),
# its epoch chosen on that domain's validation split, and tested on that domain's **test
# split**, scored the way the row is used (with the same TTA-BN step if it has one). The
# LODO models are scored again on exactly those test images (they saw none of that
# domain). The ratio says how much of the in-domain performance survives the move to a
# new hospital.

# %% tags=["remove-input"]
show_source(experiment.in_domain_ceiling)

# %%
ceiling = res["ceiling"]
display(ceiling.style.format({c: "{:.1%}" for c in ceiling.columns if c not in ("test images", "train s")}
                             | {"test images": "{:.0f}", "train s": "{:.0f}"}))
display(Markdown(
    f"Mean in-domain macro-F1 of {best} under `{profile}`: **{ceiling.loc['mean', 'in-domain macro-F1']:.1%}**; "
    f"its leave-one-domain-out models keep **{ceiling.loc['mean', 'share of ceiling']:.0%}** of it on "
    f"the same test images. A cross-domain target above the in-domain ceiling cannot be met by any "
    f"domain-generalisation method at these sizes; below it, the gap is what the shift costs."))

# %%
display(Markdown("The in-domain scores rest on " + ", ".join(
    f"{d}: {int(ceiling.loc[d, 'test images'])} test images" for d in DOMAINS) +
    " (see the split table above for the classes); the small ones move by several points with the seed."))

# %% [markdown]
# ## The model for a new hospital: trained on every domain
#
# Leave-one-domain-out *estimates* how a recipe does on a hospital it has never seen. The
# model a lab would use should learn from every hospital the book has: one recipe trained
# on the training splits of all four domains (PBC, BCCD, Zheng and Matek's neutrophils),
# its epoch chosen on all their validation splits. Which recipe? Here the LODO folds serve
# as **leave-one-domain-out cross-validation** (the model-selection method of
# {cite:t}`gulrajani2021domainbed`): each LODO model is scored on its held-out domain's
# *training and validation* images (never on a test split, so every domain's test split
# stays untouched for this model's own test), and the row with the highest mean is chosen,
# the combined rows excepted. It answers "which recipe generalises to a domain it has not
# seen?" more directly than the training domains' validation score of the headline rule.
# Scored on each domain's own test split (as the row is used) the numbers below are
# **in-domain**, an upper bound for a new hospital; the held-out column of the LODO table
# is the estimate for one.

# %% tags=["remove-input"]
show_source(experiment.all_domains_model)

# %%
cv_mean, deploy = res["cv_mean"], res["deploy"]
display(Markdown(
    f"LODO-CV chooses **{deploy}** (mean LODO-CV macro-F1 {cv_mean[deploy]:.1%}; the headline rule chose {best}). "
    "Rows by LODO-CV: " + ", ".join(f"{m} {v:.1%}" for m, v in cv_mean.drop(list(DESIGNED_ON_HELDOUT))
                                    .sort_values(ascending=False).items()) + "."))
alld = res["all_domains"]
display(alld.style.format({"test images": "{:.0f}"} | {c: "{:.1%}" for c in alld.columns if c != "test images"},
                          na_rep="–"))
display(Markdown(
    f"All-domains model ({deploy}) under `{profile}`: mean in-domain macro-F1 over PBC, BCCD and Zheng "
    f"**{alld.loc[list(DOMAINS), 'macro-F1'].mean():.1%}**, against {ceiling.loc['mean', 'in-domain macro-F1']:.1%} "
    f"for one {best} model per domain (the ceiling above); Matek neutrophils recalled "
    f"{alld.loc['matek', 'recall neutrophil']:.0%}."))

# %% [markdown]
# ## Reference models: the protocol at reference scale
#
# Everything above is trained for minutes. The **reference models** are the same protocol
# run once at larger sizes (`leukemia-core run 06_domain_generalization --profile reference`:
# PBC's training split capped at 600 images per class instead of 60, every other image,
# 12 epochs; the sizes are in `leukemia_core/config.py`, fixed before the run, and in each
# model card). The headline row is chosen by the same rule, on the training domains'
# validation splits of that run. Committed with a SHA-256 manifest: ERM-BN and the
# headline row without each domain (six models) and the all-domains model, **evaluated
# live here** on the held-out domain, or on every domain's test split. The targets
# (`experiment.TARGET_MEAN_F1` for the mean held-out macro-F1 and `experiment.TARGET_GAIN`
# over ERM-BN, from issue 22) were fixed before the run. Without `--checkpoint`, `leukemia-core predict` and `leukemia-core
# evaluate --images` use the all-domains reference model.

# %% tags=["remove-input"]
show_source(experiment.save_models)

# %%
from leukemia_core.reproducibility.reference import capped_note, test_per_class

per_class = test_per_class(profile)  # None: the whole held-out sets (every profile but smoke)
ref = experiment.evaluate_reference(data_root=data_root, results_dir=results_dir, per_class=per_class)
if per_class:
    display(Markdown(capped_note(profile, per_class)))
ref_rows = pd.DataFrame(ref["rows"])
display(ref_rows.drop(columns=[c for c in ("message", "wall s") if c in ref_rows])
        .style.format({"macro-F1": "{:.3f}", "accuracy": "{:.1%}", "test images": "{:.0f}"}, na_rep="–")
        .hide(axis="index"))
not_ok = [c for c in ref["checks"] if c["status"] != "verified"]
if not_ok:
    display(Markdown(f":::{{admonition}} {len(not_ok)} of {len(ref['checks'])} reference models not "
                     f"available\n:class: warning\n" + "\n".join(f"- `{c['name']}`: {c['status']}" for c in not_ok)
                     + f"\n\n{not_ok[0]['message']}\n:::"))
ref_found = experiment.reference_findings(ref)
display(Markdown(ref_found["sentences"]["lodo"] + "\n\n" + ref_found["sentences"]["all_domains"]))
if ref_found["folds"] is not None:
    display(ref_found["folds"].style.format("{:.3f}"))
if ref_found["selection"] is not None:
    display(Markdown("How the reference run chose its headline row: every row's validation macro-F1 on the "
                     "training domains (what the rule sees) and its held-out macro-F1 (from the run itself, "
                     "shown, never used to choose). The combined rows were designed on held-out scores and "
                     "cannot be chosen."))
    display(ref_found["selection"].style.format("{:.3f}"))

# %% [markdown]
# ## Per-class recall
#
# Macro-F1 hides *which* classes fail. Recall per class on each held-out domain
# (basophil where the domain has any: PBC only in number; BCCD has 3, Zheng 1).

# %%
rec_cols = [c for c in scores.columns if c.startswith("recall ")]
recall = scores.groupby(["method", "held out"], sort=False)[rec_cols].mean()
display(recall.style.format("{:.0%}", na_rep="–"))

# %% [markdown]
# ## Anchors, and how they differ from this protocol
#
# No published number is on exactly this protocol; the anchors set the scale only.

# %%
anchors = pd.DataFrame(
    [(a["source"], a["statement"], "", a["metric"], a["value"]) for a in DG_CLAIMS["anchors"]] + [
    ("this chapter", "train PBC + Zheng, test BCCD crops (all)", "ERM-BN", "accuracy", acc.loc["ERM-BN", "bccd"]),
    ("this chapter", "train PBC + Zheng, test BCCD crops (all)", best, "accuracy", bccd_acc),
    ("this chapter", "LODO over PBC / BCCD / Zheng, mean", "ERM-BN", "macro-F1", erm_f1),
    ("this chapter", "LODO over PBC / BCCD / Zheng, mean", best, "macro-F1", best_f1),
], columns=["source", "protocol", "model", "metric", "value"])
anchors["value"] = [f"{v:.1%}" if isinstance(v, float) else v for v in anchors["value"]]
display(anchors)

# %% [markdown]
# Differences that matter: Tsutsui et al. train on Raabin (Iran), a domain not in the
# mirror, with five classes, at 224 px and from ImageNet weights, and report accuracy;
# here BCCD is tested after training on PBC and Zheng, at 64-pixel inputs (under `ci`)
# on a CPU budget. SADA's ERM numbers come from its own domain set (including Matek-19 and
# Acevedo-20). {cite:t}`umer2023imbalanced` report macro-F1 on their three domains,
# one of them private; their exact losses are described only in outline.
#
# ## Which of our pieces correspond to the paper's ideas
#
# - *Imbalance across domains*: the paper weights the loss against the class imbalance
#   that differs per domain. Our CB sampling (equal share per **domain × class** cell)
#   plus the effective-number focal loss is that idea in its standard public form.
# - *Domain invariance*: the paper's second loss aligns features of a class across
#   domains. Our supervised contrastive term over mixed-domain batches does this
#   directly, as SADA does; we chose it because it needs no domain discriminator and
#   no extra hyperparameters beyond a weight and a temperature.
# - Stain augmentation, scale normalisation, SWA and TTA-BN are not in the paper; they
#   target the shifts this chapter measured above.

# %% [markdown]
# ## Predicting a folder of unseen images
#
# `leukemia_core.predict.predict_folder` takes a checkpoint and any folder of single-cell
# images (any size, any source) and applies the checkpoint's own preprocessing,
# including the scale normalisation. Here: the combined model trained without BCCD, on a
# folder of BCCD crops and Matek images of different sizes.

# %%
def shown(path: Path):
    """A path as the reader types it: relative to the repository when it lies inside."""
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


ckpt = res["ckpt"]  # the combined model trained without BCCD, under <artifacts>/<profile>/dg_combined_without_bccd/
display(experiment.predict_demo(ckpt, parts).round(3))
display(Markdown(f"From the command line: `leukemia-core predict --images FOLDER --checkpoint "
                 f"{shown(ckpt.parent)} --out predictions.csv [--adapt-bn]`. `--adapt-bn` re-estimates "
                 "the BatchNorm statistics on the folder (TTA-BN): use it for a folder of many "
                 "cells from one new hospital, not for a handful of images."))

# %% [markdown]
# ## Try it on your hospital
#
# `leukemia-core evaluate --images DIR` scores a checkpoint on any labelled folder laid out
# one subfolder per class. Folder names are matched to the model's classes through a table
# of synonyms (printed), classes the model lacks are reported and left out of macro-F1, an
# unreadable image is listed in an `error` column instead of stopping the run, and the
# output folder opens in the prediction explorer (`make explore RUN=OUTDIR`). Below, the
# model trained without BCCD is scored on BCCD's crops, saved under a hospital's own class
# names, once as it is and once with `--adapt-bn` (BatchNorm statistics from the folder).

# %%
hospital = experiment.hospital_demo(ckpt, parts["bccd", "heldout"])  # class folders: experiment.HOSPITAL_NAMES
m = hospital[True]
display(Markdown(
    f"`leukemia-core evaluate --images my_hospital/ --checkpoint {shown(ckpt.parent)} "
    f"--out eval/ --adapt-bn` on {m['n_images']} BCCD crops: class mapping "
    + ", ".join(f"'{k}' → {v}" for k, v in m["mapping"].items())
    + f"; macro-F1 over the shared classes **{hospital[False]['macro_f1']:.1%}** as it is, "
    f"**{m['macro_f1']:.1%}** with `--adapt-bn`. This is one held-out fold of this chapter's "
    "own data; on hospitals outside the repository expect numbers of the order of the held-out "
    "column of the LODO table above, not of the training domains' validation scores. Without "
    "`--checkpoint` the command uses the all-domains reference model (section above), the book's "
    "model for a hospital it has never seen."))

# %% [markdown]
# ## Results file
#
# One JSON per method under `results/<profile>/dg_<method>.json`, with the per-fold
# scores, per-class recall, the Matek probe and the segmentation check.

# %%
display(Markdown(f"Wrote {len(res.results)} results files to `{res['results_folder']}`; chapter time "
                 f"{(time.perf_counter() - CHAPTER_START) / 60:.1f} min."))

# %% [markdown]
# ## Exercises
#
# ::::{exercise}
# :label: ex-dg-supcon-off
# Set `supcon_weight = 0.0` in the parameters cell and re-run the chapter (under `smoke`
# with `results_dir` and `artifacts` pointing to a scratch folder, it takes minutes).
# Before you run it: which rows of the leave-one-domain-out table should change, and what
# should the SupCon row become? After it: compare `dg_supcon.json` with `dg_erm_bn.json`
# (per fold: held-out macro-F1, accuracy, validation macro-F1), and look at which row the
# headline rule {eq}`eq-dg-headline` picks.
# ::::
#
# ::::{solution} ex-dg-supcon-off
# :class: dropdown
# With $\lambda = 0$, {eq}`eq-dg-supcon` is the plain cross-entropy, and the SupCon recipe
# differs from ERM-BN in nothing else: the same seed for the weights of the head and for
# the sampler's generator, the same images and augmentations, the same projection head
# (which receives no gradient in either), the same epoch rule. So the SupCon row must
# reproduce ERM-BN's row fold by fold (ERM-BN's SWA and TTA-BN rows are variants of the
# same trained model and are not affected). The two combined rows change, since they lose
# their contrastive term. If SupCon was the headline, it now ties with ERM-BN on
# validation, and `idxmax` breaks the tie in favour of the row listed first, ERM-BN.
# This is the control that makes every "piece minus ERM-BN" difference of the chapter
# mean something: two rows that differ only in the piece. On a CPU the match is exact;
# on a GPU, non-deterministic kernels can make the two runs differ slightly, and
# differences between rows of that size are noise.
# ::::
#
# ::::{exercise}
# :label: ex-dg-cb
# (a) From {eq}`eq-dg-cb-weights`, show that $E_N \approx N$ when $N (1 - \beta)$ is small and
# that $E_N$ tends to $1/(1-\beta)$ as $N$ grows. What do the weights $w_k$ become in the
# limits $\beta \to 0$ and $\beta \to 1$? (b) The CB row uses the sampler {eq}`eq-dg-sampler`
# *and* the weights, and the weights are computed from the training counts $N_k$ *before*
# sampling. Take a fold with two domains, a common class with many images in both and a
# rare class with a few images in one domain only. In expectation, what share of the
# drawn images does each class get, and how does the weight change the rare class's share
# of the loss? Is the rare class corrected once, or twice?
# ::::
#
# ::::{solution} ex-dg-cb
# :class: dropdown
# (a) $1 - \beta^{N} = 1 - e^{N \log \beta} \approx -N \log \beta \approx N (1 - \beta)$ for
# small $N(1-\beta)$, so $E_N \approx N$; as $N \to \infty$, $\beta^N \to 0$ and
# $E_N \to 1/(1-\beta)$. With $\beta \to 0$, $E_N = 1$ for every $N \ge 1$: all weights equal
# 1 (no reweighting). With $\beta \to 1$, $E_N \to N$ for every finite $N$: the weights become
# inverse class frequencies, rescaled to mean 1. In between, classes beyond a few hundred
# images are treated almost alike, which is the point of the effective number. (b) The
# sampler gives each (domain, class) cell the same probability: with three non-empty cells
# (common class in two domains, rare class in one), the common class gets two thirds of the
# draws and the rare class one third, far more than its share of the images. The weights,
# computed from the unsampled counts, then multiply the rare class's loss by a further
# factor $E_{N_{\text{common}}} / E_{N_{\text{rare}}}$, so its share of the loss grows beyond
# its share of the draws: corrected twice. The balanced sampler alone (or the weights
# alone) is the standard form; using both pushes the model towards predicting the rare
# classes. Look for it in the recall table (rare classes' recall up, neutrophil's down) and
# in the CB row's accuracy on the neutrophil-dominated BCCD and Zheng.
# ::::
#
# ::::{exercise}
# :label: ex-dg-adabn
# (a) Why does `leukemia-core predict --adapt-bn` warn against a folder of a handful of
# images, and what goes wrong if a folder mixes two hospitals? (b) {eq}`eq-dg-adabn`
# averages the *per-batch* variances. Show that when the target images come in several
# batches, this is not the variance of all target images pooled, and say which one is
# smaller. (c) Why does the headline rule score a TTA-BN row with its statistics
# re-estimated on each training domain's validation images separately
# (`dg.predict_per_domain`), not on all validation images at once?
# ::::
#
# ::::{solution} ex-dg-adabn
# :class: dropdown
# (a) With few images, $\mu$ and $\sigma^2$ are noisy estimates and depend on which cells
# happen to be in the folder (a folder of neutrophils has other statistics than a mixed
# one), so the adapted network sees shifted features; with two hospitals, the statistics
# are a mixture that matches neither, and the normalisation removes neither shift. (b) By
# the law of total variance, the pooled variance is the mean of the within-batch variances
# plus the variance of the batch means. {eq}`eq-dg-adabn` keeps only the first term, so it
# is the smaller one whenever the batch means differ (the order of the images matters:
# a folder sorted by class gives batches with different means). With one batch the two
# agree, up to the unbiased correction. (c) On a new hospital, TTA-BN adapts to that
# hospital alone. Adapting on the joined validation images would normalise with a mixture
# of the training hospitals, which is what the running statistics already are; scoring
# the row as it will be used keeps the rule honest about the row.
# ::::
#
# ::::{exercise}
# :label: ex-dg-selection
# The combined recipe's rows are excluded from the headline rule, and the chapter reports
# the rank correlation between validation and held-out scores across rows. (a) If the
# chapter reported the row with the highest *held-out* score, which quantity would that
# number estimate, and why is it biased upwards even when every row is equally good?
# (b) Design a validation score closer to a new hospital, using only the training domains
# of each fold, and count how many more trainings it costs per seed with this chapter's
# folds and recipes.
# ::::
#
# ::::{solution} ex-dg-selection
# :class: dropdown
# (a) The maximum over rows of noisy estimates: even if all rows had the same expected
# held-out score, the largest of several noisy scores exceeds that expectation (the
# winner's curse), and the more rows are compared, the larger the bias. It estimates
# neither the chosen row's performance on a new hospital nor anything fixed in advance;
# this is selection on test, the same leak that makes the combined recipe's number
# optimistic. (b) Leave one *training* domain out inside each fold: with two training
# domains per fold, train on one, validate on the other, and swap, then average the two
# validation scores. Each fold's recipe needs two extra trainings (one per inner
# held-out domain): per seed, 3 folds × 6 recipes × 2 inner runs on top of the table's
# 3 × 6, three times the training in all. Each inner model also sees a single training
# domain, less data than the fold's model: the price of a validation score that has met a
# shift.
# ::::

# %% tags=["remove-input"] mystnb={"markdown_format": "myst"}
vs_erm = f"{erm_f1:.3f} for ERM-BN and " if best != "ERM-BN" else ""
display(Markdown(f""":::{{admonition}} Takeaways
:class: important takeaways
- **Judge a hospital model on hospitals it has not seen.** Chosen by validation only, the headline
  row is {best}: its mean held-out macro-F1 is {best_f1:.3f}, against {vs_erm}{chance:.3f} for random
  guessing ({vs_chance}), while the same row scores {val_mean[best]:.3f} on the training hospitals'
  validation images.
- **Validation on the training hospitals {'ranks the rows reasonably' if rho >= 0.5 else 'is a poor guide'}**:
  Spearman ρ = {rho:+.2f} between the validation and held-out scores of the {len(val_mean)} rows.
- **{'Feature statistics carry much of the shift' if tta_gain > piece_gain[largest] else
     'A training-time piece does more than the feature statistics'}.** Re-estimating BatchNorm's $\\mu, \\sigma^2$ on the new
  hospital's unlabelled images changes ERM-BN by {100 * tta_gain:+.1f} points; the largest single
  training-time piece, {largest}, by {100 * piece_gain[largest]:+.1f}.
- **{'Most of the gap is the shift, not the small model' if ceiling.loc['mean', 'share of ceiling'] < 0.5
     else 'Much of the in-domain performance survives the move'}.** The headline recipe reaches {ceiling.loc['mean', 'in-domain macro-F1']:.3f}
  macro-F1 inside each hospital; its leave-one-domain-out models keep
  {ceiling.loc['mean', 'share of ceiling']:.0%} of that on the same test images.
- **A number chosen on test is not a result.** The combined recipe with TTA-BN reaches
  {f1['combined + TTA-BN']:.3f}, but its pieces were picked on held-out scores; the profile's target
  of {TARGETS[profile]:.2f} for the headline row is {'met' if gap >= 0 else 'missed'}.
:::"""))
