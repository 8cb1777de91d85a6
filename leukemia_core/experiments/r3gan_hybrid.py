"""Chapter 08 (``08_r3gan_hybrid``): CLAHE, R3GAN minority synthesis and a ConvNeXtV2–Swin
hybrid under a Raabin-like training imbalance.

The protocol, in the order it runs (the order of random-number use is part of it):

1. :func:`imbalanced_table`: PBC's five white-cell classes with Raabin-WBC's class ratios
   imposed on the committed *training* split only (validation and test untouched); the
   kept list is written to ``<out>/r3gan_hybrid/imbalanced_train.csv``;
2. the EfficientNet-Lite0 rows: baseline, class-weighted loss, oversampling
   (:func:`run_row`, one training run per seed, checkpoints under
   ``<out>/r3gan_hybrid/runs/<row>/seed<k>``);
3. :func:`train_gan`: one class-conditional R3GAN on the minority classes' real training
   images (``<out>/r3gan_hybrid/r3gan_generator.safetensors``, resumable state in
   ``<out>/r3gan_hybrid/r3gan_state``); :func:`synthesize` tops each minority class up to
   ``synthetic_per_class`` generated images per seed;
4. :func:`gan_quality`: KID/FID with their real-vs-real floors, k-NN precision/recall,
   nearest-neighbour distances and TSTR/TRTR, in the features of the baseline classifier;
5. the rows with generated images and CLAHE, the hybrid, each of its branches alone and
   the paper's method (hybrid + CLAHE + R3GAN);
6. :func:`write_ablation_results` / :func:`write_gan_quality`:
   ``<results_dir>/<profile>/r3gan_ablation_<row>.json`` and ``r3gan_gan_quality.json``.

No generated image ever enters validation or test (:func:`~leukemia_core.gan.balance.evaluation_rows`
raises on one).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.data import load_dataset
from leukemia_core.data.imbalance import RAABIN_RATIOS, imbalanced_train
from leukemia_core.data.records import WBC_CLASSES
from leukemia_core.data.splits import apply_split
from leukemia_core.data.transforms import CLAHE, static_transform
from leukemia_core.engine.train import FitConfig, evaluate, fit
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.gan import quality
from leukemia_core.gan.balance import evaluation_rows, top_up_counts, training_set
from leukemia_core.gan.provenance import generate, is_synthetic
from leukemia_core.gan.r3gan import R3GANConfig
from leukemia_core.gan.train import GANRun, train_r3gan
from leukemia_core.models import create_model, size_kwargs
from leukemia_core.pipeline import content_hash, make_loader, prepare_table, subsample
from leukemia_core.reproducibility.registry import load_claims
from leukemia_core.reproducibility.results import write_results

CHAPTER = "08_r3gan_hybrid"
PAPER_ID = "convnextv2_swin_r3gan_2025"
CLASSES = list(WBC_CLASSES)  # neutrophil, lymphocyte, monocyte, eosinophil, basophil
MINORITY = ["monocyte", "eosinophil", "basophil"]  # the classes the GAN synthesises
BASELINE = "baseline (imbalanced, Lite0)"
#: The ablation table's rows, in order (the branch-alone rows are a separate table).
ABLATION = [BASELINE, "+ class-weighted loss", "+ oversampling", "+ R3GAN synthetic", "+ CLAHE", "hybrid",
            "hybrid + CLAHE + R3GAN"]
BRANCHES = ["hybrid", "ConvNeXtV2 branch alone", "Swin branch alone"]
#: Test metrics of the tables, from one ``evaluate`` result.
METRICS = {"accuracy": lambda t: t["accuracy"], "macro-F1": lambda t: t["macro_f1"],
           "basophil recall": lambda t: t["per_class"]["basophil"]["recall"],
           "monocyte recall": lambda t: t["per_class"]["monocyte"]["recall"]}
GAN_GAMMA = 0.05  # gamma of R1 + R2


@dataclass
class Context:
    """What every step of the protocol shares: profile, sizes, seeds, data and where to write."""

    P: Profile
    sizes: dict
    seeds: list[int]
    full_table: pd.DataFrame
    table: pd.DataFrame  # imbalanced training split + committed val/test (capped under smoke)
    protocol: dict  # the imbalance's record (ratios, seed, SHA-256 of the kept list)
    out: Path  # <out>/r3gan_hybrid
    resume: bool = False
    clahe: CLAHE = field(default_factory=lambda: CLAHE(2.0, (8, 8)))
    start: float = field(default_factory=time.perf_counter)
    prepared: dict = field(default_factory=dict)  # (size, clahe, pretrained) -> (data, datasets)
    synth: dict = field(default_factory=dict)  # seed -> (generated images, their records)
    rows: dict = field(default_factory=dict)  # row name -> list of per-seed results


def slug(name: str) -> str:
    """A row name as a file-name part: ``+ R3GAN synthetic`` -> ``r3gan_synthetic``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# --------------------------------------------------------------------------- data
def imbalanced_table(data_root, sizes: dict, imbalance_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(full_table, table, protocol)``: PBC with its committed splits, the same with
    Raabin-WBC's ratios imposed on the training split only (``sizes["train_cap"]`` /
    ``eval_cap`` cap it under smoke), and the imbalance's record."""
    full_table = apply_split(load_dataset("pbc", data_root))
    table = imbalanced_train(full_table, RAABIN_RATIOS, seed=imbalance_seed)
    protocol = table.attrs["imbalance"]
    if sizes["train_cap"]:  # smoke only: a few images per class, the protocol's code path
        table = pd.concat([subsample(table[table["split"] == "train"], sizes["train_cap"], 0),
                           subsample(table[table["split"] == "val"], sizes["eval_cap"], 0),
                           subsample(table[table["split"] == "test"], sizes["eval_cap"], 0)], ignore_index=True)
        table.attrs = full_table.attrs | {"imbalance": protocol}
    return full_table, table, protocol


