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
# # CLAHE, R3GAN minority synthesis and a ConvNeXtV2–Swin hybrid under heavy imbalance
#
# {cite:t}`convnextv2_swin_r3gan_2025` classify white blood cells with three pieces:
# CLAHE contrast enhancement, an "R3GAN" that generates images of the rare classes, and a
# hybrid of a ConvNeXtV2 and a Swin Transformer whose features are fused, on Raabin-WBC, a
# data set with very few basophils (their claims are printed below, from
# `results/claims.yaml`).
#
# **The headline row, fixed before any result**: the paper's own method, *hybrid + CLAHE +
# R3GAN* (`headline.row` in `results/claims.yaml`). The chapter's targets are judged on that
# row only; the other rows are its ablation. Where the chapter names the strongest row, it
# picks it by **validation** macro-F1, never by a test score.
#
# What this chapter can and cannot do, before any number:
#
# - **Raabin-WBC is not in the book's data mirror.** We impose its class ratios on PBC's
#   five white-cell classes {cite:p}`acevedo2020pbc`, on the *training split only*;
#   validation and test keep the committed, natural PBC balance.
# - **The authors' public code does not match their paper**: it has no Swin branch and no
#   CLAHE, its "R3GAN" is a DCGAN, and generated images end up in its test split. We
#   implement what the paper describes: R3GAN as {cite:t}`huang2024r3gan` define it
#   (relativistic pairing loss, R1 + R2 zero-centred penalties, a modern residual
#   ConvNet), CLAHE, and the two-branch hybrid, and evaluate strictly: **no generated
#   image ever enters validation or test** (checked on every table, and tested).
# - **No pretrained ConvNeXtV2 or Swin weights exist offline**, so the hybrid and its
#   branches train from scratch. The only offline ImageNet image weights are
#   EfficientNet-Lite0's; the ablation's baseline is that network, fine-tuned. Under `ci`
#   (2 CPU cores) the hybrid gets a few minutes at most, which is far from the paper's
#   schedule: its rows say what a from-scratch hybrid reaches on that budget, not what it
#   can reach.

# %% tags=["parameters"]
profile = "ci"  # smoke | ci | full
data_root = None  # None: LEUKEMIA_DATA, else data/ in the repository
seed = 0
seeds = None  # None: the profile's seeds (one under ci, three under full)
imbalance_seed = 0  # which Raabin-like subsample of the training split (fixed: part of the protocol)
artifacts = "_build/artifacts"  # GAN checkpoint and the imbalanced training list: <artifacts>/<profile>/r3gan_hybrid/
results_dir = "results"  # results JSON: <results_dir>/<profile>/r3gan_*.json

# %%
import re
import time

import numpy as np
import pandas as pd
import plotly.express as px
import torch
from IPython.display import Markdown, display

from leukemia_core.config import get_profile
from leukemia_core.data import load_dataset
from leukemia_core.data.records import WBC_CLASSES
from leukemia_core.data.splits import apply_split
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.dataroot import REPO_ROOT
from leukemia_core.engine.train import FitConfig, evaluate, fit
from leukemia_core.gan import quality
from leukemia_core.gan.balance import evaluation_rows, top_up_counts, training_set
from leukemia_core.gan.provenance import generate, is_synthetic
from leukemia_core.gan.r3gan import R3GANConfig
from leukemia_core.gan.train import train_r3gan
from leukemia_core.imbalance import RAABIN_RATIOS, imbalanced_train
from leukemia_core.models import create_model, size_kwargs
from leukemia_core.pipeline import content_hash, make_loader, prepare_table, subsample
from leukemia_core.plots import confusion_matrix_figure, image_grid, use_offline_plotly
from leukemia_core.registry import load_claims
from leukemia_core.results import write_results
from leukemia_core.transforms import CLAHE, static_transform

use_offline_plotly()
CHAPTER_START = time.perf_counter()
#: Sizes per profile. The code path is the same; only these numbers change.
SIZES = {
    "smoke": dict(image_size=32, hybrid_size=32, hybrid_variant="atto", train_cap=8, eval_cap=4,
                  epochs=1, hybrid_epochs=1, lr=1e-3, hybrid_lr=2e-3, batch_size=16,
                  gan_size=16, gan_steps=4, gan_batch=8, gan_net=dict(base=8, max_width=32),
                  gan_lr=1e-3, synthetic_per_class=12, quality_real_cap=8),
    "ci": dict(image_size=48, hybrid_size=32, hybrid_variant="atto", train_cap=None, eval_cap=None,
               epochs=2, hybrid_epochs=2, lr=1e-3, hybrid_lr=2e-3, batch_size=64,
               gan_size=32, gan_steps=200, gan_batch=32, gan_net=dict(base=8, max_width=64),
               gan_lr=1e-3, synthetic_per_class=300, quality_real_cap=200),
    "full": dict(image_size=224, hybrid_size=224, hybrid_variant="tiny", train_cap=None, eval_cap=None,
                 epochs=20, hybrid_epochs=60, lr=1e-3, hybrid_lr=1e-3, batch_size=128,
                 gan_size=64, gan_steps=20000, gan_batch=64, gan_net=dict(base=32, max_width=256),
                 gan_lr=2e-4, synthetic_per_class=2000, quality_real_cap=None),
}[profile]
P = get_profile(profile, batch_size=SIZES["batch_size"])
if seeds is None:
    seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
