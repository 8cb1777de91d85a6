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
# All of it comes from `leukemia_core.explain`, which every chapter and the
# {doc}`prediction explorer <10_explorer>` use.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full: selects the baseline checkpoints trained by 03_baseline
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
artifacts = "_build/artifacts"  # where 03_baseline left its runs
per_class = None  # test images per class for the faithfulness table (None: by profile)
percentiles = (25, 50, 75)  # ROAD thresholds: remove 75, 50 and 25 % of the pixels

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import Markdown, display

from leukemia_core import explain
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.dataroot import REPO_ROOT
from leukemia_core.errors import CheckpointError
from leukemia_core.explorer import load_run
from leukemia_core.pipeline import eval_transform
from leukemia_core.plots import use_offline_plotly

use_offline_plotly()
torch.manual_seed(seed)
per_class = per_class or {"smoke": 1, "ci": 8, "full": 25}[profile]
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
from leukemia_core.results import write_results

faith = {name: t.reset_index().rename(columns={"index": "method"}).to_dict(orient="records")
         for name, t in tables.items()}
gain = {name: {m: float(t.loc[m, "gain over random"]) for m in explain.METHODS} for name, t in tables.items()}
sampled = pd.concat([d.table.assign(model=name) for name, d in runs.items()])
path = write_results(
    REPO_ROOT / "results" / profile / "explain_faithfulness.json", overwrite=True, kind="explanation",
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
print(path.relative_to(REPO_ROOT))