def split_counts(ctx: Context) -> pd.DataFrame:
    """Images per class and split, the training split's ratios against Raabin-WBC's and the
    committed (natural) training counts."""
    table, full_table = ctx.table, ctx.full_table
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(CLASSES)[["train", "val", "test"]]
    counts["train / neutrophil"] = counts["train"] / counts.loc["neutrophil", "train"]
    counts["Raabin ratio"] = pd.Series(RAABIN_RATIOS)
    counts["committed train"] = full_table[full_table["split"] == "train"].groupby("label").size().reindex(CLASSES)
    return counts


def prepared(ctx: Context, size: int, use_clahe: bool, model: str):
    """Preloaded train/val/test images at ``size`` (with or without CLAHE) and their normalisation."""
    pretrained = model == "efficientnet_lite0"
    key = (size, use_clahe, pretrained)
    if key not in ctx.prepared:
        data = prepare_table(ctx.table, ctx.P.replace(image_size=size), CLASSES, seed=0,
                             clahe=ctx.clahe if use_clahe else None, model=model, pretrained=pretrained)
        for s in ("val", "test"):
            evaluation_rows(data.table, s)  # raises on any synthetic row
        ctx.prepared[key] = (data, {s: data.dataset(s, size, preload=True) for s in ("train", "val", "test")})
    return ctx.prepared[key]


def synthetic_for(ctx: Context, size: int, use_clahe: bool, seed: int):
    """The generated training images of ``seed``, resized (and CLAHE'd) like the real ones."""
    from PIL import Image

    static = static_transform(size, ctx.clahe if use_clahe else None)
    ims = [np.asarray(static(Image.fromarray(a))) for a in ctx.synth[seed][0]]
    return ims, ctx.synth[seed][1]


# --------------------------------------------------------------------------- classifiers
def run_row(ctx: Context, name: str, model: str = "efficientnet_lite0", use_clahe: bool = False,
            sampler: bool = False, class_weights: bool = False, synthetic: bool = False) -> list[dict]:
    """Train ``model`` once per seed under one recipe; test on the natural-balance test split."""
    P = ctx.P
    size = ctx.sizes["image_size"] if model == "efficientnet_lite0" else ctx.sizes["hybrid_size"]
    data, ds = prepared(ctx, size, use_clahe, model)
    results = []
    for s in ctx.seeds:
        t0 = time.perf_counter()
        extra = synthetic_for(ctx, size, use_clahe, s) if synthetic else (None, None)
        train_ds = training_set(ds["train"].cache, data.split("train"), CLASSES, ds["train"].transform, *extra)
        loaders = {"train": make_loader(train_ds, P, True, weighted_sampler=sampler),
                   "val": make_loader(ds["val"], P, False), "test": make_loader(ds["test"], P, False)}
        weights = None
        if class_weights:
            n = torch.bincount(torch.tensor(train_ds.targets), minlength=len(CLASSES)).float()
            weights = (n.sum() / (len(n) * n)).tolist()
        pretrained = model == "efficientnet_lite0"
        cfg = FitConfig(epochs=ctx.sizes["epochs"] if pretrained else ctx.sizes["hybrid_epochs"],
                        lr=ctx.sizes["lr"] if pretrained else ctx.sizes["hybrid_lr"], warmup_epochs=0.3,
                        seed=s, class_weights=weights, progress=False)
        torch.manual_seed(s)
        net = create_model(model, len(CLASSES), pretrained=pretrained, **size_kwargs(model, size))
        fitted = fit(net, loaders["train"], loaders["val"], CLASSES, cfg,
                     out_dir=ctx.out / "runs" / slug(name) / f"seed{s}", resume=ctx.resume)
        val = evaluate(net, loaders["val"], CLASSES)  # what any choice between rows may look at
        test = evaluate(net, loaders["test"], CLASSES)
        results.append({"seed": s, "model": net, "val": val, "test": test, "history": fitted.history,
                        "n_train": len(train_ds), "n_synthetic": int(is_synthetic(train_ds.records).sum()),
                        "size": size, "wall_s": time.perf_counter() - t0, "data": data,
                        "recipe": {"model": model, "clahe": use_clahe, "sampler": sampler,
                                   "class_weights": class_weights, "synthetic": synthetic, "image_size": size,
                                   "epochs": cfg.epochs, "lr": cfg.lr}})
    ctx.rows[name] = results
    r = results[0]
    print(f"{name}: acc {r['test']['accuracy']:.3f}, macro-F1 {r['test']['macro_f1']:.3f}, basophil recall "
          f"{r['test']['per_class']['basophil']['recall']:.3f} ({r['wall_s']:.0f} s per seed; "
          f"chapter at {(time.perf_counter() - ctx.start) / 60:.1f} min)")
    return results


# --------------------------------------------------------------------------- the GAN
def at_gan_size(ctx: Context, split: str, classes: list[str]):
    """Real images of ``classes`` in ``split``, downsampled from the preloaded Lite0 ones to
    the GAN's size: ``(images, labels, rows)``."""
    from PIL import Image

    data, ds = prepared(ctx, ctx.sizes["image_size"], False, "efficientnet_lite0")
    to_gan_size = static_transform(ctx.sizes["gan_size"])
    rows = data.split(split)
    keep = rows["label"].isin(classes).to_numpy()
    ims = np.stack([np.asarray(to_gan_size(Image.fromarray(a))) for a, k in zip(ds[split].cache, keep) if k])
    return ims, rows.loc[keep, "label"].to_numpy(), rows[keep]