seeds = list(seeds)
CLASSES = list(WBC_CLASSES)  # neutrophil, lymphocyte, monocyte, eosinophil, basophil
MINORITY = ["monocyte", "eosinophil", "basophil"]  # the classes the GAN synthesises
OUT = REPO_ROOT / artifacts / P.name / "r3gan_hybrid"
OUT.mkdir(parents=True, exist_ok=True)
print(f"profile {P.name}: classifier {SIZES['image_size']} px, hybrid {SIZES['hybrid_size']} px, "
      f"GAN {SIZES['gan_size']} px x {SIZES['gan_steps']} steps, seeds {seeds}")
PAPER = load_claims()["papers"]["convnextv2_swin_r3gan_2025"]
HEADLINE = PAPER["headline"]["row"]  # pre-registered in claims.yaml: the paper's method
display(Markdown("The paper's claims: " + "; ".join(
    f"{c['statement'].strip()}" + (f" (**{c['value']:.1%}**)" if c.get("value") is not None else "")
    for c in PAPER["claims"]) + f". Headline row of this chapter: **{HEADLINE}**."))

# %% [markdown]
# ## The imbalance protocol
#
# Raabin-WBC's training set, relative to its neutrophils (`leukemia_core.imbalance.RAABIN_RATIOS`,
# the "Raabin ratio" column below). From PBC's
# committed training split we keep the largest subsample with exactly these ratios
# (lymphocytes run out first), chosen by a fixed seed; the kept list and its SHA-256 are
# written beside the chapter's artefacts and into every results file. Validation and test
# are PBC's committed splits of the five classes, untouched.

# %%
full_table = apply_split(load_dataset("pbc", data_root))
table = imbalanced_train(full_table, RAABIN_RATIOS, seed=imbalance_seed)
protocol = table.attrs["imbalance"]
if SIZES["train_cap"]:  # smoke only: a few images per class, the protocol's code path
    table = pd.concat([subsample(table[table["split"] == "train"], SIZES["train_cap"], 0),
                       subsample(table[table["split"] == "val"], SIZES["eval_cap"], 0),
                       subsample(table[table["split"] == "test"], SIZES["eval_cap"], 0)], ignore_index=True)
    table.attrs = full_table.attrs | {"imbalance": protocol}
table[table["split"] == "train"][["relpath", "label"]].to_csv(OUT / "imbalanced_train.csv", index=False)
counts = table.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(CLASSES)[["train", "val", "test"]]
counts["train / neutrophil"] = counts["train"] / counts.loc["neutrophil", "train"]
counts["Raabin ratio"] = pd.Series(RAABIN_RATIOS)
counts["committed train"] = full_table[full_table["split"] == "train"].groupby("label").size().reindex(CLASSES)
display(counts.style.format({"train / neutrophil": "{:.4f}", "Raabin ratio": "{:.4f}"}))
display(Markdown(
    f"Training images kept: **{counts['train'].sum():,}** of {counts['committed train'].sum():,} "
    f"(basophils: **{counts.loc['basophil', 'train']}**); list SHA-256 "
    f"`{protocol['train_relpaths_sha256'][:16]}…` (seed {protocol['seed']}), saved to "
    f"`{(OUT / 'imbalanced_train.csv').relative_to(REPO_ROOT)}`."))

# %% [markdown]
# ## CLAHE
#
# Contrast-limited adaptive histogram equalisation (`leukemia_core.transforms.CLAHE`:
# clip limit 2, 8x8 tiles) on the lightness channel of LAB, before resizing. It spreads
# each tile's lightness histogram, with the clip limit capping how far noise is
# amplified: chromatin and granules gain contrast, the pale background brightens.

# %%
clahe = CLAHE(2.0, (8, 8))
rng = np.random.default_rng(0)
train_rows = table[table["split"] == "train"]
shown = [train_rows[train_rows["label"] == c].iloc[int(rng.integers((train_rows["label"] == c).sum()))]
         for c in CLASSES]
