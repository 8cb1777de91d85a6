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
# # Hierarchical leukemia classification
#
# A haematologist does not pick one of twenty diagnoses at once. They decide whether a
# cell is normal, reactive or malignant; if malignant, whether the picture is acute or
# chronic; and only then which subtype. {cite:t}`hamdi2025hierarchy` turn that
# procedure into a model: a label taxonomy, a **base hierarchical** model made of one
# classifier per tree level, and a **multi-level** model with a shared backbone and one
# head per level whose losses are controlled level by level. On their private data
# (seven leaf classes) they report about 90% accuracy for the hierarchical model, with
# ViT-Small beating ConvNeXt-Tiny in flat classification.
#
# Their images are not public. This chapter runs the same three designs on the public
# data that exists, and then asks the question the paper does not: **what is the
# model actually recognising?** Each disease class here comes from a different
# hospital than the normal cells, so a classifier can learn the hospital and look
# like it learnt the disease ({term}`shortcut learning`). The chapter's conclusions rest
# on the shortcut analysis at the end, not on the headline accuracy.
#
# :::{admonition} Learning objectives
# :class: tip objectives
# After this chapter you can
# - write down the masked per-level {term}`cross-entropy` with per-level weights that trains
#   a multi-level model, and say which parameters each level's loss reaches;
# - turn per-level outputs into a root-to-leaf prediction by
#   {term}`path-probability decoding`, greedy top-down decoding or an independent argmax
#   per level, and explain why only the first two are always consistent with the tree;
# - compute {term}`hierarchical F1`, {term}`mistake severity` and
#   {term}`path consistency` of a set of predictions, and say what each adds to leaf
#   accuracy;
# - compare a flat, a base hierarchical and a multi-level model trained on equal terms,
#   and a CNN with a ViT at an equal budget;
# - use a background-only probe and within-source contrasts to tell a model that
#   recognises a disease from one that recognises a hospital.
#
# **Prerequisites:** chapters {doc}`02_data` (the datasets and their committed splits)
# and {doc}`03_baseline` (the training engine, {term}`fine-tuning <fine-tuning>`,
# {term}`macro-F1`), the {term}`profile` mechanism, and the vocabulary of trees (parent,
# child, leaf, depth).
# :::

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
seeds = None  # None: the profile's seeds (one under ci, three under full)
taxonomy = "leukemia"  # a bundled tree name or a YAML path
results_dir = "results"  # results JSON per model: <results_dir>/<profile>/hierarchy_*.json
artifacts = "_build/artifacts"  # checkpoints and training state: <artifacts>/<profile>/hierarchy/

# %%
import time

import pandas as pd
import torch
from IPython.display import Markdown, display

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.experiments import hierarchy as experiment
from leukemia_core.hierarchy import HierarchicalTask, LevelCodec, MultiLevelNet, hierarchical_metrics
from leukemia_core.plots import (confusion_matrix_figure, image_grid, learning_curves, show_source, tree_figure,
                                 use_offline_plotly)

use_offline_plotly()
CHAPTER_START = time.perf_counter()
#: The whole protocol runs here (leukemia_core/experiments/hierarchy.py): every model of the
#: chapter is trained and scored, and the results JSONs are written; the cells below read `res`.
#: Sizes per profile come from leukemia_core/config.py (CHAPTER_SIZES): the code path is the same.
res = experiment.run(profile, seeds=seeds, data_root=data_root, out=REPO_ROOT / artifacts / profile,
                     results_dir=results_dir, seed=seed, taxonomy=taxonomy)
o = res.objects
SIZES, P, PS, seeds, CNN, VIT, BACKBONE = (o[k] for k in ("sizes", "P", "PS", "seeds", "cnn", "vit", "backbone"))
tax, codec, table, data, levels = (o[k] for k in ("tax", "codec", "table", "data", "levels"))
test_table, true_leaves, runs = o["test_table"], o["true_leaves"], o["runs"]
print(f"profile {P.name}: hierarchy models {BACKBONE} (ImageNet) at {P.image_size}px, {SIZES['epochs']} epochs, "
      f"train cap {SIZES['train_cap']}/leaf; from scratch {CNN} vs {VIT} at {PS.image_size}px, "
      f"{SIZES['scratch_epochs']} epochs; seeds {seeds}")

# %% [markdown]
# ## The taxonomy, as data
#
# The tree lives in `leukemia_core/data/taxonomies/leukemia.yaml`; the code reads any tree
# (the tests run it on a toy one). A leaf names its image sources as `dataset:label`.
# **CML and CLL stay in the tree without images**: no public single-cell image set of
# either exists, so no model here can learn them, and none is faked. They are drawn
# grey and never decoded. Hover a node for its sources and image count.

# %%
tree_figure(tax, experiment.node_counts(tax, table),
            title=f"taxonomy '{tax.name}': {len(tax.data_leaves)} leaves with images").show()
display(table.groupby(["label", "dataset", "split"]).size().unstack(fill_value=0))
display(Markdown(
    "Levels (a model head per level; only nodes with images): " +
    "; ".join(f"**{d + 1}**: {', '.join(level)}" for d, level in enumerate(tax.levels))))

# %%
HOSPITAL = experiment.HOSPITAL
feeds = table.groupby("dataset", sort=False)["label"].unique()
display(Markdown(
    f"{len(feeds)} sources, each from its own hospital, feed this tree: " + "; ".join(
        f"{HOSPITAL.get(d, d)} gives {', '.join(leaves)}" for d, leaves in feeds.items()) +
    ". Aria images are low-magnification fields with several cells, the others single-cell crops. "
    "Keep this in mind for every number below."))