def train_gan(ctx: Context) -> dict:
    """One class-conditional R3GAN on the minority classes' real *training* images; its EMA
    generator is saved to ``r3gan_generator.safetensors`` and its training state, for
    ``resume``, to ``r3gan_state/``. Returns the run, its images and the sampling rate."""
    S = ctx.sizes
    gan_images, train_labels, gan_rows = at_gan_size(ctx, "train", MINORITY)  # real training images only
    gan_targets = [MINORITY.index(c) for c in train_labels]
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():  # a GAN this small gains nothing from a second CPU thread
        torch.set_num_threads(1)
    config = R3GANConfig(gamma=GAN_GAMMA, lr=S["gan_lr"])
    gan = train_r3gan(gan_images, gan_targets, len(MINORITY), S["gan_steps"], S["gan_batch"], seed=0,
                      net=S["gan_net"], config=config, out=ctx.out / "r3gan_generator.safetensors",
                      meta={"classes": MINORITY}, state_dir=ctx.out / "r3gan_state", resume=ctx.resume)
    torch.set_num_threads(threads)
    gen_t0 = time.perf_counter()
    with torch.no_grad():
        gan.generator(torch.randn(256, gan.generator.z_dim), torch.arange(256) % len(MINORITY))
    gen_rate = 256 / (time.perf_counter() - gen_t0)
    return {"gan": gan, "gan_config": config, "gan_images": gan_images, "train_labels": train_labels,
            "gan_targets": gan_targets, "gan_rows": gan_rows, "gen_rate": gen_rate}


def synthesize(ctx: Context, gan: GANRun) -> dict:
    """Per seed, the generated images that top each minority class up to
    ``synthetic_per_class`` (stored in ``ctx.synth``), with their provenance."""
    train_counts = ctx.table[ctx.table["split"] == "train"]["label"].value_counts().to_dict()
    n_new = top_up_counts(train_counts, MINORITY, ctx.sizes["synthetic_per_class"])
    for s in ctx.seeds:
        draws = [generate(gan.generator, i, c, n_new[c], seed=1000 * s + i, checkpoint_sha256=gan.checkpoint_sha256)
                 for i, c in enumerate(MINORITY)]
        ctx.synth[s] = (np.concatenate([d[0] for d in draws]), pd.concat([d[1] for d in draws], ignore_index=True))
    synth_images, synth_records = ctx.synth[ctx.seeds[0]]
    return {"train_counts": train_counts, "n_new": n_new, "synth_images": synth_images,
            "synth_records": synth_records}


def gan_quality(ctx: Context, g: dict) -> dict:
    """Sample quality in the features of the baseline classifier, against the validation
    split: the per-class table ``q`` (KID, FID and their real-vs-real floors, k-NN
    precision/recall, median nearest-training distances), TSTR and TRTR."""
    base_run = ctx.rows[BASELINE][0]
    extractor = quality.ClassifierFeatures(base_run["model"].cpu(), ctx.sizes["image_size"], base_run["data"].mean,
                                           base_run["data"].std, name="EfficientNet-Lite0 fine-tuned on the "
                                           "imbalanced real PBC training split (ImageNet init), pooled 1280-d")
    gan_images, train_labels, synth_images, synth_records = (g["gan_images"], g["train_labels"], g["synth_images"],
                                                             g["synth_records"])
    val_images, val_labels, _ = at_gan_size(ctx, "val", MINORITY)
    feats = {"train": quality.embed(extractor, gan_images), "val": quality.embed(extractor, val_images),
             "fake": quality.embed(extractor, synth_images)}
    cap = ctx.sizes["quality_real_cap"]
    qrows = []
    for c in MINORITY:
        tr, va, fk = train_labels == c, val_labels == c, np.array(synth_records["label"] == c)
        va_idx = np.flatnonzero(va)[:cap] if cap else np.flatnonzero(va)
        row = {"class": c, "real train": int(tr.sum()), "real val": len(va_idx), "generated": int(fk.sum())}
        if fk.sum() > 3 and tr.sum() > 3:
            gq = quality.kid_fid(extractor, val_images[va_idx], synth_images[fk])
            floor = quality.kid_fid(extractor, val_images[va_idx], gan_images[tr])
            pr = quality.knn_precision_recall(feats["val"][va_idx], feats["fake"][fk])
            _, d_fake = quality.nearest_real(feats["fake"][fk], feats["train"][tr])
            _, d_val = quality.nearest_real(feats["val"][va_idx], feats["train"][tr])
            row |= {"KID": gq["kid"], "KID real train vs val": floor["kid"], "FID": gq["fid"],
                    "FID real train vs val": floor["fid"], "precision": pr["precision"], "recall": pr["recall"],
                    "NN distance, generated": float(d_fake.median()),
                    "NN distance, real val": float(d_val.median())}
        qrows.append(row)
    q = pd.DataFrame(qrows).set_index("class")
    tstr = quality.train_on_test_on(feats["fake"], synth_records["label"], feats["val"], val_labels)
    trtr = quality.train_on_test_on(feats["train"], train_labels, feats["val"], val_labels)
    return {"extractor": extractor, "feats": feats, "val_images": val_images, "val_labels": val_labels,
            "q": q, "tstr": tstr, "trtr": trtr}