before = [read_image(r["path"]) for r in shown]
after = [clahe(im) for im in before]
image_grid(before + after, [f"{r['label']}" for r in shown] + [f"{r['label']}, CLAHE" for r in shown],
           ncols=len(CLASSES), size=1.8)

# %%
hist_rows = subsample(train_rows, 40 if profile != "smoke" else 2, 0)
bins = np.arange(0, 257, 8)
hists = []
for name, fn in (("original", lambda im: im), ("CLAHE", clahe)):
    pix = np.concatenate([np.asarray(fn(read_image(p))).reshape(-1, 3) for p in hist_rows["path"]])
    for ch, colour in enumerate(("red", "green", "blue")):
        h, _ = np.histogram(pix[:, ch], bins)
        hists += [{"image": name, "channel": colour, "intensity": b, "share of pixels": v}
                  for b, v in zip(bins[:-1], h / h.sum())]
fig = px.line(pd.DataFrame(hists), x="intensity", y="share of pixels", color="image", facet_col="channel",
              title=f"per-channel histograms of {len(hist_rows)} training images, before and after CLAHE")
fig.update_layout(height=340).show()

# %% [markdown]
# ## How every classifier is trained and tested
#
# One function trains every row of the ablation: the same engine (`leukemia_core.engine.fit`:
# AdamW, cosine schedule, flips, right-angle rotations and colour jitter, model selection by
# validation macro-F1), the same validation and test images, only the named piece changing.
# Images are decoded once per (size, CLAHE) and kept in memory. Validation and test rows
# pass through `gan.balance.evaluation_rows`, which raises on any synthetic row; generated
# images can only enter through `gan.balance.training_set`.

# %%
_prepared = {}


def prepared(size, use_clahe, model):
    """Preloaded train/val/test images at ``size`` (with or without CLAHE) and their normalisation."""
    pretrained = model == "efficientnet_lite0"
    key = (size, use_clahe, pretrained)
    if key not in _prepared:
        data = prepare_table(table, P.replace(image_size=size), CLASSES, seed=0,
                             clahe=clahe if use_clahe else None, model=model, pretrained=pretrained)
        for s in ("val", "test"):
            evaluation_rows(data.table, s)  # raises on any synthetic row
        _prepared[key] = (data, {s: data.dataset(s, size, preload=True) for s in ("train", "val", "test")})
    return _prepared[key]


def synthetic_for(size, use_clahe, seed):
    """The generated training images (``SYNTH``), resized (and CLAHE'd) like the real ones."""
    static = static_transform(size, clahe if use_clahe else None)
    from PIL import Image
    ims = [np.asarray(static(Image.fromarray(a))) for a in SYNTH[seed][0]]
    return ims, SYNTH[seed][1]


ROWS = {}  # row name -> list of per-seed results


def run_row(name, model="efficientnet_lite0", use_clahe=False, sampler=False, class_weights=False,
            synthetic=False):
    """Train ``model`` once per seed under one recipe; test on the natural-balance test split."""
    size = SIZES["image_size"] if model == "efficientnet_lite0" else SIZES["hybrid_size"]
    data, ds = prepared(size, use_clahe, model)
    results = []
    for s in seeds:
        t0 = time.perf_counter()
        extra = synthetic_for(size, use_clahe, s) if synthetic else (None, None)
        train_ds = training_set(ds["train"].cache, data.split("train"), CLASSES, ds["train"].transform, *extra)
        loaders = {"train": make_loader(train_ds, P, True, weighted_sampler=sampler),
                   "val": make_loader(ds["val"], P, False), "test": make_loader(ds["test"], P, False)}
        weights = None
        if class_weights:
            n = torch.bincount(torch.tensor(train_ds.targets), minlength=len(CLASSES)).float()
            weights = (n.sum() / (len(n) * n)).tolist()
        pretrained = model == "efficientnet_lite0"
        cfg = FitConfig(epochs=SIZES["epochs"] if pretrained else SIZES["hybrid_epochs"],
                        lr=SIZES["lr"] if pretrained else SIZES["hybrid_lr"], warmup_epochs=0.3,
                        seed=s, class_weights=weights, progress=False)
        torch.manual_seed(s)
        net = create_model(model, len(CLASSES), pretrained=pretrained, **size_kwargs(model, size))
        fitted = fit(net, loaders["train"], loaders["val"], CLASSES, cfg)
        val = evaluate(net, loaders["val"], CLASSES)  # what any choice between rows may look at
        test = evaluate(net, loaders["test"], CLASSES)
        results.append({"seed": s, "model": net, "val": val, "test": test, "history": fitted.history,
                        "n_train": len(train_ds), "n_synthetic": int(is_synthetic(train_ds.records).sum()),
                        "size": size, "wall_s": time.perf_counter() - t0, "data": data,
                        "recipe": dict(model=model, clahe=use_clahe, sampler=sampler,
                                       class_weights=class_weights, synthetic=synthetic, image_size=size,
                                       epochs=cfg.epochs, lr=cfg.lr)})
    ROWS[name] = results
    r = results[0]
    print(f"{name}: acc {r['test']['accuracy']:.3f}, macro-F1 {r['test']['macro_f1']:.3f}, basophil recall "
          f"{r['test']['per_class']['basophil']['recall']:.3f} ({r['wall_s']:.0f} s per seed; "
          f"chapter at {(time.perf_counter() - CHAPTER_START) / 60:.1f} min)")
    return results

