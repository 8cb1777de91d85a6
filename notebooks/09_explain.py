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
# # Where the baseline looks: CAMs and how faithful they are
#
# A class activation map (CAM) colours the pixels a classifier's decision leans on. This
# chapter draws CAMs for the two baselines of {doc}`03_baseline` (ConvNeXt-Atto from
# scratch, EfficientNet-Lite0 fine-tuned from ImageNet) with three methods from the grad-cam
# package {cite:p}`jacobgil2021pytorchcam`: Grad-CAM {cite:p}`selvaraju2017gradcam`
# (gradients averaged per channel), Grad-CAM++ {cite:p}`chattopadhay2018gradcampp`
# (higher-order weights) and EigenCAM {cite:p}`muhammad2020eigencam` (the first principal
# component of the activations, no gradient), plus LayerCAM {cite:p}`jiang2021layercam`
# (gradients kept per pixel).
#
# A heat map that looks plausible is not yet an explanation. We therefore **measure**
# how faithful each method is with ROAD {cite:p}`rong2022road`: remove the pixels a map
# calls most relevant (MoRF) or least relevant (LeRF), fill them in by noisy linear
# imputation (so the model does not simply react to a black hole), and watch the
# predicted class's probability. A faithful map makes it fall fast under MoRF and slowly
# under LeRF; ROAD = (LeRF − MoRF) / 2, higher is better. Every method is compared with
# **random maps** of the same coarseness on the same images.
#
# All of it comes from `leukemia_core.explain.cams`, which every chapter and the
# {doc}`prediction explorer <10_explorer>` use.
#
# :::{admonition} Learning objectives
# :class: tip objectives
# After this chapter you can
# - compute a {term}`Grad-CAM` map from a layer's activations and the gradient of a class
#   logit, and say what the channel weights, the ReLU and the upsampling each do;
# - choose the layer a {term}`class activation map` is taken at, and see why a coarse grid
#   limits what it can show;
# - measure how faithful a map is with {term}`ROAD`: remove the most or least relevant
#   pixels, fill them by noisy linear imputation, and compare with random maps by a paired
#   test;
# - tell a plausible-looking heat map from an explanation the model's output depends on.
#
# **Prerequisites:** chapter {doc}`03_baseline` (the two classifiers explained here, and
# their checkpoints, which must have been trained under the same profile), backpropagation
# (the gradient of an output with respect to an intermediate layer), and the paired
# Wilcoxon signed-rank test.
# :::

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: selects the baseline checkpoints trained by 03_baseline
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
artifacts = "_build/artifacts"  # where 03_baseline left its runs
per_class = None  # test images per class for the faithfulness table (None: by profile)
percentiles = (25, 50, 75)  # ROAD thresholds: remove 75, 50 and 25 % of the pixels
results_dir = "results"  # the faithfulness table goes to <results_dir>/<profile>/explain_faithfulness.json

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import Markdown, display

from leukemia_core.explain import cams as explain
from leukemia_core.config import chapter_sizes
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import CheckpointError
from leukemia_core.explain.explorer import load_run
from leukemia_core.pipeline import eval_transform
from leukemia_core.plots import show_source, use_offline_plotly

use_offline_plotly()
torch.manual_seed(seed)
per_class = per_class or chapter_sizes("09_explain", profile)["per_class"]
RUNS = {"ConvNeXt-Atto (scratch)": "pbc_convnext_atto_s0",
        "EfficientNet-Lite0 (ImageNet, fine-tuned)": "pbc_efficientnet_lite0_imagenet_s0"}
runs = {}
for name, folder in RUNS.items():
    path = REPO_ROOT / artifacts / profile / folder
    if not (path / "model.safetensors").exists():
        raise CheckpointError(f"{path} holds no checkpoint: this chapter explains the baselines of "
                              f"03_baseline; run `make notebook NB=03_baseline PROFILE={profile}` first")
    runs[name] = load_run(path, data_root=data_root)  # checkpoint + test predictions + image paths