def sample_spread(g: dict) -> pd.DataFrame:
    """Per minority class, how different its images are from one another: the per-pixel
    standard deviation across images (0-255), averaged over pixels, for the real training
    images the GAN learnt from and for the generated ones."""
    def spread_of(ims):
        return float(ims.std(0).mean()) if len(ims) > 1 else np.nan

    return pd.DataFrame({c: {"real": spread_of(g["gan_images"][g["train_labels"] == c]),
                             "generated": spread_of(g["synth_images"][(g["synth_records"]["label"] == c).to_numpy()])}
                         for c in MINORITY}).T


def nearest_pairs(g: dict, k: int = 8) -> list[tuple[int, int, float]]:
    """The ``k`` generated images closest to a real training image of their class, in the
    quality features: ``(generated index, training index, distance)``, closest first."""
    nn_idx, nn_dist = [], []
    for c in MINORITY:
        fk = np.flatnonzero(np.array(g["synth_records"]["label"] == c))
        tr = np.flatnonzero(g["train_labels"] == c)
        if len(fk) and len(tr):
            i, d = quality.nearest_real(g["feats"]["fake"][fk], g["feats"]["train"][tr])
            nn_idx += list(zip(fk, tr[i.numpy()]))
            nn_dist += d.tolist()
    return [(*nn_idx[i], nn_dist[i]) for i in np.argsort(nn_dist)[:k]]


# --------------------------------------------------------------------------- tables
def mean_std(rows: dict, name: str, metric: str) -> tuple[float, float]:
    """Mean and standard deviation (NaN with one seed) of a test metric of row ``name``."""
    v = pd.Series([METRICS[metric](r["test"]) for r in rows[name]])
    return v.mean(), (v.std() if len(v) > 1 else np.nan)


def val_f1(rows: dict, name: str) -> float:
    """Validation macro-F1 of row ``name``, averaged over seeds: what choices between rows use."""
    return float(np.mean([r["val"]["macro_f1"] for r in rows[name]]))


def table_of(rows: dict, names: list[str]) -> pd.DataFrame:
    """The rows' test metrics (mean ± std over seeds), sizes and training-set sizes."""
    def fmt(name, metric):
        m, s = mean_std(rows, name, metric)
        return f"{m:.1%}" + ("" if np.isnan(s) else f" ± {s:.1%}")

    return pd.DataFrame([{"row": n, "model": rows[n][0]["recipe"]["model"],
                          "px": rows[n][0]["size"], **{m: fmt(n, m) for m in METRICS},
                          "training images (generated)": f"{rows[n][0]['n_train']:,} ({rows[n][0]['n_synthetic']})",
                          "min per seed": f"{np.mean([r['wall_s'] for r in rows[n]]) / 60:.1f}"}
                         for n in names]).set_index("row")


def gan_checks(q: pd.DataFrame, tstr: float, trtr: float) -> dict | None:
    """The chapter's verdict on the samples (None where the table holds no measurement):
    mean recall and precision, FID and nearest-neighbour distances as multiples of their
    real-vs-real values, and ``good``: recall at least 0.3, FID at most twice its floor
    and TSTR at least halfway from chance to TRTR."""
    if "recall" not in q or not q["recall"].notna().any():
        return None
    chance = 1 / len(MINORITY)
    rec, prec = q["recall"].mean(), q["precision"].mean()
    fid_x = q["FID"] / q["FID real train vs val"]
    nn_x = (q["NN distance, generated"] / q["NN distance, real val"]).dropna()
    useful = tstr >= chance + 0.5 * (trtr - chance)  # at least halfway from chance to the real-data score
    return {"recall": rec, "precision": prec, "fid_x": fid_x, "nn_x": nn_x,
            "good": bool(rec >= 0.3 and fid_x.max() <= 2 and useful)}


#: This chapter's ci targets on the headline row, set before any result.
TARGETS = {"macro-F1": 0.93, "basophil recall": 0.85}


def headline_summary(rows: dict, headline: str) -> dict:
    """The headline row's test macro-F1 and basophil recall (``h_f1``, ``h_baso``) and
    whether they meet :data:`TARGETS` (``met``); the row with the best *validation*
    macro-F1 (``best``, ``b_f1``, ``b_baso``); and what adding the R3GAN images to the
    oversampling recipe changes on test (``delta``, per metric)."""
    best = max(ABLATION, key=lambda n: val_f1(rows, n))  # the strongest row, chosen on validation only
    h_f1, h_baso = mean_std(rows, headline, "macro-F1")[0], mean_std(rows, headline, "basophil recall")[0]
    return {"best": best, "h_f1": h_f1, "h_baso": h_baso, "b_f1": mean_std(rows, best, "macro-F1")[0],
            "b_baso": mean_std(rows, best, "basophil recall")[0],
            "met": h_f1 >= TARGETS["macro-F1"] and h_baso >= TARGETS["basophil recall"],
            "delta": {m: mean_std(rows, "+ R3GAN synthetic", m)[0] - mean_std(rows, "+ oversampling", m)[0]
                      for m in METRICS}}