# %% [markdown]
# ## The baseline and the two classic remedies
#
# EfficientNet-Lite0 (ImageNet) fine-tuned on the imbalanced training split: plainly; with
# the cross-entropy weighted by inverse class frequency; and with a class-balanced sampler
# instead (each class drawn equally often, plain cross-entropy; combining both would weight
# the rare classes twice).

# %%
BASELINE = "baseline (imbalanced, Lite0)"
run_row(BASELINE)
run_row("+ class-weighted loss", class_weights=True)
run_row("+ oversampling", sampler=True);

# %% [markdown]
# ## R3GAN for the rare classes
#
# One class-conditional R3GAN (`leukemia_core.gan.r3gan`) is trained on the real training
# images of the three minority classes (monocyte, eosinophil, basophil: the imbalanced
# split's, never a validation or test image), at the profile's GAN size, with flips and
# right-angle rotations. Objective: relativistic pairing loss, plus γ/2 (R1 + R2) with
# the γ printed below; Adam with β₁ = 0; samples come from an exponential moving average of
# the generator. It is small on purpose under `ci`: a 64-px GAN trains at a few images per
# second on this CPU, and a 32-px one for a few hundred steps learns the colours and the
# layout of a cell, not its texture (the samples below). The `full` profile trains a 64-px
# GAN for 20,000 steps; only then is the R3GAN row a test of the paper's idea.

# %%
lite_data, lite_ds = prepared(SIZES["image_size"], False, "efficientnet_lite0")
to_gan_size = static_transform(SIZES["gan_size"])


def at_gan_size(split, classes):
    """Real images of ``classes`` in ``split``, downsampled from the preloaded ones to the GAN's size."""
    from PIL import Image
    rows = lite_data.split(split)
    keep = rows["label"].isin(classes).to_numpy()
    ims = np.stack([np.asarray(to_gan_size(Image.fromarray(a))) for a, k in zip(lite_ds[split].cache, keep) if k])
    return ims, rows.loc[keep, "label"].to_numpy(), rows[keep]


gan_images, train_labels, gan_rows = at_gan_size("train", MINORITY)  # real training images only
gan_targets = [MINORITY.index(c) for c in train_labels]
threads = torch.get_num_threads()
if not torch.cuda.is_available():  # a GAN this small gains nothing from a second CPU thread; one avoids contention
    torch.set_num_threads(1)
gan = train_r3gan(gan_images, gan_targets, len(MINORITY), SIZES["gan_steps"], SIZES["gan_batch"], seed=0,
                  net=SIZES["gan_net"], config=(gan_config := R3GANConfig(gamma=0.05, lr=SIZES["gan_lr"])),
                  out=OUT / "r3gan_generator.safetensors", meta={"classes": MINORITY})
torch.set_num_threads(threads)
print(f"R3GAN objective: gamma {gan_config.gamma} for R1 + R2, Adam betas {gan_config.betas}, lr {gan_config.lr}")
gen_t0 = time.perf_counter()
with torch.no_grad():
    gan.generator(torch.randn(256, gan.generator.z_dim), torch.arange(256) % len(MINORITY))
gen_rate = 256 / (time.perf_counter() - gen_t0)
display(Markdown(
    f"{len(gan_images)} real training images ({pd.Series(train_labels).value_counts().to_dict()}), "
    f"{SIZES['gan_steps']} steps of {SIZES['gan_batch']}: **{gan.train_images_per_s:.0f} training images/s**, "
    f"{gan.wall_s:.0f} s; the EMA generator draws **{gen_rate:.0f} samples/s** (CPU, this build's machine). "
    f"Checkpoint SHA-256 `{gan.checkpoint_sha256[:16]}…`."))