display(pd.DataFrame([{
    "model": name, "checkpoint": f"{artifacts}/{profile}/{RUNS[name]}",
    "image size": d.meta["image_size"], "test images": len(d.table),
    "test accuracy": f"{(d.table['label'] == d.table['pred']).mean():.2%}",
} for name, d in runs.items()]).set_index("model"))

# %% [markdown]
# ## Where the CAM is taken
#
# `explain.cam_target` maps each architecture to its target layer: the output of a CNN
# stage (for EfficientNet at full size, its final 1x1 head), the tokens entering the last
# attention block of a ViT or Swin, laid out on their grid, or whatever layer a model names
# itself through `cam_target_layers()`. At the book's small image sizes the last stage of
# a CNN is 2x2 cells, too coarse to point at a cell, so the mapping takes the deepest stage
# that is at least 4x4.

# %%
def images_of(data, rows):
    """The model's input tensors for some rows of a run's predictions table."""
    tf = eval_transform(data.meta)
    return torch.stack([tf(read_image(p)) for p in rows["path"]])


targets, rows = {}, []
for name, d in runs.items():
    x = images_of(d, d.table.head(1))
    targets[name] = explain.cam_target(d.model, x.shape[-1])
    rows.append({"model": name, "architecture": d.meta["model"], "target layer": targets[name].where,
                 "CAM grid": "x".join(map(str, explain.feature_grid(d.model, targets[name], x)))})
display(pd.DataFrame(rows).set_index("model"))

# %% [markdown]
# ## Grad-CAM, step by step
#
# Write $F^k \in \mathbb{R}^{h \times w}$ for channel $k = 1, \dots, C$ of the target layer's
# output (the grid in the table above) and $f_\theta(x)_c$ for the logit of class $c$, the
# class each model predicted. (grad-cam's `ClassifierOutputTarget` differentiates the logit,
# not the probability.) Grad-CAM {cite:p}`selvaraju2017gradcam` weighs each channel by its
# spatially averaged gradient,
#
# $$
# \alpha^c_k = \frac{1}{h w} \sum_{i=1}^{h} \sum_{j=1}^{w} \frac{\partial f_\theta(x)_c}{\partial F^k_{ij}},
# $$ (eq-ex-gradcam-weights)
#
# keeps the positive part of the weighted sum, and brings it to the input's size:
#
# $$
# A^c = \operatorname{resize}_{H \times W} \Big( \operatorname{minmax} \big( \operatorname{ReLU} \big( \textstyle\sum_{k=1}^{C} \alpha^c_k F^k \big) \big) \Big),
# \qquad \operatorname{minmax}(M) = \frac{M - \min M}{\max (M - \min M) + 10^{-7}},
# $$ (eq-ex-gradcam-map)
#
# with a bilinear resize (grad-cam's `scale_cam_image`), so $A^c \in [0, 1]^{H \times W}$
# for every image, whatever the scale of its logits. The ReLU keeps the regions whose
# activation raises the logit of $c$; the min-max scaling makes maps comparable in shape,
# not in strength. Grad-CAM++ and LayerCAM change only the weights: Grad-CAM++ weighs
# positive gradients by higher-order terms, LayerCAM keeps one weight per pixel
# ($\operatorname{ReLU}(\partial f_\theta(x)_c / \partial F^k_{ij})$ instead of $\alpha^c_k$),
# and EigenCAM projects the activations on their first principal component and uses no
# gradient, so it does not depend on the class.
#
# ```{graphviz}
# :caption: Grad-CAM as compute_cams runs it (grad-cam's GradCAM on the layer cam_target picks), and the ROAD check of the map's faithfulness.
# digraph gradcam {
#   rankdir=LR; node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];
#   edge [fontname="Helvetica", fontsize=9];
#   x [label="image x\n3 × H × W\n(eval_transform)"];
#   front [label="layers up to the target\n(cam_target: a CNN stage\nwith a grid of at least 4 × 4)"];
#   F [label="activations F\nC × h × w"];
#   back [label="rest of the network\n+ linear head"];
#   logit [label="logit f_c\n(predicted class c)"];
#   grad [label="∂f_c / ∂F\nC × h × w"];
#   alpha [label="α^c: spatial mean\nC weights"];
#   wsum [label="Σ_k α^c_k F^k\nh × w"];
#   relu [label="ReLU, min-max\nbilinear resize"];
#   cam [label="CAM A^c\nH × W, in [0, 1]"];
#   road [label="ROAD: impute the most / least\nrelevant pixels, re-run the model\n(road_scores)"];
#   x -> front -> F -> back -> logit;
#   logit -> grad [label="backward", style=dashed];
#   grad -> alpha -> wsum;
#   F -> wsum;
#   wsum -> relu -> cam -> road;
#   x -> road [style=dotted];
# }
# ```
#
# The package's function hands the chosen layer and targets to grad-cam, in batches:

# %% tags=["remove-input"]
show_source(explain.compute_cams)

# %% [markdown]
# ## CAM galleries
#
# One test image per class, the CAM of the class each model predicted (titles: true →
# predicted, probability). Red is where the map says the evidence is.

# %%
for name, d in runs.items():
    picks = d.table.groupby("label", sort=True).sample(1, random_state=seed)
    display(Markdown(f"**{name}**"))
    fig = explain.cam_gallery(d.model, d.meta, picks["path"], picks["label"].tolist())
    display(fig)
    plt.close(fig)

# %% [markdown]
# The most confident mistakes of ConvNeXt-Atto: does the map sit on the cell, or on
# something else?

# %%
d = runs["ConvNeXt-Atto (scratch)"]
wrong = d.table[d.table["label"] != d.table["pred"]].sort_values("confidence", ascending=False).head(6)
if len(wrong):
    fig = explain.cam_gallery(d.model, d.meta, wrong["path"], wrong["label"].tolist())
    display(fig)
    plt.close(fig)
else:
    display(Markdown("No test image is misclassified."))

# %% [markdown]
# ## Faithfulness: CAMs against random maps
#
# ROAD on a class-stratified sample of test images, for the class each model predicted.
# *MoRF* and *LeRF* are the mean change of that class's probability when the most / least
# relevant pixels are imputed (averaged over the removal shares of the `percentiles`
# parameter, printed below the table);
# *gain over random* is the mean paired difference in ROAD to a random map of the same
# grid size, *wins* the share of images where the method beats it, and *p* a paired
# Wilcoxon signed-rank test of that difference. RandomCAM (grad-cam's random channel
# weights over the same activations) is a second, harder baseline: it keeps the
# activations' spatial layout and only scrambles which channels count.
#
# In equations, as `road_scores` computes them with grad-cam's ROAD classes: for a
# threshold $q$ of the `percentiles` parameter, *MoRF* imputes the pixels where $A^c$ is at
# or above its $q$-th percentile (the top $100 - q$ percent), *LeRF* those where $1 - A^c$ is
# (the bottom $100 - q$ percent). The removed pixels are filled by noisy linear imputation:
# a sparse linear system, solved per channel of the normalised input, makes each removed
# pixel the weighted mean of its in-image neighbours (weight $1/6$ for the four sharing a
# side, $1/12$ for the four diagonal ones; kept pixels stay as they are), and Gaussian
# noise $\xi \sim \mathcal{N}(0, 10^{-4})$ is added, giving $\tilde x_q^{\text{MoRF}}$ and
# $\tilde x_q^{\text{LeRF}}$. With $Q$ the set of thresholds,
#
# $$
# \Delta_{\text{MoRF}}(x) = \frac{1}{|Q|} \sum_{q \in Q} \Big[ p_\theta\big(c \mid \tilde x_q^{\text{MoRF}}\big) - p_\theta(c \mid x) \Big],
# \qquad
# \text{ROAD}(x) = \tfrac12 \big( \Delta_{\text{LeRF}}(x) - \Delta_{\text{MoRF}}(x) \big),
# $$ (eq-ex-road)
#
# with $\Delta_{\text{LeRF}}$ alike: the change in the probability of the predicted class $c$,
# so a faithful map has $\Delta_{\text{MoRF}}$ well below zero and $\Delta_{\text{LeRF}}$ near
# it. Over the $n$ sampled images, a method $m$'s *gain over random* is the mean paired
# difference to a random map $R$ drawn on the same grid,
#
# $$
# \text{gain}(m) = \frac{1}{n} \sum_{i=1}^{n} \Big[ \text{ROAD}_m(x_i) - \text{ROAD}_R(x_i) \Big],
# $$ (eq-ex-road-gain)
#
# and *p* is the Wilcoxon signed-rank test of those $n$ differences.