# %% [markdown]
# ## Data for training
#
# Each source keeps its committed, deduplicated split. Under `ci` the training split is
# capped per leaf (so the big PBC classes do not drown the small ones and the chapter
# fits its time budget), and the validation and test splits are subsampled to at most
# a fixed number per leaf (`ci`: 50 and 150; `full` uses every image). The subsample is
# drawn with the run's seed, so it is the same for every model compared below.

# %%
per_leaf = data.table.groupby(["split", "label"]).size().unstack(0)[["train", "val", "test"]]
display(per_leaf)
display(Markdown(f"Every test leaf has {per_leaf['test'].min()} images." if per_leaf["test"].nunique() == 1 else
                 f"The smallest test leaf is **{per_leaf['test'].idxmin()}** with {per_leaf['test'].min()} "
                 f"images, the largest {per_leaf['test'].idxmax()} with {per_leaf['test'].max()}."))


# %% [markdown]
# ## Three models
#
# 1. **Flat**: one softmax over the leaves with images.
# 2. **Base hierarchical** (the paper's baseline): one model per level, each trained
#    only on the samples whose label reaches that level, composed at test time.
# 3. **Multi-level**: one backbone, one linear head per level. A sample's loss at a
#    level counts only if its label reaches that level (a neutrophil has no acute/chronic
#    target). Each level's loss has its own weight, and a head's parameters receive only
#    the gradient of their own level's loss; the backbone receives the weighted sum
#    (`leukemia_core.hierarchy.HierarchicalTask`, tested in `tests/test_hierarchy.py`).
#
# All three fine-tune the same ImageNet-pretrained EfficientNet-Lite0 (the only ImageNet
# image weights available offline) with the book's engine (AdamW, cosine schedule,
# model selection on validation macro-F1), the same epochs and the same images. The
# CNN-versus-ViT question, where no pretrained weights exist for either side, follows
# in its own section, from scratch and at equal budget.
#
# ```{graphviz}
# :caption: The multi-level model and its decoder. One backbone feeds one linear head per level of the tree (the sizes are those of the bundled leukemia tree, whose levels hold only nodes with images). In training, LevelCodec turns each leaf label into one target per level and HierarchicalTask sums the masked per-level losses; at test time the decoder reads each head as probabilities among siblings and picks the leaf with the most probable path. The base hierarchical model replaces the shared backbone by one network per level (MultiLevelNet with a single head, trained on the images whose label reaches that level) and concatenates their outputs (compose_levels) before the same decoder.
# digraph multilevel {
#   rankdir=LR; node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];
#   edge [fontname="Helvetica", fontsize=9];
#   x [label="image x\n3 × H × W"];
#   backbone [label="backbone g_φ\nefficientnet_lite0 (ImageNet),\nclassifier removed"];
#   drop [label="features h = g_φ(x)\n1280-d, dropout (rate 0)"];
#   subgraph cluster_heads { label="MultiLevelNet.heads: one nn.Linear per level"; fontname="Helvetica"; fontsize=10;
#     h1 [label="head 1: K₁ = 3\nnormal, reactive, leukemia"];
#     h2 [label="head 2: K₂ = 7\n5 leukocytes, hematogone, acute"];
#     h3 [label="head 3: K₃ = 2\nAML, ALL"];
#     h4 [label="head 4: K₄ = 3\nthree B-ALL stages"];
#   }
#   cat [label="torch.cat\nlogits, 15 = ΣK_ℓ"];
#   tree [label="taxonomy YAML\nTaxonomy, LevelCodec:\nlevel targets y^(ℓ) (−1 below a leaf),\nsibling groups, leaf paths", shape=note];
#   loss [label="HierarchicalTask.loss\nΣ_ℓ w_ℓ · masked cross-entropy_ℓ"];
#   cond [label="conditional_log_probs\nlog-softmax within siblings:\nlog p(node | parent, x)"];
#   path [label="path_log_probs\nsum along each of the\n10 data leaves' paths"];
#   pred [label="argmax leaf → its\nroot-to-leaf path"];
#   x -> backbone -> drop;
#   drop -> h1; drop -> h2; drop -> h3; drop -> h4;
#   h1 -> cat; h2 -> cat; h3 -> cat; h4 -> cat;
#   cat -> loss [label="training"];
#   cat -> cond [label="test"];
#   cond -> path -> pred;
#   tree -> loss [style=dashed]; tree -> cond [style=dashed];
# }
# ```
#
# ### The loss, level by level
#
# Write $h = g_\phi(x)$ for the backbone's features and
# $f^{(\ell)}_\theta(x) = W_\ell h + b_\ell \in \mathbb{R}^{K_\ell}$ for head $\ell$'s logits,
# so $\theta = (\phi, W_1, b_1, \dots, W_L, b_L)$. In a mini-batch $B$, let
# $B_\ell \subseteq B$ be the images whose label reaches level $\ell$ (a neutrophil, at
# depth 2, is in $B_1$ and $B_2$ only). `HierarchicalTask` minimises
#
# $$
# \mathcal{L}(\theta; B) = \sum_{\ell=1}^{L} w_\ell \, \mathcal{L}_\ell, \qquad
# \mathcal{L}_\ell = -\frac{1}{|B_\ell|} \sum_{i \in B_\ell}
#   \log \operatorname{softmax}\big(f^{(\ell)}_\theta(x_i)\big)_{y_i^{(\ell)}} ,
# $$ (eq-hi-loss)
#
# with $\mathcal{L}_\ell = 0$ for a batch in which no image reaches level $\ell$. The
# softmax runs over all $K_\ell$ nodes of the level, and each level's cross-entropy is a
# mean over its own $B_\ell$, so a deep level whose images are few in the batch still
# weighs $w_\ell$. The chapter uses the default $w_\ell = 1$ for every level. Because head
# $\ell$'s parameters appear in $\mathcal{L}_\ell$ only, the gradients split as
#
# $$
# \nabla_{W_\ell, b_\ell} \mathcal{L} = w_\ell \, \nabla_{W_\ell, b_\ell} \mathcal{L}_\ell ,
# \qquad
# \nabla_{\phi} \mathcal{L} = \sum_{\ell=1}^{L} w_\ell \, \nabla_{\phi} \mathcal{L}_\ell :
# $$ (eq-hi-grad)
#
# this is the "loss control" of the multi-level model. Each head learns from its own
# level alone, and the weights $w_\ell$ decide how much each level pulls on the shared
# backbone. The base hierarchical model trains $L$ separate networks instead; network
# $\ell$ minimises $\mathcal{L}_\ell$ alone, on the training images that reach level
# $\ell$, and is selected on that level's validation macro-F1. The flat model minimises
# the plain cross-entropy over the leaves with images. The model and its loss, as the
# package defines them:

# %% tags=["remove-input"]
show_source(MultiLevelNet, HierarchicalTask.level_losses, HierarchicalTask.loss)

# %% [markdown]
# ### From level outputs to one prediction
#
# The heads give one score vector per level; a diagnosis is one leaf, reached by one
# path from the root. For a node $v$ at level $\ell$ whose parent is $u$ (the root when
# $\ell = 1$), let $\operatorname{ch}(u)$ be $u$'s children that have images. The decoder
# reads head $\ell$ as a distribution among siblings,
#
# $$
# p_\theta(v \mid u, x) = \frac{\exp f^{(\ell)}_{\theta, v}(x)}
#   {\sum_{s \in \operatorname{ch}(u)} \exp f^{(\ell)}_{\theta, s}(x)} ,
# $$ (eq-hi-cond)
#
# which is the level's full softmax of {eq}`eq-hi-loss` conditioned on the sibling set.
# A leaf $c$ with path $(c^{(1)}, \dots, c^{(\operatorname{depth}(c))} = c)$ from the root
# $c^{(0)}$ gets the product of the conditionals along its path, and
# {term}`path-probability decoding` predicts the most probable of the leaves with images
# $\mathcal{C}$:
#
# $$
# \log p_\theta(c \mid x) = \sum_{\ell=1}^{\operatorname{depth}(c)}
#   \log p_\theta\big(c^{(\ell)} \mid c^{(\ell-1)}, x\big), \qquad
# \hat{y} = \arg\max_{c \in \mathcal{C}} \log p_\theta(c \mid x) .
# $$ (eq-hi-path)
#
# Leaves sit at different depths (a neutrophil at depth 2, an ALL stage at depth 4), and a
# shallow leaf simply has fewer factors. The two other decoders are greedy:
# **top-down** picks $v_\ell = \arg\max_{s \in \operatorname{ch}(v_{\ell-1})} f^{(\ell)}_{\theta, s}(x)$
# level by level from the root, and **independent** takes each level's argmax over all
# $K_\ell$ nodes, whatever was chosen above (stopping at the first leaf), so its levels
# need not form a path. The flat model's prediction is its argmax leaf, with that leaf's
# path. Path-probability decoding in the package:

# %% tags=["remove-input"]
show_source(LevelCodec.conditional_log_probs, LevelCodec.path_log_probs)

# %% tags=["remove-input"]
show_source(experiment.fit_config, experiment.score_rows)

# %%
scores, mean = o["scores"], o["mean"]
pct = [c for c in scores.columns if "acc" in c or "F1" in c or "consistency" in c]
fmt = {**{c: "{:.1%}" for c in pct}, "mistake severity": "{:.2f}", "train min": "{:.1f}"}
display(mean.style.format(fmt))
if len(seeds) > 1:
    display(Markdown(f"Standard deviation over {len(seeds)} seeds:"))
    display(scores.groupby(["model", "decoder"], sort=False).std(numeric_only=True).drop(columns="seed")
            .style.format(fmt))