hist = pd.DataFrame(gan.history).melt("step", ["loss_d", "loss_g", "r1", "r2"], var_name="term")
px.line(hist, x="step", y="value", color="term", title="R3GAN losses and penalties").update_layout(height=320).show()

# %% [markdown]
# ### Generated images per class
#
# Each class's synthetic images top it up to the profile's target count
# (`synthetic_per_class`); every one carries its provenance: a `synthetic://` path, the
# generator checkpoint's SHA-256, the draw's seed and its index. Top: real training
# images at the GAN's size; bottom: samples.

# %%
train_counts = train_rows["label"].value_counts().to_dict()
n_new = top_up_counts(train_counts, MINORITY, SIZES["synthetic_per_class"])
SYNTH = {}
for s in seeds:
    draws = [generate(gan.generator, i, c, n_new[c], seed=1000 * s + i, checkpoint_sha256=gan.checkpoint_sha256)
             for i, c in enumerate(MINORITY)]
    SYNTH[s] = (np.concatenate([d[0] for d in draws]), pd.concat([d[1] for d in draws], ignore_index=True))
synth_images, synth_records = SYNTH[seeds[0]]
display(pd.DataFrame({"real training images": pd.Series(train_counts).reindex(MINORITY),
                      "generated": pd.Series(n_new)}))
k = 8
real_show = [gan_images[np.flatnonzero(np.array(gan_targets) == i)[:k]] for i in range(len(MINORITY))]
fake_show = [synth_images[(synth_records["label"] == c).to_numpy()][:k] for c in MINORITY]
image_grid([im for i in range(len(MINORITY)) for im in list(real_show[i]) + list(fake_show[i])],
           [f"{c} real" if j < len(real_show[i]) else f"{c} R3GAN" for i, c in enumerate(MINORITY)
            for j in range(len(real_show[i]) + len(fake_show[i]))], ncols=k, size=1.1)
display(synth_records.head(3))

# %% [markdown]
# ### Sample quality, measured in stated features
#
# There are no Inception weights offline, so **every number below is computed in the
# features of the baseline classifier above** (EfficientNet-Lite0, ImageNet-initialised,
# fine-tuned on the imbalanced *real* training split; its 1280 pooled pre-logit features):
# comparable between runs of this chapter, not with published FID/KID values. Real and
# generated images are compared at the GAN's resolution (real images downsampled to it),
# both upsampled to the classifier's size the same way. The reference real set is the
# **validation** split (never seen by the GAN); the test split is kept for the final table.
#
# - **KID** (unbiased; torchmetrics) and FID (biased for a few hundred images), with the
#   same numbers for *real training vs real validation* images as the floor two real samples reach;
# - **precision / recall** of k-NN manifolds (k = 3): the share of samples that look real,
#   and the share of real images the samples cover. With a few hundred real images in 1280
#   dimensions the real k-NN balls are wide, so precision saturates easily (blurry "average"
#   cells fall inside them); recall and KID are the telling numbers;
# - **train on synthetic, test on real**: a logistic regression on the features of the
#   generated images, scored on real validation images of the three classes, beside the same
#   model trained on the real training images;
# - **memorisation**: each sample's nearest real training image of its class and the
#   distance, against the nearest-training distance of real validation images.

# %%
base_run = ROWS[BASELINE][0]
extractor = quality.ClassifierFeatures(base_run["model"].cpu(), SIZES["image_size"], base_run["data"].mean,
                                       base_run["data"].std, name="EfficientNet-Lite0 fine-tuned on the "
                                       "imbalanced real PBC training split (ImageNet init), pooled 1280-d")
val_images, val_labels, _ = at_gan_size("val", MINORITY)
feats = {"train": quality.embed(extractor, gan_images), "val": quality.embed(extractor, val_images),
         "fake": quality.embed(extractor, synth_images)}
cap = SIZES["quality_real_cap"]
qrows = []
for c in MINORITY:
    tr, va, fk = train_labels == c, val_labels == c, np.array(synth_records["label"] == c)
    va_idx = np.flatnonzero(va)[:cap] if cap else np.flatnonzero(va)
    row = {"class": c, "real train": int(tr.sum()), "real val": len(va_idx), "generated": int(fk.sum())}
    if fk.sum() > 3 and tr.sum() > 3:
        g = quality.kid_fid(extractor, val_images[va_idx], synth_images[fk])
        floor = quality.kid_fid(extractor, val_images[va_idx], gan_images[tr])
        pr = quality.knn_precision_recall(feats["val"][va_idx], feats["fake"][fk])
        _, d_fake = quality.nearest_real(feats["fake"][fk], feats["train"][tr])
        _, d_val = quality.nearest_real(feats["val"][va_idx], feats["train"][tr])
        row |= {"KID": g["kid"], "KID real train vs val": floor["kid"], "FID": g["fid"],
                "FID real train vs val": floor["fid"], "precision": pr["precision"], "recall": pr["recall"],
                "NN distance, generated": float(d_fake.median()), "NN distance, real val": float(d_val.median())}
    qrows.append(row)