# %% tags=["remove-input"]
show_source(explain.road_scores, explain.faithfulness)

# %%
tables, per_images, took = {}, {}, {}
for name, d in runs.items():
    sample = d.table.groupby("label", sort=True).sample(min(per_class, d.table["label"].value_counts().min()),
                                                        random_state=seed)
    x = images_of(d, sample)
    start = time.perf_counter()
    tables[name], per_images[name] = explain.faithfulness(
        d.model, x, targets=[d.classes.index(p) for p in sample["pred"]], percentiles=percentiles,
        seed=seed, target=targets[name])
    took[name] = time.perf_counter() - start
table = pd.concat(tables, names=["model", "method"])
display(table.style.format({"MoRF": "{:+.3f}", "LeRF": "{:+.3f}", "ROAD": "{:+.3f}",
                            "gain over random": "{:+.3f}", "wins vs random": "{:.0%}",
                            "p (Wilcoxon)": "{:.3g}"}, na_rep="–"))
print(", ".join(f"{n}: {tables[n].attrs['images']} images in {t:.0f} s" for n, t in took.items()))
print(f"ROAD thresholds (percentiles {list(percentiles)}): "
      f"{', '.join(f'{100 - q}%' for q in percentiles)} of the pixels removed")

# %%
fig = go.Figure()
for name, per in per_images.items():
    wide = per.pivot(index="image", columns="method", values="ROAD")
    gain = wide.sub(wide["random map"], axis=0).drop(columns="random map")
    fig.add_bar(x=list(gain.columns), y=gain.mean(), name=name,
                error_y=dict(type="data", array=1.96 * gain.sem().to_numpy()))
fig.add_hline(y=0, line_color="grey")
fig.update_layout(title="ROAD gain over a random map (mean, 95% CI over images)",
                  yaxis_title="ROAD − ROAD(random map)", barmode="group", height=380)
fig.show()

# %%
lines = []
for name, t in tables.items():
    cams = t.loc[list(explain.METHODS)]
    better = cams[(cams["gain over random"] > 0) & (cams["p (Wilcoxon)"] < 0.05)].index.tolist()
    ahead = cams[cams["gain over random"] > 0].index.tolist()
    best = cams["ROAD"].idxmax()
    lines.append(f"- **{name}**: {len(ahead)} of {len(cams)} methods have a higher mean ROAD than "
                 f"random maps ({', '.join(ahead) or 'none'}); significantly so (p < 0.05) for "
                 f"{', '.join(better) or 'none'}. The most faithful is {best} "
                 f"(ROAD {cams.loc[best, 'ROAD']:+.3f} against {t.loc['random map', 'ROAD']:+.3f} for random maps).")
display(Markdown(f"Under the **{profile}** profile, on {tables[name].attrs['images']} test images per model:\n\n"
                 + "\n".join(lines)))

# %%
grids = pd.DataFrame(rows).set_index("model")["CAM grid"]
sizes = {name: d.meta["image_size"] for name, d in runs.items()}
display(Markdown(
    "What this does and does not say. ROAD measures whether the model's confidence depends on the pixels a map "
    "ranks highest, at the input resolution the model sees ("
    + "; ".join(f"{name}: {sizes[name]} px, a CAM on a {grids[name]} grid" for name in runs)
    + f", under `{profile}`)"
    + (": a grid that coarse can tell the cell from the background, not the nucleus from the granules. "
       if max(int(v) for g in grids for v in g.split("x")) <= 8 else ". ")
    + "It does not say that the evidence is the biology a haematologist would use. The sample is "
    f"{per_class} image(s) per class, so read the p-values, not only the means; the `full` profile "
    "gives finer maps and a tighter test."))