# %% [markdown]
# Reading the table. Write $A_i$ for the nodes on test image $i$'s true path (its leaf
# and the leaf's ancestors, $\operatorname{anc}(y_i)$ without the root) and $\hat{A}_i$
# for the nodes on the predicted path, over $N$ test images.
#
# - **{term}`Hierarchical F1 <hierarchical F1>`** counts the ancestors a prediction gets
#   right {cite:p}`kiritchenko2006hierarchical`. The package sums over the test set before
#   dividing (a micro-average):
#
#   $$
#   hP = \frac{\sum_{i} |A_i \cap \hat{A}_i|}{\sum_{i} |\hat{A}_i|}, \qquad
#   hR = \frac{\sum_{i} |A_i \cap \hat{A}_i|}{\sum_{i} |A_i|}, \qquad
#   hF_1 = \frac{2 \, hP \, hR}{hP + hR} .
#   $$ (eq-hi-hf1)
#
# - **{term}`Mistake severity <mistake severity>`** is the mean tree distance between the
#   true and the predicted leaf over the set $E$ of wrong predictions, the number of edges
#   from one to the other through their lowest common ancestor:
#
#   $$
#   \operatorname{dist}(y, \hat{y}) = \operatorname{depth}(y) + \operatorname{depth}(\hat{y})
#     - 2 \operatorname{depth}\big(\operatorname{lca}(y, \hat{y})\big), \qquad
#   \text{severity} = \frac{1}{|E|} \sum_{i \in E} \operatorname{dist}(y_i, \hat{y}_i) .
#   $$ (eq-hi-severity)
#
#   It is 2 for confusing siblings (two ALL stages), 4 for normal ↔ reactive, up to 6 for
#   a normal cell called ALL. Being an average over errors only, it says how bad the
#   mistakes are, not how many there are: a model with fewer but worse errors scores
#   higher (worse).
# - **{term}`Path consistency <path consistency>`** is the share of predictions that form
#   a valid root-to-leaf path,
#
#   $$
#   \text{consistency} = \frac{1}{N} \sum_{i=1}^{N}
#     \mathbb{1}\big[\hat{A}_i \text{ is a root-to-leaf path of the tree}\big] .
#   $$ (eq-hi-consistency)
#
#   The flat model and the two hierarchical decoders are consistent by construction;
#   taking each level's argmax independently is not. An inconsistent prediction counts
#   as wrong at the leaf, and its severity is measured from the last node it names.
#
# The metrics in the package:

# %% tags=["remove-input"]
show_source(hierarchical_metrics)

# %%
flat_m = mean.loc[("flat", "argmax leaf")]
ml_m = mean.loc[("multilevel", "path_probability")]
base_m = mean.loc[("base hierarchical", "path_probability")]
indep = mean.xs("independent", level="decoder")["path consistency"]
display(Markdown(
    f"Leaf macro-F1: flat **{flat_m['leaf macro-F1']:.1%}**, base hierarchical "
    f"**{base_m['leaf macro-F1']:.1%}**, multi-level **{ml_m['leaf macro-F1']:.1%}** "
    f"(path-probability decoding, {ml_m['path consistency']:.0%} path-consistent; independent "
    f"per-level argmax is {indep.min():.1%}–{indep.max():.1%} consistent). Mistake severity "
    f"{flat_m['mistake severity']:.2f} / {base_m['mistake severity']:.2f} / {ml_m['mistake severity']:.2f}."))

# %% [markdown]
# ### Flat against hierarchical
#
# The paper's message is that following the taxonomy helps: its hierarchical models
# against flat classification. The same comparison here, on leaf accuracy (the paper's
# metric), computed from the table above:

# %%
hvf = experiment.flat_vs_hierarchical(res)  # the verdict's rules: leukemia_core/experiments/hierarchy.py
leaf_acc, order, verdict, epochs_txt = hvf["leaf_acc"], hvf["order"], hvf["verdict"], experiment.epochs_txt
display(Markdown(
    f"Leaf accuracy on {len(true_leaves):,} test images: {order}. Against flat: "
    + ", ".join(f"{k} {g:+.1f} points" for k, g in hvf["gap"].items()) + f". {verdict} {hvf['noise']}"))

# %% [markdown]
# ### Where the errors are
#
# The confusion matrix of the multi-level model (path-probability decoding) over the
# leaves, rows normalised.

# %%
_, ml_logits = experiment.outputs(runs, "multilevel", seeds[0])
ml_leaf = codec.path_log_probs(codec.split(ml_logits)).argmax(1)
y_test = torch.tensor([codec.leaves.index(t) for t in true_leaves])
cm = torch.zeros(len(codec.leaves), len(codec.leaves), dtype=torch.long)
cm.index_put_((y_test, ml_leaf), torch.ones_like(y_test), accumulate=True)
confusion_matrix_figure(cm.numpy(), codec.leaves, title=f"multi-level {BACKBONE}, test split").show()

# %% [markdown]
# ## CNN or ViT?
#
# The paper finds ViT-Small better than ConvNeXt-Tiny as a flat classifier. No
# ImageNet weights exist offline for either, so this comparison trains both from
# scratch with the same recipe, images, epochs and image size: under `ci` the small
# members of each family (ConvNeXt-Atto and ViT-Tiny, whose patch shrinks at small image
# sizes), under `full` the paper's pair at full size. Parameter counts are those of the
# trained models, classification heads included.

# %%
display(o["scratch_mean"].style.format(fmt | {"params (M)": "{:.1f}"}))
cvv = experiment.cnn_vs_vit(res)
sf, vit_gap, standing, vit_patch = cvv["sf"], cvv["vit_gap"], cvv["standing"], cvv["vit_patch"]
display(Markdown(
    f"At equal budget from scratch ({PS.image_size} px, {epochs_txt(SIZES['scratch_epochs'])}, seed(s) {seeds}), the "
    f"flat {VIT} ({sf.loc[VIT, 'params (M)']:.2f} M parameters"
    + (f", {vit_patch}-pixel patches" if vit_patch else "") + f") reaches {sf.loc[VIT, 'leaf macro-F1']:.1%} "
    f"leaf macro-F1 and the flat {CNN} ({sf.loc[CNN, 'params (M)']:.2f} M) {sf.loc[CNN, 'leaf macro-F1']:.1%}: "
    f"{standing}. "
    + ("One seed: no seed-to-seed spread was measured. " if len(seeds) == 1 else
       f"Mean of {len(seeds)} seeds. ")
    + "Neither model is pretrained here, while the paper's are; this says which is ahead under this budget, "
    "not why, and not which would be ahead with pretraining."))