q = pd.DataFrame(qrows).set_index("class")
tstr = quality.train_on_test_on(feats["fake"], synth_records["label"], feats["val"], val_labels)
trtr = quality.train_on_test_on(feats["train"], train_labels, feats["val"], val_labels)
display(q.style.format(precision=3))
display(Markdown(
    f"Features: *{extractor.name}*. Train on synthetic, test on real (3 minority classes, "
    f"{len(val_labels)} real validation images): **{tstr:.1%}**; train on real: **{trtr:.1%}**. "
    "Median nearest-training distances: a generated image much *closer* to its nearest training "
    "image than a real validation image is would suggest copying. Ratio generated / real validation: "
    + ", ".join(f"{c} **{v:.2f}**" for c, v in
                (q["NN distance, generated"] / q["NN distance, real val"]).dropna().items()) + "."))

# %%
fake_idx = np.arange(len(synth_images))
nn_idx, nn_dist = [], []
for c in MINORITY:
    fk, tr = np.flatnonzero(np.array(synth_records["label"] == c)), np.flatnonzero(train_labels == c)
    if len(fk) and len(tr):
        i, d = quality.nearest_real(feats["fake"][fk], feats["train"][tr])
        nn_idx += list(zip(fk, tr[i.numpy()]))
        nn_dist += d.tolist()
order = np.argsort(nn_dist)[:8]
pairs = [nn_idx[i] for i in order]
image_grid([synth_images[f] for f, _ in pairs] + [gan_images[t] for _, t in pairs],
           [f"R3GAN {synth_records['label'][f]}\nd={nn_dist[i]:.1f}" for (f, _), i in zip(pairs, order)]
           + ["nearest training image"] * len(pairs), ncols=max(1, len(pairs)), size=1.3)
display(Markdown("The memorisation gallery: the eight generated images closest to a real training image "
                 "(top) and that image (bottom), distance in the features above."))

# %% [markdown]
# ## R3GAN images and CLAHE in the classifier
#
# The oversampling row's recipe, plus the generated images in the training set (the sampler
# still balances the classes, now drawing from real and generated images), then plus CLAHE
# on every image, real and generated, for training, validation and test alike.

# %%
run_row("+ R3GAN synthetic", sampler=True, synthetic=True)
run_row("+ CLAHE", sampler=True, synthetic=True, use_clahe=True);

# %% [markdown]
# ## The hybrid and its branches
#
# `convnextv2_swin_hybrid_*` (`leukemia_core.models.hybrid`): a ConvNeXtV2 branch and a
# Swin branch (image size and window set for small inputs) see the same image, their
# pooled features are concatenated and a two-layer MLP classifies. Concatenation rather
# than cross-attention: at these input sizes each branch ends on one pooled vector (Swin's
# last grid is 1x1 to 2x2 tokens), so there is no token sequence worth attending over, and
# it is what the paper describes. The branches alone use the same head. All three train
# from scratch with the oversampling recipe; the last row adds CLAHE and the R3GAN images
# (the paper's full method).

# %%
HV = SIZES["hybrid_variant"]
run_row("hybrid", model=f"convnextv2_swin_hybrid_{HV}", sampler=True)
run_row("ConvNeXtV2 branch alone", model=f"convnextv2_branch_{HV}", sampler=True)
run_row("Swin branch alone", model=f"swin_branch_{HV}", sampler=True)
run_row("hybrid + CLAHE + R3GAN", model=f"convnextv2_swin_hybrid_{HV}", sampler=True, synthetic=True,
        use_clahe=True);

# %% [markdown]
# ## The ablation table
#
# Test split: PBC's committed test images of the five classes, at their natural balance
# (never subsampled, never synthetic). One seed under `ci`, mean ± standard deviation over
# three under `full`. The paper's figure is its accuracy on Raabin-WBC: a different data set,
# shown for scale, not as a like-for-like target.

# %%
claims = load_claims()["papers"]["convnextv2_swin_r3gan_2025"]
claim = next(c for c in claims["claims"] if c["id"] == "raabin_headline")
ABLATION = [BASELINE, "+ class-weighted loss", "+ oversampling", "+ R3GAN synthetic", "+ CLAHE", "hybrid",
            "hybrid + CLAHE + R3GAN"]