# %% [markdown]
# To look at any image's CAM, open the {doc}`prediction explorer <10_explorer>`.

# %% [markdown]
# ## Results file
#
# The faithfulness table goes to `results/<profile>/explain_faithfulness.json`, so the
# reproducibility report can show it and the build can check that it reproduces.

# %%
import hashlib

from leukemia_core.config import get_profile
from leukemia_core.data.splits import split_hash
from leukemia_core.reproducibility.results import write_results

faith = {name: t.reset_index().rename(columns={"index": "method"}).to_dict(orient="records")
         for name, t in tables.items()}
gain = {name: {m: float(t.loc[m, "gain over random"]) for m in explain.METHODS} for name, t in tables.items()}
sampled = pd.concat([d.table.assign(model=name) for name, d in runs.items()])
path = write_results(
    REPO_ROOT / results_dir / profile / "explain_faithfulness.json", overwrite=True, kind="explanation",
    chapter="09_explain", paper="rong2022road", method="ROAD faithfulness of CAM methods vs random maps",
    model=", ".join(RUNS.values()), dataset="pbc:test", pretrained=False, profile=profile,
    profile_sizes=get_profile(profile).to_dict() | {"chapter": {"per_class": per_class,
                                                                 "percentiles": list(percentiles)}},
    seeds=[seed], config={"methods": list(explain.METHODS), "baselines": list(explain.BASELINES),
                          "runs": RUNS, "per_class": per_class, "percentiles": list(percentiles)},
    split_sha256=split_hash("pbc"),
    data_sha256=hashlib.sha256("\n".join(sorted(sampled["relpath"])).encode()).hexdigest(),
    metrics={"gain_over_random": gain, "table": faith,
             "images": {name: int(t.attrs["images"]) for name, t in tables.items()}},
    wall_time_s=float(sum(took.values())))
print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)