# %% [markdown]
# ## Shortcut analysis
#
# Every disease leaf comes from its own hospital: AML only from Munich, ALL and
# hematogones only from Tehran, normal cells (almost) only from Barcelona. Two probes
# separate "recognises the disease" from "recognises the source".
#
# **Background-only probe.** The flat model's recipe (under `ci` with fewer epochs:
# a probe only has to show what the background carries), trained and tested on images whose
# cells are painted out: each nucleus-like blob is covered by a disc of the background's
# median colour (`leukemia_core.data.masking.MaskCells`; a disc, so the hole reveals at most
# the cell's size, not its shape). Whatever this model gets right, it gets right from
# the surroundings: illumination, stain, red cells, magnification.

# %% tags=["remove-input"]
show_source(experiment.masked_datasets)

# %%
masked, probe_scores, probe_source = o["masked"], o["probe_scores"], o["probe_source"]
sample = test_table.groupby("label").head(1)
fig = image_grid([masked.datasets["test"].cache[i] for i in sample.index],
                 [f"{l}\n({d})" for l, d in zip(sample["label"], sample["dataset"])], ncols=10)

# %% [markdown]
# **Within-source contrasts.** Inside one hospital the source cannot be the cue:
#
# - Matek-19: AML myeloblast vs segmented neutrophil (same scanner, same stain);
# - Aria: benign hematogones vs the three malignant B-ALL stages (same fields, same
#   magnification).
#
# We score the multi-level model on exactly those images, every test image of the
# source (is the Matek neutrophil called normal, the Matek myeloblast leukemia?), and train a dedicated binary
# classifier per source with the same recipe, the honest estimate of how separable the
# classes are without a source cue.

# %% tags=["remove-input"]
show_source(experiment.binary_contrast, experiment.main_model_within)

# %%
contrasts, shortcut = o["contrasts"], o["shortcut"]
display(shortcut.style.format({"accuracy": "{:.1%}", "majority class": "{:.1%}"}).hide(axis="index"))
display(contrasts.style.format({"accuracy": "{:.1%}", "balanced accuracy": "{:.1%}", "test images": "{:.0f}"}))

# %%
bal = lambda key: contrasts.loc[key, "balanced accuracy"]
sv = experiment.shortcut_verdicts(res)
background_verdict, within_verdict = sv["background"], sv["within"]
display(Markdown(f"""
**What the numbers say.** With the cells painted out, the same recipe still tells the
top level ({" / ".join(tax.levels[0])}) with **{probe_scores.level_accuracy[0]:.1%}**
accuracy (majority class {shortcut.loc[1, 'majority class']:.1%}), names the source
hospital **{probe_source:.1%}** of the time, and gets **{probe_scores.leaf_accuracy:.1%}**
of the {len(codec.leaves)} leaves. {background_verdict}

The within-source contrasts are the honest evidence, because there the hospital is
constant. Scored only on Munich test images, the multi-level model separates AML
myeloblasts from neutrophils with
**{bal(('Matek: AML vs neutrophil', 'multi-level model')):.1%}** balanced accuracy; on
Tehran images, hematogones from B-ALL with
**{bal(('Aria: hematogone vs B-ALL', 'multi-level model')):.1%}**. A binary model trained
inside each source alone reaches
{bal(('Matek: AML vs neutrophil', 'dedicated binary model')):.1%} and
{bal(('Aria: hematogone vs B-ALL', 'dedicated binary model')):.1%}. {within_verdict} Each
of these contrasts rests on one hospital, and the Aria one on whole low-magnification
fields rather than single cells, and the {len(codec.leaves)}-leaf accuracy above mixes
whatever disease signal there is with the source shortcut: it should not be quoted on
its own.
"""))

# %% [markdown]
# ## Explanations
#
# Grad-CAM panels for correct and wrong predictions at each level, from the multi-level
# model: where does it look when it decides that level? The CAMs come from the book's
# explanation module (`leukemia_core.explain.cams`), which knows each architecture's target
# layers.

# %%
import matplotlib.pyplot as plt

from leukemia_core.explain.cams import cam_target, compute_cams, overlay

net = runs["multilevel", seeds[0]].model.eval()
where = cam_target(net.backbone, P.image_size)  # the backbone's layer; the heads sit on top of it
level_logits = codec.split(ml_logits)
n_show = 3
fig, axes = plt.subplots(tax.depth, 2 * n_show, figsize=(2 * n_show * 1.6, tax.depth * 1.9), squeeze=False)
for d in range(tax.depth):
    truth = [tax.level_targets(t)[d] for t in true_leaves]
    pred = level_logits[d].argmax(1).tolist()
    ok = [i for i, t in enumerate(truth) if t >= 0 and pred[i] == t][:n_show]
    bad = [i for i, t in enumerate(truth) if t >= 0 and pred[i] != t][:n_show]
    picked = ok + bad
    if picked:
        x = torch.stack([levels.datasets["test"][i][0] for i in picked])
        offset = sum(codec.sizes[:d])  # head d's logits sit after the earlier levels'
        cams = compute_cams(net, x, "Grad-CAM", [offset + pred[i] for i in picked], target=where)
    for j, ax in enumerate(axes[d]):
        ax.axis("off")
        slot = ok + [None] * (n_show - len(ok)) + bad + [None] * (n_show - len(bad))
        i = slot[j]
        if i is None:
            continue
        ax.imshow(overlay(levels.datasets["test"].cache[i], cams[picked.index(i)]))
        ax.set_title(f"L{d + 1} {'✓' if j < n_show else '✗'} {tax.levels[d][truth[i]]}"
                     + ("" if j < n_show else f"\n→ {tax.levels[d][pred[i]]}"), fontsize=7)