METRICS = {"accuracy": lambda t: t["accuracy"], "macro-F1": lambda t: t["macro_f1"],
           "basophil recall": lambda t: t["per_class"]["basophil"]["recall"],
           "monocyte recall": lambda t: t["per_class"]["monocyte"]["recall"]}


def mean_std(name, metric):
    v = pd.Series([METRICS[metric](r["test"]) for r in ROWS[name]])
    return v.mean(), (v.std() if len(v) > 1 else np.nan)


def fmt(name, metric):
    m, s = mean_std(name, metric)
    return f"{m:.1%}" + ("" if np.isnan(s) else f" ± {s:.1%}")


def table_of(names):
    return pd.DataFrame([{"row": n, "model": ROWS[n][0]["recipe"]["model"],
                          "px": ROWS[n][0]["size"], **{m: fmt(n, m) for m in METRICS},
                          "training images (generated)": f"{ROWS[n][0]['n_train']:,} ({ROWS[n][0]['n_synthetic']})",
                          "min per seed": f"{np.mean([r['wall_s'] for r in ROWS[n]]) / 60:.1f}"}
                         for n in names]).set_index("row")


ablation = table_of(ABLATION)
ablation["paper (Raabin-WBC, accuracy)"] = ""
ablation.loc["hybrid + CLAHE + R3GAN", "paper (Raabin-WBC, accuracy)"] = f"{claim['value']:.1%}"
display(ablation)
def val_f1(name):
    return float(np.mean([r["val"]["macro_f1"] for r in ROWS[name]]))


best = max(ABLATION, key=val_f1)  # the strongest row, chosen on validation only
h_f1, h_baso = mean_std(HEADLINE, "macro-F1")[0], mean_std(HEADLINE, "basophil recall")[0]
b_f1, b_baso = mean_std(best, "macro-F1")[0], mean_std(best, "basophil recall")[0]
TARGETS = {"macro-F1": 0.93, "basophil recall": 0.85}  # this chapter's ci targets, set before results
met = h_f1 >= TARGETS["macro-F1"] and h_baso >= TARGETS["basophil recall"]
display(Markdown(
    f"**Headline row (pre-registered): {HEADLINE}**: test macro-F1 **{h_f1:.1%}**, basophil recall "
    f"**{h_baso:.1%}**; this chapter's targets (macro-F1 ≥ {TARGETS['macro-F1']:.0%}, basophil recall ≥ "
    f"{TARGETS['basophil recall']:.0%}) are **{'met' if met else 'not met'}** on it. The test split has "
    f"{ROWS[HEADLINE][0]['test']['per_class']['basophil']['support']} basophils among "
    f"{ROWS[HEADLINE][0]['test']['n']:,} cells. Claim beside it: {claim['statement'].strip()} "
    f"({claim['source']}).\n\n"
    f"The row with the highest **validation** macro-F1 ({val_f1(best):.1%}) is **{best}**: test "
    f"macro-F1 {b_f1:.1%}, basophil recall {b_baso:.1%}. "
    + ("It is the headline row." if best == HEADLINE else
       f"It is not the paper's method: at this profile's budget, {best} "
       f"{'beats' if b_f1 > h_f1 else 'does not beat'} the headline row on test macro-F1 "
       f"({100 * (b_f1 - h_f1):+.1f} points).")))
delta = {m: mean_std("+ R3GAN synthetic", m)[0] - mean_std("+ oversampling", m)[0] for m in METRICS}
display(Markdown("Adding the R3GAN images to the oversampling recipe changes " +
                 ", ".join(f"{m} by **{v:+.1%}**" for m, v in delta.items()) +
                 "; the from-scratch hybrid reaches macro-F1 "
                 f"{mean_std('hybrid', 'macro-F1')[0]:.1%} against {mean_std('+ oversampling', 'macro-F1')[0]:.1%} "
                 "for the fine-tuned ImageNet EfficientNet-Lite0 with the same recipe."))
long = pd.DataFrame([{"row": n, "metric": m, "value": mean_std(n, m)[0]} for n in ABLATION for m in METRICS])
fig = px.bar(long, x="metric", y="value", color="row", barmode="group", title="ablation, test split")
fig.update_layout(yaxis_range=[max(0, long["value"].min() - 0.05), 1], height=400).show()

# %% [markdown]
# ### Where the headline row and the validation-best row err

# %%
for name in dict.fromkeys([HEADLINE, best]):
    r = ROWS[name][0]
    confusion_matrix_figure(r["test"]["confusion_matrix"], CLASSES, title=f"{name}, test split").show()

# %% [markdown]
# ### The hybrid against each branch alone
#
# Same recipe (class-balanced sampler, no CLAHE, no generated images), same size, same
# schedule, from scratch.