# --------------------------------------------------------------------------- results
def write_ablation_results(ctx: Context, results_dir: Path, headline: str, gan: GANRun) -> list[Path]:
    """One ``r3gan_ablation_<row>.json`` per row; the headline row is marked pre-registered."""
    split_sha, written = ctx.full_table.attrs.get("split_sha256"), []
    for name, rs in ctx.rows.items():
        tests = [r["test"] for r in rs]
        selection = {"selected_on": "pre-registered"} if name == headline else {}
        per_seed = [{k: v for k, v in t.items() if k not in ("probs", "targets")} for t in tests]
        scalar = {m: float(np.mean([METRICS[m](t) for t in tests])) for m in METRICS}
        metrics = {"test": {"accuracy": scalar["accuracy"], "macro_f1": scalar["macro-F1"],
                            "basophil_recall": scalar["basophil recall"], "monocyte_recall": scalar["monocyte recall"],
                            "n": tests[0]["n"], "per_class": per_seed[0]["per_class"] if len(rs) == 1 else None},
                   "val": {"macro_f1": val_f1(ctx.rows, name)}, "per_seed": per_seed}
        if len(rs) > 1:
            metrics["test_std"] = {k: float(np.std([METRICS[m](t) for t in tests], ddof=1)) for k, m in
                                   (("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
                                    ("basophil_recall", "basophil recall"), ("monocyte_recall", "monocyte recall"))}
        written.append(write_results(
            results_dir / ctx.P.name / f"r3gan_ablation_{slug(name)}.json", overwrite=True, kind="classification",
            chapter=CHAPTER, paper=PAPER_ID, method=name,
            model=rs[0]["recipe"]["model"], dataset="pbc:5 WBC classes, Raabin-like training imbalance",
            pretrained=rs[0]["recipe"]["model"] == "efficientnet_lite0", profile=ctx.P.name,
            profile_sizes=ctx.P.to_dict() | {"chapter": ctx.sizes}, seeds=[r["seed"] for r in rs],
            config={"recipe": rs[0]["recipe"], "classes": CLASSES, "imbalance": ctx.protocol,
                    "clahe": repr(ctx.clahe), "gan_checkpoint_sha256": gan.checkpoint_sha256,
                    "n_train": rs[0]["n_train"], "n_synthetic": rs[0]["n_synthetic"]},
            split_sha256=split_sha, data_sha256=content_hash(rs[0]["data"].table), metrics=metrics,
            history=[r["history"] for r in rs], wall_time_s=float(sum(r["wall_s"] for r in rs)), **selection))
    return written


def write_gan_quality(ctx: Context, results_dir: Path, g: dict, qual: dict) -> Path:
    """``r3gan_gan_quality.json``: the GAN's schedule and the sample-quality numbers."""
    S, gan = ctx.sizes, g["gan"]
    return write_results(
        results_dir / ctx.P.name / "r3gan_gan_quality.json", overwrite=True, kind="generative",
        chapter=CHAPTER, paper=PAPER_ID, method="R3GAN, minority classes",
        model="r3gan", dataset="pbc:monocyte, eosinophil, basophil (imbalanced training split)", pretrained=False,
        profile=ctx.P.name, profile_sizes=ctx.P.to_dict() | {"chapter": S}, seeds=[0],
        config={"classes": MINORITY, "image_size": S["gan_size"], "steps": S["gan_steps"],
                "batch": S["gan_batch"], "net": S["gan_net"], "lr": S["gan_lr"], "gamma": GAN_GAMMA,
                "checkpoint_sha256": gan.checkpoint_sha256, "features": qual["extractor"].name,
                "reference": "validation split"},
        split_sha256=ctx.full_table.attrs.get("split_sha256"), data_sha256=content_hash(g["gan_rows"]),
        metrics={"per_class": qual["q"].reset_index().to_dict(orient="records"), "tstr_accuracy": qual["tstr"],
                 "trtr_accuracy": qual["trtr"], "train_images_per_s": gan.train_images_per_s,
                 "generator_samples_per_s": g["gen_rate"]},
        wall_time_s=gan.wall_s)


# --------------------------------------------------------------------------- the experiment
def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False, *,
        seed: int = 0, imbalance_seed: int = 0, gan_steps: int | None = None,
        synthetic_per_class: int | None = None) -> ExperimentRun:
    """The chapter's whole protocol (see the module's docstring). ``seed``: the one seed
    when the profile has one and ``seeds`` is None; ``imbalance_seed``: which Raabin-like
    subsample of the training split; ``gan_steps`` / ``synthetic_per_class``: override the
    profile's R3GAN schedule and top-up target (the exercise)."""
    sizes = chapter_sizes(CHAPTER, profile)
    sizes |= {k: int(v) for k, v in (("gan_steps", gan_steps), ("synthetic_per_class", synthetic_per_class))
              if v is not None}
    P = (profile.replace(batch_size=sizes["batch_size"]) if isinstance(profile, Profile)
         else get_profile(profile, batch_size=sizes["batch_size"]))
    if seeds is None:
        seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
    out, results_dir = resolve_paths(P.name, out, results_dir)
    out = out / "r3gan_hybrid"
    out.mkdir(parents=True, exist_ok=True)
    headline = load_claims()["papers"][PAPER_ID]["headline"]["row"]  # pre-registered: the paper's method

    full_table, table, protocol = imbalanced_table(data_root, sizes, imbalance_seed)
    ctx = Context(P, sizes, list(seeds), full_table, table, protocol, out, resume)
    table[table["split"] == "train"][["relpath", "label"]].to_csv(out / "imbalanced_train.csv", index=False)
    print(f"profile {P.name}: classifier {sizes['image_size']} px, hybrid {sizes['hybrid_size']} px, "
          f"GAN {sizes['gan_size']} px x {sizes['gan_steps']} steps, seeds {ctx.seeds}")

    # the baseline and the two classic remedies
    run_row(ctx, BASELINE)
    run_row(ctx, "+ class-weighted loss", class_weights=True)
    run_row(ctx, "+ oversampling", sampler=True)
    # R3GAN for the rare classes, and its samples' quality in the baseline's features
    g = train_gan(ctx)
    g |= synthesize(ctx, g["gan"])
    qual = gan_quality(ctx, g)
    g |= {k: qual[k] for k in ("feats", "val_labels")}
    # generated images and CLAHE in the classifier; the hybrid and its branches
    run_row(ctx, "+ R3GAN synthetic", sampler=True, synthetic=True)
    run_row(ctx, "+ CLAHE", sampler=True, synthetic=True, use_clahe=True)
    hv = sizes["hybrid_variant"]
    run_row(ctx, "hybrid", model=f"convnextv2_swin_hybrid_{hv}", sampler=True)
    run_row(ctx, "ConvNeXtV2 branch alone", model=f"convnextv2_branch_{hv}", sampler=True)
    run_row(ctx, "Swin branch alone", model=f"swin_branch_{hv}", sampler=True)
    run_row(ctx, "hybrid + CLAHE + R3GAN", model=f"convnextv2_swin_hybrid_{hv}", sampler=True, synthetic=True,
            use_clahe=True)

    written = write_ablation_results(ctx, results_dir, headline, g["gan"])
    written.append(write_gan_quality(ctx, results_dir, g, qual))
    return ExperimentRun(CHAPTER, P.name, written, {
        "ctx": ctx, "P": P, "sizes": sizes, "seeds": ctx.seeds, "headline": headline, "out": out,
        "full_table": full_table, "table": table, "protocol": protocol, "counts": split_counts(ctx),
        "clahe": ctx.clahe, "rows": ctx.rows, "wall_s": time.perf_counter() - ctx.start, **g, **{k: qual[k] for k in ("extractor", "q", "tstr", "trtr")}})