fig.suptitle(f"Grad-CAM of the multi-level model at {where.where}: left correct, right wrong", fontsize=9)
fig.tight_layout()

# %%
from leukemia_core.explain.cams import feature_grid

grid = feature_grid(net.backbone, where, levels.datasets["test"][0][0][None])
display(Markdown(
    f"At {P.image_size} px the maps are coarse (a {grid[0]} × {grid[1]} grid), so they say *which part of the "
    "field* drives a decision, not which organelle. A map that spreads over the background rather than the "
    "cell is what the background-only probe above would lead one to expect; a handful of panels is not a "
    "measurement of how often that happens."))

# %% [markdown]
# ## Reference checkpoints: the hierarchy at convergence
#
# The models above are trained for minutes, so their comparisons say little about the
# method. The **reference checkpoints** are the same protocol run once to convergence
# (`leukemia-core run 04_hierarchy --profile reference`: every training image, larger
# images, longer schedules; the sizes are in `leukemia_core/config.py` and each model
# card), committed with a SHA-256 manifest and **evaluated live here** on the whole test
# split of the three sources. They include the ablation the fast runs leave out: the
# multi-level network trained *without* per-level loss control, with one multi-label
# binary cross-entropy over every node of the tree,
#
# $$
# \mathcal{L}_{\text{pooled}} = -\frac{1}{B\,N}\sum_{i=1}^{B}\sum_{v=1}^{N}
# \Big[t_{iv}\log\sigma(z_{iv}) + (1-t_{iv})\log\big(1-\sigma(z_{iv})\big)\Big],
# $$
#
# where $N$ counts the nodes of all levels and $t_{iv}=1$ when node $v$ lies on image
# $i$'s path: one mean over everything, so no level has its own weight and a deep level
# whose images are few counts for little. Every verdict below is computed from the
# live evaluation, with rules fixed before the runs (see `reference_findings`); a
# checkpoint that is not trained yet, or fails its check, is listed with its message
# instead of a number.

# %% tags=["remove-input"]
show_source(HierarchicalTask.node_targets, experiment.node_scores)

# %%
if taxonomy == "leukemia":
    from leukemia_core.reproducibility.reference import capped_note, test_per_class

    per_class = test_per_class(profile)  # None: the whole test split (every profile but smoke)
    ref = experiment.evaluate_reference(data_root=data_root, results_dir=results_dir, per_class=per_class)
    if per_class:
        display(Markdown(capped_note(profile, per_class)))
    ref_rows = pd.DataFrame(ref["rows"])
    display(ref_rows.drop(columns=[c for c in ("checkpoints", "message", "hardware") if c in ref_rows])
            .style.format({"leaf acc": "{:.2%}", "leaf macro-F1": "{:.3f}", "path consistency": "{:.0%}",
                           "training (h)": "{:.1f}"}, na_rep="–").hide(axis="index"))
    not_ok = [c for c in ref["checks"] if c["status"] != "verified"]
    if not_ok:
        display(Markdown(f":::{{admonition}} {len(not_ok)} of {len(ref['checks'])} reference checkpoints not "
                         f"available\n:class: warning\n" + "\n".join(f"- `{c['name']}`: {c['status']}"
                                                                       for c in not_ok)
                         + f"\n\n{not_ok[0]['message']}\n:::"))
    findings = experiment.reference_findings(ref)
    display(Markdown("\n\n".join(findings["sentences"][k] for k in ("flat_vs_hier", "nodes", "ablation")
                                   if findings["sentences"][k])))
    if findings["nodes"] is not None:
        display(findings["nodes"].pivot(index="model", columns="node", values=["precision", "recall"])
                .style.format("{:.3f}", na_rep="–"))
    display(Markdown(findings["sentences"]["cnn_vit"]))
    if findings["curves"]:
        learning_curves(findings["curves"], metric="val_macro_f1").show()
else:
    display(Markdown(f"The reference checkpoints are trained on the bundled `leukemia` taxonomy; this run uses "
                     f"`{taxonomy}`, so they are not evaluated here."))

# %% [markdown]
# ## Against the paper
#
# The paper's column is {cite:t}`hamdi2025hierarchy`; the claim comes from
# `results/claims.yaml`, this chapter's column from the results above.

# %%
from leukemia_core.reproducibility.registry import load_claims

paper = load_claims()["papers"]["hamdi2025hierarchy"]
claim90 = next(c for c in paper["claims"] if c["id"] == "accuracy_90")
no_images = [n for n in tax.leaves if not tax.has_data(n)]
display(Markdown(f"""
| | the paper | this chapter |
|---|---|---|
| data | private hospital images (Abu Dhabi), one source | {' + '.join(HOSPITAL.get(d, d) for d in feeds.index)}: one hospital per disease group |
| leaves | 7 (normal, reactive, leukemia subtypes) | {len(codec.leaves)} with images; {', '.join(no_images)} without public images |
| models | base hierarchical (4 level models), multi-level with loss control | the same two ({tax.depth} levels), plus flat |
| backbones | ConvNeXt-Tiny, ViT-Small | {BACKBONE} (ImageNet) for the hierarchy; {CNN} vs {VIT} from scratch |
| claim | ≈{claim90['value']:.0%} accuracy over all subtypes; ViT-Small > ConvNeXt-Tiny (flat) | flat {leaf_acc['flat']:.1%}, base hierarchical {leaf_acc['base hierarchical']:.1%}, multi-level {leaf_acc['multi-level']:.1%} leaf accuracy; {VIT} {vit_gap:+.1f} points of leaf macro-F1 over {CNN} |
| shortcut control | none reported | background-only probe, within-source contrasts |
"""))
display(experiment.paper_comparison(res, claim90).style.hide(axis="index"))