# %%
display(table_of(["hybrid", "ConvNeXtV2 branch alone", "Swin branch alone"]))

# %% [markdown]
# ## What differs from the paper, and why
#
# | | paper | this chapter |
# |---|---|---|
# | data | Raabin-WBC (very few basophils) | PBC's five WBC classes, Raabin ratios imposed on the training split only |
# | evaluation | authors' code puts generated images in the test split | committed natural-balance test split; generated images only in training (`assert_real_only`) |
# | GAN | "R3GAN" (the public code: a DCGAN) | R3GAN as Huang et al. define it; tiny and short under `ci` |
# | hybrid | ConvNeXtV2 + Swin, presumably ImageNet-pretrained | same design from scratch (no offline weights); small (`atto`) and at 32 px under `ci` |
# | CLAHE | described, absent from the code | the book's CLAHE on the L channel of LAB |
#
# Under `full` (GPU) the same code runs a 64-px GAN for many more steps, the `tiny` hybrid at
# 224 px and three seeds.

# %%
split_sha = full_table.attrs.get("split_sha256")
written = []


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


for name, rs in ROWS.items():
    tests = [r["test"] for r in rs]
    selection = {"selected_on": "pre-registered"} if name == HEADLINE else {}
    per_seed = [{k: v for k, v in t.items() if k not in ("probs", "targets")} for t in tests]
    scalar = {m: float(np.mean([METRICS[m](t) for t in tests])) for m in METRICS}
    metrics = {"test": {"accuracy": scalar["accuracy"], "macro_f1": scalar["macro-F1"],
                        "basophil_recall": scalar["basophil recall"], "monocyte_recall": scalar["monocyte recall"],
                        "n": tests[0]["n"], "per_class": per_seed[0]["per_class"] if len(rs) == 1 else None},
               "val": {"macro_f1": val_f1(name)}, "per_seed": per_seed}
    if len(rs) > 1:
        metrics["test_std"] = {k: float(np.std([METRICS[m](t) for t in tests], ddof=1)) for k, m in
                               (("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
                                ("basophil_recall", "basophil recall"), ("monocyte_recall", "monocyte recall"))}
    written.append(write_results(
        REPO_ROOT / results_dir / P.name / f"r3gan_ablation_{slug(name)}.json", overwrite=True, kind="classification",
        chapter="08_r3gan_hybrid", paper="convnextv2_swin_r3gan_2025", method=name,
        model=rs[0]["recipe"]["model"], dataset="pbc:5 WBC classes, Raabin-like training imbalance",
        pretrained=rs[0]["recipe"]["model"] == "efficientnet_lite0", profile=P.name,
        profile_sizes=P.to_dict() | {"chapter": SIZES}, seeds=[r["seed"] for r in rs],
        config={"recipe": rs[0]["recipe"], "classes": CLASSES, "imbalance": protocol,
                "clahe": repr(clahe), "gan_checkpoint_sha256": gan.checkpoint_sha256,
                "n_train": rs[0]["n_train"], "n_synthetic": rs[0]["n_synthetic"]},
        split_sha256=split_sha, data_sha256=content_hash(rs[0]["data"].table), metrics=metrics,
        history=[r["history"] for r in rs], wall_time_s=float(sum(r["wall_s"] for r in rs)), **selection))
written.append(write_results(
    REPO_ROOT / results_dir / P.name / "r3gan_gan_quality.json", overwrite=True, kind="generative",
    chapter="08_r3gan_hybrid", paper="convnextv2_swin_r3gan_2025", method="R3GAN, minority classes",
    model="r3gan", dataset="pbc:monocyte, eosinophil, basophil (imbalanced training split)", pretrained=False,
    profile=P.name, profile_sizes=P.to_dict() | {"chapter": SIZES}, seeds=[0],
    config={"classes": MINORITY, "image_size": SIZES["gan_size"], "steps": SIZES["gan_steps"],
            "batch": SIZES["gan_batch"], "net": SIZES["gan_net"], "lr": SIZES["gan_lr"], "gamma": 0.05,
            "checkpoint_sha256": gan.checkpoint_sha256, "features": extractor.name, "reference": "validation split"},
    split_sha256=split_sha, data_sha256=content_hash(gan_rows),
    metrics={"per_class": q.reset_index().to_dict(orient="records"), "tstr_accuracy": tstr,
             "trtr_accuracy": trtr, "train_images_per_s": gan.train_images_per_s,
             "generator_samples_per_s": gen_rate},
    wall_time_s=gan.wall_s))
print("\n".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p) for p in written))
print(f"chapter wall time {(time.perf_counter() - CHAPTER_START) / 60:.1f} min")