# --------------------------------------------------------------------------- figures
def clahe_histograms(train_rows: pd.DataFrame, clahe: CLAHE, n: int) -> pd.DataFrame:
    """Per-channel intensity histograms (bins of 8) of ``n`` training images per class,
    before and after ``clahe``, as a long table (``attrs["n"]``: the number of images)."""
    from leukemia_core.data.torch_dataset import read_image

    hist_rows = subsample(train_rows, n, 0)
    bins = np.arange(0, 257, 8)
    hists = []
    for name, fn in (("original", lambda im: im), ("CLAHE", clahe)):
        pix = np.concatenate([np.asarray(fn(read_image(p))).reshape(-1, 3) for p in hist_rows["path"]])
        for ch, colour in enumerate(("red", "green", "blue")):
            h, _ = np.histogram(pix[:, ch], bins)
            hists += [{"image": name, "channel": colour, "intensity": b, "share of pixels": v}
                      for b, v in zip(bins[:-1], h / h.sum())]
    out = pd.DataFrame(hists)
    out.attrs["n"] = len(hist_rows)
    return out


def clahe_examples(train_rows: pd.DataFrame, clahe: CLAHE) -> tuple[list, list[str]]:
    """One random training image per class (numpy seed 0), before then after ``clahe``,
    with titles: for :func:`~leukemia_core.plots.image_grid` with ``len(CLASSES)`` columns."""
    from leukemia_core.data.torch_dataset import read_image

    rng = np.random.default_rng(0)
    shown = [train_rows[train_rows["label"] == c].iloc[int(rng.integers((train_rows["label"] == c).sum()))]
             for c in CLASSES]
    before = [read_image(r["path"]) for r in shown]
    return (before + [clahe(im) for im in before],
            [f"{r['label']}" for r in shown] + [f"{r['label']}, CLAHE" for r in shown])


def real_and_generated(objects: dict, k: int = 8) -> tuple[list, list[str]]:
    """Per minority class, up to ``k`` real training images at the GAN's size then up to
    ``k`` generated ones, with titles: for ``image_grid`` with ``k`` columns."""
    images, titles = [], []
    for i, c in enumerate(MINORITY):
        real = objects["gan_images"][np.flatnonzero(np.array(objects["gan_targets"]) == i)[:k]]
        fake = objects["synth_images"][(objects["synth_records"]["label"] == c).to_numpy()][:k]
        images += list(real) + list(fake)
        titles += [f"{c} real"] * len(real) + [f"{c} R3GAN"] * len(fake)
    return images, titles


def ablation_long(rows: dict) -> pd.DataFrame:
    """The ablation's mean test metrics as a long table (row, metric, value), for a bar chart."""
    return pd.DataFrame([{"row": n, "metric": m, "value": mean_std(rows, n, m)[0]} for n in ABLATION for m in METRICS])


# --------------------------------------------------------------------------- FCMAE pretraining
def pretrain_encoder(profile="reference", data_root=None, out=None, resume: bool = False, seed: int = 0):
    """FCMAE pretraining of the hybrid's ConvNeXtV2 branch (issue 19) on the committed
    pretraining pool at the profile's ``fcmae_*`` sizes; the run folder is
    ``<out>/fcmae_<encoder>_s<seed>`` (``leukemia-core pretrain fcmae``). Returns
    ``(model, loop result, run folder)``."""
    from leukemia_core.data.pretraining_pool import POOL_FILE, load_pool
    from leukemia_core.models.hybrid import VARIANTS
    from leukemia_core.reproducibility.reference import sha256
    from leukemia_core.ssl import FCMAEConfig, pretrain_fcmae

    P = profile if isinstance(profile, Profile) else get_profile(profile)
    S = chapter_sizes(CHAPTER, P)
    out, _ = resolve_paths(P.name, out, None)
    encoder = VARIANTS[S["hybrid_variant"]][0]
    cfg = FCMAEConfig(encoder=encoder, image_size=S["fcmae_size"], mask_ratio=S["fcmae_mask_ratio"],
                      decoder_dim=S["fcmae_decoder_dim"], epochs=S["fcmae_epochs"], batch_size=P.batch_size,
                      seed=seed, num_workers=P.num_workers, monitor_images=min(512, 64 if P.name == "smoke" else 512))
    run_dir = Path(out) / f"fcmae_{encoder}_s{seed}"
    pool = load_pool(data_root)
    start = time.perf_counter()
    model, result = pretrain_fcmae(pool, cfg, out_dir=run_dir, resume=resume, pool_sha256=sha256(POOL_FILE))
    write_pretraining_results(run_dir, P, cfg, pool, result, time.perf_counter() - start)
    return model, result, run_dir