# %% [markdown]
# ## Results files
#
# One results JSON per model (metrics per decoder, profile, seeds, data and split
# hashes, git commit, hardware, training time) under `results/<profile>/`, written by the
# chapter's experiment module; `leukemia-core run 04_hierarchy --profile ci` runs the same
# protocol without the notebook and writes the same files.

# %% tags=["remove-input"]
show_source(experiment.write_hierarchy_results)

# %%
print("\n".join(str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p) for p in res.results))
print(f"chapter wall time {time.perf_counter() - CHAPTER_START:.0f} s")

# %% [markdown]
# ## Exercises
#
# ::::{exercise}
# :label: ex-hi-taxonomy
# The tree is a parameter of the chapter. Save this YAML as `flat_leukemia.yaml` in the
# repository root: it is the book's tree without the acute/chronic level (and without CML
# and CLL, which have no images anyway).
#
# ```yaml
# name: flat_leukemia
# root:
#   name: cell
#   children:
#     - name: normal
#       children:
#         - {name: neutrophil, sources: ["pbc:neutrophil", "matek:neutrophil"]}
#         - {name: lymphocyte, sources: ["pbc:lymphocyte"]}
#         - {name: monocyte, sources: ["pbc:monocyte"]}
#         - {name: eosinophil, sources: ["pbc:eosinophil"]}
#         - {name: basophil, sources: ["pbc:basophil"]}
#     - name: reactive
#       children:
#         - {name: hematogone, sources: ["aria:benign"]}
#     - name: leukemia
#       children:
#         - {name: AML, sources: ["matek:myeloblast"]}
#         - name: ALL
#           children:
#             - {name: early_pre_b, sources: ["aria:early_pre_b"]}
#             - {name: pre_b, sources: ["aria:pre_b"]}
#             - {name: pro_b, sources: ["aria:pro_b"]}
# ```
#
# Set `taxonomy = "flat_leukemia.yaml"` and `results_dir = "_build/exercises"` in the
# parameters cell (the second keeps the book's results untouched) and re-run the chapter.
# Before you run it, predict: how many heads does the multi-level model get, and how
# many networks does the base hierarchical model train? Which columns of the results
# table disappear? Which mistakes become less severe under {eq}`eq-hi-severity`, and
# which stay as severe? Which of the flat model's scores can change at all?
# ::::
#
# ::::{solution} ex-hi-taxonomy
# :class: dropdown
# The tree is now three levels deep, so the multi-level model has three heads (the
# levels printed under the tree figure: 3, 8 and 3 nodes), the base hierarchical model
# trains three networks, the "level 4 acc" column is gone and each results JSON lists
# three levels under `config.levels`. AML and ALL are now siblings at level 2, so the
# AML-versus-ALL decision moves from head 3 to head 2, whose training softmax
# ({eq}`eq-hi-loss`) also contains the five leukocytes and the hematogones. In the
# distances, a normal cell called an ALL stage drops from 6 to 5 and a neutrophil called
# AML from 5 to 4, while AML called an ALL stage stays at 3 (the common ancestor moves
# up one level, and so does AML), siblings stay at 2 and normal ↔ reactive at 4. The flat
# model sees the same ten leaves, images and seed, so its leaf accuracy and leaf
# macro-F1 should match the default run; its level accuracies, hierarchical F1 and
# mistake severity are recomputed on the new tree and can change. Compare the two runs'
# tables to check each prediction.
# ::::
#
# ::::{exercise}
# :label: ex-hi-decoders
# (a) Show from {eq}`eq-hi-cond` that the path probabilities of {eq}`eq-hi-path` sum to one
# over the leaves with images. (b) In the book's tree, the level-2 head has an output for
# `acute` and one for `hematogone`. What do these two outputs contribute to
# path-probability decoding, and what to training? (c) Give level-1 and conditional
# probabilities for one image for which top-down decoding and path-probability decoding
# predict different leaves.
# ::::
#
# ::::{solution} ex-hi-decoders
# :class: dropdown
# (a) Within every sibling group the conditionals sum to one. Summing the product over
# the leaves below a node, from the deepest level up, therefore gives that node's own
# path probability, and at the root the sum is one: the leaves with images get a proper
# distribution, however many levels each leaf's path has. (b) Nothing to decoding:
# `acute` is the only child of `leukemia` with images (`chronic` has none) and
# `hematogone` the only child of `reactive`, so their conditional is one whatever the
# logit. In training they still take part in the level-2 softmax of {eq}`eq-hi-loss`, where
# they compete with the five leukocytes; only the independent decoder reads them. (c) For
# instance p(normal) = 0.4 with p(neutrophil | normal) = 0.9, and p(leukemia) = 0.6 with
# p(ALL | acute) = 0.6 and p(pre_b | ALL) = 0.5. Top-down follows the larger level-1
# score into the leukemia subtree and ends at pre_b with path probability
# 0.6 × 0.6 × 0.5, while the neutrophil path has 0.4 × 0.9, which is larger. Top-down
# commits to the most probable subtree even when that subtree's probability is spread
# over many leaves.
# ::::
#
# ::::{exercise}
# :label: ex-hi-severity
# For single test images of the book's tree, compute $hP$, $hR$ and $hF_1$ of
# {eq}`eq-hi-hf1` and the distance of {eq}`eq-hi-severity` when (a) a neutrophil is called a
# monocyte, (b) a neutrophil is called pre_b, (c) an AML myeloblast is called pro_b,
# (d) a hematogone is called pre_b. Then explain how a model can have a higher leaf
# accuracy *and* a higher (worse) mistake severity than another.
# ::::
#
# ::::{solution} ex-hi-severity
# :class: dropdown
# (a) $A = \{$normal, neutrophil$\}$, $\hat{A} = \{$normal, monocyte$\}$: $hP = hR = hF_1 = 1/2$,
# distance 2. (b) The paths share no node: $hF_1 = 0$, distance $2 + 4 = 6$. (c) They share
# leukemia and acute: $hP = 2/4$, $hR = 2/3$, $hF_1 = 4/7$, distance $3 + 4 - 2 \cdot 2 = 3$.
# (d) No shared node, distance 6, as severe as (b): the tree puts benign and malignant
# in different top-level branches, even though both come from the same Aria fields. Mistake
# severity averages over the errors only, so a model that fixes many mild sibling
# confusions but keeps a few cross-branch errors has fewer, but on average worse, mistakes.
# Read it next to leaf accuracy and hierarchical F1, never alone.
# ::::
#
# ::::{exercise}
# :label: ex-hi-weights
# The chapter trains the multi-level model with $w_\ell = 1$ at every level. (a) Using
# {eq}`eq-hi-grad` and the AdamW update of chapter {doc}`03_baseline`, what changes for
# head 4 and what for the backbone if you set $w_4 = 10$? (b) Does
# $w = (10, 10, 10, 10)$ train a different model than $w = (1, 1, 1, 1)$? (c) How would
# you try a weighting without touching the chapter's results?
# ::::
#
# ::::{solution} ex-hi-weights
# :class: dropdown
# (a) Head 4's gradient is multiplied by 10 at every step. AdamW divides each
# parameter's step by the running root-mean-square of its gradient, so a constant factor
# cancels (up to the small $\epsilon$) and head 4 moves almost exactly as before. The
# backbone's gradient is the weighted *sum*, so there level 4 now pulls ten times harder
# than the other levels, relative to them: the shared features are pushed towards
# separating the three B-ALL stages, which only the Aria ALL images in $B_4$ carry.
# (b) Essentially no: every gradient is scaled by the same factor, which AdamW cancels,
# and the decoupled weight decay does not depend on the loss. With Adam, loss control is a
# matter of the *ratios* of the weights, and it acts through the backbone. (Under plain
# SGD the overall scale would act like a larger learning rate.) (c) Build the model with
# `build_hierarchical_model("multilevel", ...)` from `leukemia_core.hierarchy`, pair it
# with `HierarchicalTask(codec, level_weights=[1, 1, 1, 10])`, train it with the engine's
# `fit(..., task=task)` as `train_hierarchical` does, and score it with `leaf_paths` and
# `hierarchical_metrics` in a scratch notebook, writing nothing under `results/`.
# ::::