# %% [markdown]
# ## Exercises
#
# ::::{exercise}
# :label: ex-ex-per-class
# Re-run the chapter with more images in the faithfulness test: `per_class = 16` under
# `ci` (under `smoke`, whose test split keeps four images per class, `per_class = 2`).
# Predict first: how many images does each model's table rest on, and what can happen to
# the p-values and to the verdicts of the summary above? Then check
# `explain_faithfulness.json` (redirect it with `results_dir`).
# ::::
#
# ::::{solution} ex-ex-per-class
# :class: dropdown
# The sample is class-stratified, so each model is tested on $K \times$ `per_class` images
# (at most the smallest class's count of test images); the JSON records the number under
# `metrics.images` and the parameter under `config.per_class`. The means of MoRF, LeRF and
# ROAD move only by sampling noise, but the paired Wilcoxon test gets more differences: the
# smallest p-value it can reach falls quickly with $n$, so a real but small gain over
# random maps can become significant, while a gain that was only noise stays
# non-significant or shrinks. A verdict that flips between the two runs was not supported
# by the smaller sample.
# ::::
#
# ::::{exercise}
# :label: ex-ex-logit
# Grad-CAM differentiates the logit $f_\theta(x)_c$, not the probability $p_\theta(c \mid x)$.
# Write $\partial p_\theta(c \mid x) / \partial F^k_{ij}$ in terms of the logits' gradients.
# What would a map built from the probability's gradient show that
# {eq}`eq-ex-gradcam-weights` does not, and what does the ReLU in {eq}`eq-ex-gradcam-map`
# throw away?
# ::::
#
# ::::{solution} ex-ex-logit
# :class: dropdown
# With $p = \operatorname{softmax}(f)$,
# $\partial p_c / \partial F = p_c \big( \partial f_c / \partial F - \sum_k p_k \, \partial f_k / \partial F \big)$.
# The probability's gradient is the evidence for $c$ *minus* the probability-weighted
# evidence for all classes, scaled by $p_c$: it vanishes for confidently classified
# images (a saturated softmax) and mixes in the other classes, whereas the logit's
# gradient isolates the evidence for $c$. The ReLU drops the regions whose activation
# *lowers* the logit of $c$ (evidence against $c$, often for a competing class);
# $\operatorname{ReLU}(-\sum_k \alpha^c_k F^k)$ would map them, a "counterfactual"
# explanation.
# ::::
#
# ::::{exercise}
# :label: ex-ex-random
# What ROAD score do you expect, on average, from a random map drawn independently of the
# image? Why does the chapter still measure random maps on the same images, at the same
# grid size, instead of comparing each method with that expectation? And why does ROAD
# fill the removed pixels by imputation rather than setting them to zero?
# ::::
#
# ::::{solution} ex-ex-random
# :class: dropdown
# For a map independent of the image, the most and least relevant pixels are two random
# sets of the same size, so $\Delta_{\text{MoRF}}$ and $\Delta_{\text{LeRF}}$ have the same
# expectation and ROAD is zero on average. On a finite sample, though, both are noisy, the
# smooth blobs of a coarse map remove connected regions (which hurt a classifier more than
# scattered pixels) and the cell usually sits in the centre of the image: a random map of
# the same coarseness on the same images is the fair, paired control. Zeros (black pixels)
# would be a new pattern that the model never saw in training; the shape of the removed
# region itself can then carry class information (a hole shaped like the nucleus), so the
# score would measure the model's reaction to the mask, not the pixels. Imputation from
# the neighbours hides the mask's shape, which is ROAD's "debiasing".
# ::::
#
# ::::{exercise}
# :label: ex-ex-grid
# The table "Where the CAM is taken" gives each model's CAM grid. With a grid of
# $h \times w$ cells resized bilinearly to $H \times W$ pixels, how many independent
# values does a map have, and what does that imply for what MoRF removes at the
# threshold $q = 50$? How would you expect the results to change under the `full`
# profile (224 px)?
# ::::
#
# ::::{solution} ex-ex-grid
# :class: dropdown
# The map has only $h w$ free values; bilinear resizing interpolates between them, so at
# $q = 50$ MoRF removes about half the image as a few smooth blobs around the highest
# cells. Such a map can separate the cell from the background but not the nucleus from
# the granules, and a random map at the same grid removes blobs of the same size, which
# is why the gain over random, not ROAD alone, is the measure. At 224 px the same stage
# has a grid several times finer in each direction, so maps can be more specific, and the
# difference between a method and a random map has more room to appear (or not).
# ::::

# %% tags=["remove-input"] mystnb={"markdown_format": "myst"}
points = []
for name, t in tables.items():
    cams = t.loc[list(explain.METHODS)]
    best = cams["gain over random"].idxmax()
    sig = cams[(cams["gain over random"] > 0) & (cams["p (Wilcoxon)"] < 0.05)].index.tolist()
    points.append(
        f"- **{name}** (a {grids[name]} CAM grid): the largest gain over random maps is {best}'s, "
        f"{cams.loc[best, 'gain over random']:+.3f} in ROAD (p = {cams.loc[best, 'p (Wilcoxon)']:.3g}, "
        f"{t.attrs['images']} images); "
        + (f"{', '.join(sig)} {'beats' if len(sig) == 1 else 'beat'} random maps significantly (p < 0.05)." if sig else
           "**no method beats random maps significantly** on this sample: the maps are not shown to be "
           "faithful, whatever they look like in the galleries. With few images or a coarse grid, the "
           "test may not separate a method from chance; the `full` profile's larger sample and finer maps "
           "give it more power."))
display(Markdown(":::{admonition} Takeaways\n:class: important takeaways\n"
                 "- Grad-CAM weighs the target layer's channels by their spatially averaged gradient of the "
                 "class logit and keeps the positive part; Grad-CAM++ and LayerCAM change the weights, EigenCAM "
                 "uses no gradient.\n"
                 "- A heat map is an explanation only if the model's output depends on the pixels it ranks "
                 "highest: ROAD measures that by imputing them, and random maps of the same coarseness are "
                 "the control.\n"
                 + "\n".join(points) + "\n:::"))