def write_pretraining_results(run_dir: Path, P: Profile, cfg, pool, result, elapsed: float) -> Path:
    """``results.json`` in an FCMAE run folder: history (the monitoring images' masked
    reconstruction loss per epoch), the pool's hashes and datasets, hardware and times, what
    the encoder's model card is made from."""
    import dataclasses

    from leukemia_core.data.pretraining_pool import POOL_FILE
    from leukemia_core.reproducibility.reference import sha256
    from leukemia_core.reproducibility.results import session_wall_time

    path = Path(run_dir) / "results.json"
    last = result.history[-1] if result.history else {}
    return write_results(
        path, overwrite=True, kind="fcmae_pretraining", chapter=CHAPTER, model=cfg.encoder, method="FCMAE",
        profile=P.name, seeds=[cfg.seed], config=dataclasses.asdict(cfg),
        metrics={"epochs_run": len(result.history), "final_monitor_loss": last.get("val_loss"),
                 "final_train_loss": last.get("train_loss")},
        dataset="pretraining pool (training splits only)", datasets=sorted(pool["dataset"].unique().tolist()),
        split_sha256=sha256(POOL_FILE), data_sha256=sha256(POOL_FILE), pool_images=len(pool),
        history=result.history, wall_time_s=session_wall_time(path, result.history, elapsed),
        train_time_s=float(sum(h.get("train_time_s", 0.0) for h in result.history)))


# --------------------------------------------------------------------------- reference: the FCMAE encoder
#: The chapter's FCMAE reference checkpoint (issue 19): the hybrid's ConvNeXtV2 branch
#: pretrained on the unlabelled pool, with its decoder (for the reconstructions).
FCMAE_REFERENCE = "fcmae_convnextv2_atto"
#: The masks of every live evaluation (the same hidden patches every build).
FCMAE_EVAL_SEED = 0
FCMAE_USE = ("Teaching and reproducibility: the initialisation of the hybrid's ConvNeXtV2 branch (FCMAE, a masked "
             "autoencoder's encoder), and its reconstructions in the chapter. Not a classifier; a research "
             "artefact, not a medical device.")
FCMAE_LIMITS = ("Pretrained on the training splits of the book's single-cell datasets only (the committed pool: no "
                "copy of any validation or test image); one stain and scanner family per dataset, so what it "
                "learnt is tied to these sources. Reconstruction quality is not classification quality: the "
                "chapter's fine-tuned rows judge the encoder.")


def _fcmae_test(meta: dict, data_root, per_class: int | None = None):
    """``(rows, dataset)``: PBC's committed test images of the chapter's five classes (the
    first ``per_class`` of each, or all), at the checkpoint's own preprocessing."""
    from leukemia_core.data.torch_dataset import ImageTableDataset
    from leukemia_core.data.transforms import eval_transform_from
    from leukemia_core.reproducibility.reference import first_per_class

    table = apply_split(load_dataset("pbc", data_root))
    test = first_per_class(table[(table["split"] == "test") & table["label"].isin(CLASSES)], "label", per_class)
    test = test.reset_index(drop=True)
    return test, ImageTableDataset(test, CLASSES, eval_transform_from(meta["preprocess"]))


def fcmae_scores(model, ds, batch_size: int = 64) -> dict:
    """The encoder's live score: the pretraining objective (masked, per-patch normalised
    reconstruction loss) on ``ds`` under the masks of :data:`FCMAE_EVAL_SEED`."""
    from torch.utils.data import DataLoader

    from leukemia_core.ssl import masked_loss

    m = masked_loss(model, DataLoader(ds, batch_size=batch_size), FCMAE_EVAL_SEED, torch.device("cpu"))
    return {"masked_loss": m["loss"], "n": m["n"]}