# %% tags=["remove-input"] mystnb={"markdown_format": "myst"}
n_leaves = len(codec.leaves)
weak = {k: v for k, v in {"flat": flat_m, "base hierarchical": base_m, "multi-level": ml_m}.items()
        if v["leaf macro-F1"] < 2 / n_leaves}
weak_txt = (f"- **Near chance:** {', '.join(weak)} reach{'es' if len(weak) == 1 else ''} less than twice the "
            f"{1 / n_leaves:.0%} leaf macro-F1 of guessing uniformly among {n_leaves} leaves. Under `{P.name}` "
            f"({P.image_size} px, {epochs_txt(SIZES['epochs'])}) such a model has learnt almost nothing, and "
            "comparisons involving it are not evidence either way.\n" if weak else "")
ref_txt = (f"- **At convergence (reference checkpoints).** {findings['sentences']['flat_vs_hier']} "
           f"{findings['sentences']['nodes']}" if taxonomy == "leukemia" else "")
display(Markdown(f""":::{{admonition}} Takeaways
:class: important takeaways
{weak_txt}- **Flat or hierarchical.** Leaf accuracy under `{P.name}`: {order}. {verdict}
- **Decoding.** Path-probability decoding is path-consistent by construction
  ({ml_m['path consistency']:.0%} here); the independent per-level argmax is
  {indep.min():.1%}–{indep.max():.1%} consistent. Mistake severity (flat / base hierarchical /
  multi-level): {flat_m['mistake severity']:.2f} / {base_m['mistake severity']:.2f} /
  {ml_m['mistake severity']:.2f} edges per error.
- **Hospital or disease.** With the cells painted out, a model names the source hospital
  {probe_source:.1%} of the time (always guessing the largest source:
  {shortcut.loc[2, 'majority class']:.1%}). {background_verdict} {within_verdict}
- **CNN or ViT.** From scratch at equal budget, {standing}.
{ref_txt}
- **The tree is data.** Taxonomy `{tax.name}` has {tax.depth} levels and {n_leaves} leaves with images;
  another tree is another YAML file, with no change to the code.
:::"""))