def publish_fcmae_reference(out, data_root=None, root=None, seed: int = 0, log=print,
                            note: str | None = None) -> list[Path]:
    """Publish the finished FCMAE run under ``out`` (``leukemia-core pretrain fcmae --profile
    reference --out OUT``) as ``reference/08_r3gan_hybrid/fcmae_convnextv2_atto``, in the
    smallest storage whose masked loss on the test images stays within 0.001 of the float32
    weights' (:func:`~leukemia_core.reproducibility.reference.publish_smallest`). A run
    without ``results.json`` (not finished) is reported through ``log`` and not published."""

    from leukemia_core.models.hybrid import VARIANTS
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    encoder = VARIANTS[chapter_sizes(CHAPTER, "reference")["hybrid_variant"]][0]
    run_dir = Path(out) / f"fcmae_{encoder}_s{seed}"
    results = reference.finished_run(run_dir, FCMAE_REFERENCE, log)
    if results is None:
        return []
    cfg = results["config"]
    cache = {}

    def score() -> dict:
        model, meta, _, _ = reference.load_reference(CHAPTER, FCMAE_REFERENCE, root)
        if "ds" not in cache:
            cache["ds"] = _fcmae_test(meta, data_root)[1]
        return fcmae_scores(model, cache["ds"])

    card = dict(description=f"FCMAE-pretrained {cfg['encoder']} with its decoder ({cfg['decoder_dim']} wide), "
                            f"{cfg['image_size']} px, mask ratio {cfg['mask_ratio']}, {len(results['history'])} "
                            f"epochs on the unlabelled pretraining pool ({results.get('pool_images')} images of "
                            f"{', '.join(results['datasets'])}), seed {seed}.",
                command=reference.command_line(
                    f"leukemia-core pretrain fcmae --profile reference --out {out} [--resume]", note),
                intended_use=FCMAE_USE, limits=FCMAE_LIMITS, results=results, root=root)
    return [reference.publish_smallest(run_dir, CHAPTER, FCMAE_REFERENCE, score, **card)]


def evaluate_fcmae_reference(data_root=None, results_dir=None, root=None, per_class: int | None = None,
                             show_per_class: int = 1) -> dict:
    """Verify the FCMAE reference checkpoint and evaluate it live on the test images
    (:func:`fcmae_scores`), writing ``<results_dir>/reference/r3gan_hybrid_fcmae_convnextv2_atto.json``
    (``per_class``: the first so many per class, written under
    :func:`~leukemia_core.reproducibility.reference.evaluations_dir`).

    ``{"check", "metrics" (None unless verified), "card", "log", "images"}``; ``images``:
    for ``show_per_class`` test images of each class, the image, what the encoder saw (hidden
    patches grey) and the reconstruction, as HWC arrays in [0, 1]."""
    import time

    import numpy as np

    from leukemia_core.data.dataroot import REPO_ROOT
    from leukemia_core.data.splits import split_paths
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    _, results_dir = resolve_paths("reference", None, results_dir)
    chk = reference.check(CHAPTER, FCMAE_REFERENCE, root)
    out = {"check": chk, "metrics": None, "card": None, "log": None, "images": None}
    if chk["status"] != "verified":
        return out
    start = time.perf_counter()
    model, meta, _, card = reference.load_reference(CHAPTER, FCMAE_REFERENCE, root)
    test, ds = _fcmae_test(meta, data_root, per_class)
    scores = fcmae_scores(model, ds)
    split = split_paths("pbc")[0]
    write_results(
        reference.evaluations_dir(results_dir, per_class) / f"r3gan_hybrid_{FCMAE_REFERENCE}.json", overwrite=True,
        kind="reference_evaluation", chapter=CHAPTER, reference=FCMAE_REFERENCE, dataset="pbc",
        model=meta["encoder"], profile="reference", seeds=[int(card.get("config", {}).get("seed", 0))],
        config={"checkpoint": f"reference/{CHAPTER}/{FCMAE_REFERENCE}/model.safetensors",
                "checkpoint_sha256": reference.read_manifest(root)[f"{CHAPTER}/{FCMAE_REFERENCE}/model.safetensors"],
                "dtype": card["dtype"], "preprocess": meta["preprocess"], "mask_ratio": meta["mask_ratio"],
                "mask_seed": FCMAE_EVAL_SEED, "classes": CLASSES},
        metrics={"test": scores}, split_file=str(split.relative_to(REPO_ROOT)), split_sha256=reference.sha256(split),
        data_sha256=content_hash(test),
        training={k: card.get(k) for k in ("wall_time_s", "train_time_s", "epochs_run", "git_sha", "hardware")},
        wall_time_s=time.perf_counter() - start)
    firsts = test.groupby("label", sort=False).head(show_per_class)
    picks = [i for c in CLASSES for i in firsts.index[firsts["label"] == c]]  # in the chapter's class order
    x = torch.stack([ds[i][0] for i in picks])
    g = torch.Generator().manual_seed(FCMAE_EVAL_SEED)
    mask = model.random_mask(len(x), generator=g)
    with torch.no_grad():
        recon = model.reconstruct(x, mask)
        patches = model.patchify(x)
        hidden = model.unpatchify(mask.float().unsqueeze(-1).expand_as(patches).contiguous())  # 1: hidden pixel
    mean = torch.tensor(meta["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["preprocess"]["std"]).view(1, 3, 1, 1)
    to_img = lambda t: (t * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    original = to_img(x)
    out["images"] = {"labels": test.loc[picks, "label"].tolist(), "original": original,
                     "masked": np.where(hidden.permute(0, 2, 3, 1).numpy() > 0.5, 0.5, original),
                     "reconstruction": to_img(recon)}
    out.update(metrics={"test": scores}, card=card,
               log=reference.training_log(CHAPTER, FCMAE_REFERENCE, root).to_dict("records"))
    return out


def publish_reference(out, data_root=None, root=None, seed: int = 0, log=print, models=None,
                      note: str | None = None) -> list[Path]:
    """``leukemia-core reference publish 08_r3gan_hybrid``: the chapter's reference
    checkpoints that exist so far (the FCMAE encoder, :func:`publish_fcmae_reference`)."""
    from leukemia_core.errors import UnknownNameError

    unknown = set(models or ()) - {FCMAE_REFERENCE}
    if unknown:
        raise UnknownNameError(f"no reference model {sorted(unknown)} in {CHAPTER}; choose from {[FCMAE_REFERENCE]}")
    return publish_fcmae_reference(out, data_root, root, seed, log, note)
