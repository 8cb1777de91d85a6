"""Chapter 05 (vision-language): the whole protocol of ``notebooks/05_vision_language.py``.

One joint image-text model (EfficientNet-Lite0 + frozen all-MiniLM-L6-v2, multi-positive
symmetric InfoNCE on class, attribute and clause sentences) trained on the taxonomy's
leaves; evaluated by zero-shot prompts (PBC's five leukocytes, normal / benign / AML /
ALL), source-shortcut checks, image <-> attribute-sentence retrieval and attribute
read-out; a second training without ``heldout_class`` that must recognise it from its
description alone; linear probes against a supervised EfficientNet-Lite0 at equal budget;
what the CML / CLL prompts attract. Writes ``<results_dir>/<profile>/vision_language.json``
and the checkpoints ``vl_lite0_minilm_s<seed>``, ``vl_without_<class>_s<seed>`` and
``pbc_efficientnet_lite0_supervised_equal_budget_s<seed>`` under ``out``.

The steps run in the notebook's order (and so use the random numbers in the same order).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.data.dataroot import data_root as resolve_root
from leukemia_core.data.prepare import content_hash, subsample
from leukemia_core.engine.train import FitConfig, evaluate, fit
from leukemia_core.errors import LeukemiaError
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.models import create_model
from leukemia_core.reproducibility.registry import load_claims
from leukemia_core.reproducibility.results import session_wall_time, write_results
from leukemia_core.vl import (GROUPS, IndexedDataset, LabelledView, TextBank, VLFitConfig, attribute_readout,
                              attribute_sentence, build_vl_model, class_prompts, class_texts, embed_images,
                              eval_view, fit_vl, heldout_split, linear_probe, load_vl_table, prepare_vl,
                              prompt_embeddings, retrieval_report, templates, text_class_groups,
                              zero_shot_logits, zero_shot_metrics)
from leukemia_core.vl.texts import key_to_attributes
from leukemia_core.vl.train import WEIGHTS

CHAPTER = "05_vision_language"
WBC = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
PROMPT_SETS = {"heldout": "held-out prompts", "sentences": "training paraphrases",
               "attributes": "textbook attribute profile"}
CAM_SOURCES = ["pbc:neutrophil", "pbc:monocyte", "matek:neutrophil", "matek:myeloblast", "aria:benign",
               "aria:pro_b", "pbc:eosinophil", "pbc:lymphocyte"]


class Timer:
    """Seconds per phase, for the results JSON."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def tick(self, name: str):
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 1)
        self.last = now

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.start


# --------------------------------------------------------------------------- data
def assemble_data(data_root, P: Profile, S: dict, seed: int) -> dict:
    """The taxonomy's leaves with text classes and WBCAtt attributes (``table``), capped per
    source for training (``data``), and the count table the chapter shows."""
    table = load_vl_table(data_root)
    data = prepare_vl(table, P, S["train_cap"], P.max_eval_per_class, seed)
    counts = data.table.pivot_table(index=["group", "text_class", "source"], columns="split", values="relpath",
                                    aggfunc="count", fill_value=0)[["train", "test"]]
    counts["available for training"] = table[table["split"] == "train"].groupby(
        ["group", "text_class", "source"]).size().reindex(counts.index)
    return {"table": table, "data": data, "train": data.split("train"), "test": data.split("test"),
            "counts": counts}


def sentence_tables(train: pd.DataFrame) -> dict:
    """The class descriptions (one row per class) and one PBC cell's sentence in every template."""
    texts, groups_of = class_texts(), text_class_groups()
    descriptions = pd.DataFrame([{"class": c, "group": groups_of[c], "training paraphrases": len(t.sentences),
                                  "held-out prompts": len(t.heldout), "example": t.sentences[0],
                                  "images": "none public (prompts only)" if c in ("CML", "CLL") else "yes"}
                                 for c, t in texts.items()]).set_index("class")
    cell = train[train["attr_key"] != ""].iloc[0]
    examples = ([(f"training template {t}", attribute_sentence(cell, t)) for t in range(len(templates()))]
                + [("held-out template", attribute_sentence(cell, templates(heldout=True)[0]))])
    return {"texts": texts, "groups_of": groups_of, "descriptions": descriptions, "example_cell": cell,
            "example_sentences": examples}


# --------------------------------------------------------------------------- training
def train_joint(data, train, P: Profile, S: dict, seed: int, out: Path, resume: bool = False,
                timer: Timer | None = None) -> dict:
    """The joint model on every training image (class-balanced resampling by text class),
    checkpoint in ``out/vl_lite0_minilm_s<seed>``."""
    size = P.image_size
    model = build_vl_model(image_model="efficientnet_lite0", pretrained=True, image_size=size,
                           embed_dim=S["embed_dim"], text_trainable_layers=S["text_trainable_layers"])
    bank = TextBank.build(train)
    if model.text_tower.frozen:  # every training sentence through MiniLM once
        bank.cache_features(model.text_tower)
    print(bank.summary())
    train_ds = data.dataset("train", size, preload=P.preload_images)
    if timer:
        timer.tick("model, text features, training images decoded")
    config = VLFitConfig(epochs=S["epochs"], batch_size=P.batch_size, lr=S["lr"], head_lr=S["head_lr"],
                         num_workers=P.num_workers, seed=seed)
    run_dir = out / f"vl_lite0_minilm_s{seed}"
    meta = {"profile": P.name, "image_size": size, "mean": data.mean, "std": data.std, "sources": data.classes,
            "text_classes": bank.classes}
    joint = fit_vl(model, train_ds, bank, config, out_dir=run_dir, meta=meta, resume=resume)
    if timer:
        timer.tick("joint training")
    return {"model": model, "bank": bank, "train_ds": train_ds, "config": config, "run_dir": run_dir, "meta": meta,
            "joint": joint, "history": pd.DataFrame(joint.history),
            "per_text_class": train.groupby("text_class").size()}


def embed_splits(model, data, train, train_ds, P: Profile, S: dict, seed: int) -> dict:
    """Unit embeddings and pooled features of the test split, and pooled features of the probe
    images (every PBC training image and ``probe_cap`` per other source) by the trained tower
    and by the untouched ImageNet tower."""
    size = P.image_size
    test_ds = IndexedDataset(data.dataset("test", size, preload=P.preload_images))
    probe_rows = np.flatnonzero(np.array(train["dataset"] == "pbc")).tolist()
    others = train[train["dataset"] != "pbc"]
    probe_rows += sorted(subsample(others.reset_index().assign(label=others["source"].to_numpy()), S["probe_cap"],
                                   seed)["index"].tolist())
    probe = train.iloc[probe_rows].reset_index(drop=True)
    probe_ds = Subset(IndexedDataset(eval_view(train_ds, data, size)), probe_rows)
    test_emb, test_feat = embed_images(model, test_ds)
    _, probe_feat = embed_images(model, probe_ds)
    imagenet = build_vl_model(image_model="efficientnet_lite0", pretrained=True, image_size=size, embed_dim=8,
                              text_tower=model.text_tower if model.text_tower.frozen else None)
    _, probe_feat_in = embed_images(imagenet, probe_ds)
    _, test_feat_in = embed_images(imagenet, test_ds)
    del imagenet
    print(f"embedded {len(test_emb):,} test images and {len(probe):,} training images for the probes")
    return {"test_ds": test_ds, "probe_rows": probe_rows, "probe": probe, "test_emb": test_emb,
            "test_feat": test_feat, "probe_feat": probe_feat, "probe_feat_in": probe_feat_in,
            "test_feat_in": test_feat_in}


# --------------------------------------------------------------------------- evaluation
def zero_shot_pbc(model, test_emb, pbc_labels, is_pbc) -> dict:
    """PBC's five leukocytes by each prompt set (held-out prompts, paraphrases, attribute profiles)."""
    return {which: zero_shot_metrics(test_emb[is_pbc], pbc_labels,
                                     prompt_embeddings(model, class_prompts(WBC, which)), WBC)
            for which in PROMPT_SETS}


def shortcut_checks(model, test, test_emb, probe, feats: dict, classes8, groups_of) -> dict:
    """Which hospital? (linear probes on both towers' features) and the within-source contrasts."""
    src_probe = {name: linear_probe(tr, probe["dataset"], te, test["dataset"])
                 for name, tr, te in (("ImageNet tower (no training)", feats["probe_feat_in"], feats["test_feat_in"]),
                                      ("vision-language tower", feats["probe_feat"], feats["test_feat"]))}
    grp_probe_in = linear_probe(feats["probe_feat_in"], probe["group"], feats["test_feat_in"], test["group"])
    within = []
    for source, pair in (("matek", ["neutrophil", "AML"]), ("aria", ["hematogone", "ALL"])):
        m = np.array(test["dataset"] == source)
        r = zero_shot_metrics(test_emb[m], test.loc[m, "text_class"].tolist(),
                              prompt_embeddings(model, class_prompts(pair)), pair)
        within.append({"check": f"{source}: {pair[0]} vs {pair[1]} (zero-shot prompts)", "accuracy": r["accuracy"],
                       "balanced accuracy": r["balanced_accuracy"], "test images": r["n"]})
        g = zero_shot_metrics(test_emb[m], test.loc[m, "group"].tolist(),
                              prompt_embeddings(model, class_prompts(classes8)), classes8, groups_of, GROUPS)
        within.append({"check": f"{source}: four-group task on its images only", "accuracy": g["accuracy"],
                       "balanced accuracy": np.nan, "test images": g["n"]})
    for name, r in src_probe.items():
        within.append({"check": f"source dataset from the {name}, linear probe", "accuracy": r["accuracy"],
                       "balanced accuracy": r["balanced_accuracy"], "test images": r["n_test"]})
    within.append({"check": "four groups from the ImageNet tower (no leukemia training), linear probe",
                   "accuracy": grp_probe_in["accuracy"], "balanced accuracy": grp_probe_in["balanced_accuracy"],
                   "test images": grp_probe_in["n_test"]})
    within = pd.DataFrame(within).set_index("check")
    return {"src_probe": src_probe, "grp_probe_in": grp_probe_in, "within": within,
            "wm": within.iloc[0], "wa": within.iloc[2]}


def retrieval_on_attributes(model, pbc_test: pd.DataFrame, emb: torch.Tensor) -> dict:
    """Image <-> attribute sentence (held-out template) retrieval; hits by attribute tuple."""
    keys = pbc_test["attr_key"].tolist()
    uniq = sorted(set(keys))
    sentences = [attribute_sentence(key_to_attributes(k), templates(heldout=True)[0]) for k in uniq]
    with torch.no_grad():
        sent_emb = model.encode_text(sentences).cpu()
    retrieval = retrieval_report(emb, keys, sent_emb, uniq)
    return {"retrieval": retrieval, "keys": keys, "uniq": uniq,
            "r5": retrieval.set_index(["direction", "k"]).loc[("image → text", 5)]}


def readout_attributes(model, emb, pbc_test, train) -> dict:
    """Every WBCAtt attribute read out by value sentences, beside its majority floor."""
    from leukemia_core.data import ATTRIBUTES

    annotated = train[np.array((train["dataset"] == "pbc") & (train["attr_key"] != ""))]
    top_share = {a: annotated[a].value_counts(normalize=True) for a in ATTRIBUTES}
    readout = attribute_readout(model, emb, pbc_test, annotated)
    readout["above floor"] = readout["accuracy"] > readout["majority_floor"]
    return {"annotated": annotated, "top_share": top_share,
            "most_unbalanced": max(top_share, key=lambda a: top_share[a].iloc[0]), "readout": readout}


def train_heldout(model, train, train_ds, config, meta, heldout_class: str, P: Profile, S: dict, seed: int,
                  out: Path, resume: bool = False) -> dict:
    """A second model trained without ``heldout_class`` (images, class and attribute
    sentences) on at most ``heldout_train_cap`` PBC images per class; all five classes then
    predicted by prompts, so the missing one only from its description."""
    pool = train[np.array((train["dataset"] == "pbc") & (train["text_class"] != heldout_class))]
    pool = subsample(pool.assign(label=pool["text_class"]), S["heldout_train_cap"], seed)
    held_rows = train.reset_index().merge(pool[["relpath"]], on="relpath")["index"].tolist()
    held_table = heldout_split(train.iloc[held_rows].reset_index(drop=True), heldout_class)
    assert len(held_table) == len(held_rows) and heldout_class not in set(held_table["text_class"])
    held_bank = TextBank.build(held_table)
    assert heldout_class not in held_bank.classes
    held_model = build_vl_model(image_model="efficientnet_lite0", pretrained=True, image_size=P.image_size,
                                embed_dim=S["embed_dim"], text_trainable_layers=S["text_trainable_layers"],
                                text_tower=model.text_tower if model.text_tower.frozen else None)
    held_fit = fit_vl(held_model, Subset(train_ds, held_rows), held_bank,
                      VLFitConfig(**(config.__dict__ | {"epochs": S["heldout_epochs"]})),
                      out_dir=out / f"vl_without_{heldout_class}_s{seed}",
                      meta=meta | {"heldout_class": heldout_class}, resume=resume)
    return {"held_table": held_table, "held_model": held_model, "held_fit": held_fit}


def score_heldout(held_model, test_ds, is_pbc, pbc_labels, heldout_class: str) -> dict:
    """The held-out model's five-class zero-shot metrics, its accuracy on the four seen
    classes, and one summary row per prompt set for the unseen class (recall, top 2, AUROCs)."""
    from sklearn.metrics import roc_auc_score

    held_emb, _ = embed_images(held_model, Subset(test_ds, np.flatnonzero(is_pbc).tolist()), features=False)
    held = {w: zero_shot_metrics(held_emb, pbc_labels, prompt_embeddings(held_model, class_prompts(WBC, w)), WBC)
            for w in ("heldout", "attributes")}
    seen = [c for c in WBC if c != heldout_class]
    mask_seen = np.array([y != heldout_class for y in pbc_labels])
    held_seen = zero_shot_metrics(held_emb[mask_seen], [y for y in pbc_labels if y != heldout_class],
                                  prompt_embeddings(held_model, class_prompts(seen)), seen)
    is_held = np.array([y == heldout_class for y in pbc_labels])
    rows = []
    for w, m in held.items():
        pc = m["per_class"][heldout_class]
        sims = zero_shot_logits(held_emb, prompt_embeddings(held_model, class_prompts(WBC, w))).numpy()
        k = WBC.index(heldout_class)
        margin = sims[:, k] - np.delete(sims, k, axis=1).max(1)  # > 0: the unseen class wins
        rank = (sims > sims[:, [k]]).sum(1)  # 0: its prompt is the most similar
        rows.append({"prompts": {"heldout": "held-out class prompts", "attributes": "textbook attribute profiles"}[w],
                     f"{heldout_class} recall (unseen class)": pc["recall"],
                     f"{heldout_class} in top 2": float((rank[is_held] <= 1).mean()),
                     f"AUROC, similarity to the {heldout_class} prompt": roc_auc_score(is_held, sims[:, k]),
                     "AUROC, margin over the best seen class": roc_auc_score(is_held, margin),
                     "5-class accuracy": m["accuracy"]})
    summary = pd.DataFrame(rows).set_index("prompts")
    unseen = summary.iloc[0]
    unseen_recall = unseen[f"{heldout_class} recall (unseen class)"]
    return {"held": held, "held_seen": held_seen, "held_table_summary": summary, "unseen_recall": unseen_recall,
            "unseen_auc": unseen[f"AUROC, similarity to the {heldout_class} prompt"],
            "unseen_fails": unseen_recall <= 1 / len(WBC)}


def heldout_profile_table(table: pd.DataFrame, texts, heldout_class: str) -> pd.DataFrame | None:
    """The held-out class's textbook attribute profile against WBCAtt (all splits): how many
    cells with each value are of that class, and how many of its cells have the value."""
    profile_attrs = texts[heldout_class].attributes
    if not profile_attrs:
        return None
    pbc_all = table[table["dataset"] == "pbc"]
    own = pbc_all["text_class"] == heldout_class
    return pd.DataFrame([{"attribute": a, "textbook value": v,
                          f"cells with this value that are {heldout_class}s": float((own[pbc_all[a] == v]).mean()),
                          f"{heldout_class}s with this value": float((pbc_all.loc[own, a] == v).mean())}
                         for a, v in profile_attrs.items()]).set_index("attribute")


def probes_and_supervised(train_ds, test_ds, feats: dict, probe, is_pbc, pbc_labels, config, P: Profile, S: dict,
                          seed: int, out: Path, resume: bool = False) -> dict:
    """Linear probes on both towers' pooled features, and EfficientNet-Lite0 fine-tuned with
    cross-entropy on the same PBC images, image size and epochs (equal budget)."""
    is_pbc_pr = np.array(probe["dataset"] == "pbc")
    y_tr, y_te = probe.loc[is_pbc_pr, "text_class"].tolist(), pbc_labels
    probe_vl = linear_probe(feats["probe_feat"][is_pbc_pr], y_tr, feats["test_feat"][is_pbc], y_te)
    probe_in = linear_probe(feats["probe_feat_in"][is_pbc_pr], y_tr, feats["test_feat_in"][is_pbc], y_te)
    sup_rows = [feats["probe_rows"][i] for i in np.flatnonzero(is_pbc_pr)]  # the PBC training images
    sup_train = LabelledView(train_ds, sup_rows, [WBC.index(c) for c in y_tr])
    sup_test = LabelledView(test_ds.base, np.flatnonzero(is_pbc).tolist(), [WBC.index(c) for c in y_te])
    torch.manual_seed(seed)
    sup = create_model("efficientnet_lite0", num_classes=len(WBC), pretrained=True)
    fit(sup, DataLoader(sup_train, batch_size=P.batch_size, shuffle=True, drop_last=True,
                        num_workers=P.num_workers, persistent_workers=P.num_workers > 0),
        None, WBC, FitConfig(epochs=S["epochs"], lr=S["lr"], warmup_epochs=config.warmup_epochs,
                             seed=seed, progress=False),
        out_dir=out / f"pbc_efficientnet_lite0_supervised_equal_budget_s{seed}", resume=resume)
    sup_test_m = evaluate(sup, DataLoader(sup_test, batch_size=P.batch_size * 2), WBC)
    return {"y_tr": y_tr, "y_te": y_te, "probe_vl": probe_vl, "probe_in": probe_in, "sup_test_m": sup_test_m}


def probe_table(probe_in, probe_vl, zs, sup_test_m) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": "linear probe, ImageNet tower (no training)", "accuracy": probe_in["accuracy"],
         "balanced accuracy": probe_in["balanced_accuracy"]},
        {"model": "linear probe, vision-language tower", "accuracy": probe_vl["accuracy"],
         "balanced accuracy": probe_vl["balanced_accuracy"]},
        {"model": "zero-shot by held-out prompts (no probe)", "accuracy": zs["heldout"]["accuracy"],
         "balanced accuracy": zs["heldout"]["balanced_accuracy"]},
        {"model": "supervised fine-tuning, equal budget", "accuracy": sup_test_m["accuracy"],
         "balanced accuracy": sup_test_m["balanced_accuracy"]},
    ]).set_index("model")


def chronic_prompts(model, test, test_emb, classes8) -> dict:
    """The eight described classes with images plus CML and CLL (no public images): which
    test cells would be called CML or CLL."""
    classes10 = classes8 + ["CML", "CLL"]
    pred10 = zero_shot_metrics(test_emb, test["text_class"].tolist(),
                               prompt_embeddings(model, class_prompts(classes10)), classes10)["predictions"]
    open_set = pd.crosstab(test["text_class"], pd.Series(pred10, name="predicted", index=test.index))
    open_set = open_set.reindex(columns=["CML", "CLL"], fill_value=0)
    open_set["test images"] = test["text_class"].value_counts()
    return {"open_set": open_set.loc[[c for c in classes8 if c in open_set.index]],
            "called_chronic": float(np.isin(pred10, ["CML", "CLL"]).mean())}


def summary_table(o: dict, heldout_class: str) -> pd.DataFrame:
    """The chapter's headline numbers against the paper and the baselines."""
    zs, sup, r5, readout = o["zs"], o["sup_test_m"], o["r5"], o["readout"]
    return pd.DataFrame([
        {"result": "zero-shot PBC, 5 leukocytes (held-out prompts)", "value": zs["heldout"]["accuracy"],
         "reference": "supervised equal-budget fine-tuning: " + f"{sup['accuracy']:.1%}"},
        {"result": "zero-shot normal / benign / AML / ALL", "value": o["group4"]["accuracy"],
         "reference": f"paper: about {o['claim70']['value']:.0%} (its own data and task)"},
        {"result": "within-source: Matek myeloblast vs neutrophil (balanced)", "value": o["wm"]["balanced accuracy"],
         "reference": "no hospital shortcut possible"},
        {"result": "within-source: Aria benign vs ALL (balanced)", "value": o["wa"]["balanced accuracy"],
         "reference": "same hospital, different patients"},
        {"result": "image → text R@5 (attribute sentences)", "value": r5["recall"],
         "reference": f"random: {r5['random']:.1%}"},
        {"result": f"unseen class ({heldout_class}) recall from its description", "value":
         o["held"]["heldout"]["per_class"][heldout_class]["recall"],
         "reference": f"chance among {len(WBC)}: {1 / len(WBC):.0%}"},
        {"result": "attributes read out above their majority floor", "value": readout["above floor"].mean(),
         "reference": f"fraction of the {len(readout)} attributes"},
    ]).set_index("result")


# --------------------------------------------------------------------------- results
def _test_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("predictions",)}


def write_vl_results(path: Path, o: dict, P: Profile, S: dict, seed: int, heldout_class: str, data_root,
                     wall: float, timings: dict) -> Path:
    """``vision_language.json``: every metric of the chapter, its configuration and history."""
    data, joint = o["data"], o["joint"]
    return write_results(
        path, overwrite=True, kind="vision_language", chapter=CHAPTER, paper="vlm_leukemia_2026",
        dataset="taxonomy:leukemia (pbc, matek, aria) + wbcatt",
        model="efficientnet_lite0 (ImageNet) + all-MiniLM-L6-v2", pretrained=True, profile=P.name,
        profile_sizes=P.to_dict(), chapter_sizes=S, seeds=[seed],
        config={"model": o["model"].config.to_dict(), "fit": o["config"].__dict__,
                "balancing": "class-balanced resampling by text class (stands in for the paper's GAN balancing)",
                "loss": "multi-positive symmetric InfoNCE (soft targets) on class and attribute sentences + "
                        "single-attribute clause loss",
                "norm_source": data.norm_source, "bank": joint.bank},
        data_root=str(resolve_root(data_root)), split_sha256=data.table.attrs.get("split_sha256"),
        data_sha256=content_hash(data.table),
        counts=data.table.groupby(["split", "source"]).size().unstack(fill_value=0).to_dict(orient="index"),
        metrics={
            "zero_shot_pbc": {w: _test_metrics(m) for w, m in o["zs"].items()},
            "zero_shot_groups": _test_metrics(o["group4"]),
            "within_source": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                              for r in o["within"].reset_index().to_dict(orient="records")],
            "source_probe": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                             for k, v in o["src_probe"].items()},
            "retrieval": o["retrieval"].to_dict(orient="records"),
            "attribute_readout": o["readout"].to_dict(orient="records"),
            "heldout_class": {"class": heldout_class, "train_images": len(o["held_table"]),
                              "five_class": {w: _test_metrics(m) for w, m in o["held"].items()},
                              "seen_four_class_accuracy": o["held_seen"]["accuracy"],
                              "unseen_class_summary": o["held_table_summary"].reset_index().to_dict(orient="records"),
                              "history": o["held_fit"].history},
            "linear_probe": o["probes"].reset_index().to_dict(orient="records"),
            "supervised_equal_budget": {k: v for k, v in o["sup_test_m"].items() if k not in ("probs", "targets")},
            "chronic_prompts_fraction_of_test_called_cml_or_cll": o["called_chronic"],
            "paper": {"accuracy": "about 0.70 (reported range)", "doi": "10.1007/s44163-026-01239-7"},
        },
        history=joint.history, wall_time_s=wall, timings_s=timings, checkpoint=str(o["run_dir"] / WEIGHTS))


def write_run_results(o: dict, P: Profile, seed: int, heldout_class: str, wall: float) -> list[Path]:
    """``results.json`` in each of the two vision-language run folders (history, hashes,
    hardware, times): what a reference checkpoint's model card is made from."""
    data = o["data"]
    common = dict(overwrite=True, kind="vision_language_training", chapter=CHAPTER, profile=P.name, seeds=[seed],
                  model="efficientnet_lite0 (ImageNet) + all-MiniLM-L6-v2", dataset="taxonomy:leukemia",
                  datasets=sorted(data.table["dataset"].unique().tolist()),
                  split_sha256=data.table.attrs.get("split_sha256"), data_sha256=content_hash(data.table))
    written = []
    for folder, fit_result, extra in ((o["run_dir"], o["joint"], {}),
                                      (o["out"] / f"vl_without_{heldout_class}_s{seed}", o["held_fit"],
                                       {"heldout_class": heldout_class})):
        history = fit_result.history
        path = Path(folder) / "results.json"
        written.append(write_results(
            path, wall_time_s=session_wall_time(path, history, wall), config={"model": o["model"].config.to_dict(), "fit": o["config"].__dict__,
                                                   "image_size": P.image_size, **extra},
            metrics={"epochs_run": len(history), "last_epoch": history[-1] if history else {}},
            history=history, train_time_s=float(sum(h.get("train_time_s", 0.0) for h in history)), **common))
    return written


# --------------------------------------------------------------------------- the protocol
def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False, *,
        seed: int = 0, heldout_class: str = "monocyte", image_size: int | None = None,
        results_path: str | None = None) -> ExperimentRun:
    """The chapter's protocol (see the module's docstring). ``seeds``: at most one seed (the
    chapter trains one model per role), None for ``seed``; ``image_size``: None for the
    profile's; ``results_path``: None for ``<results_dir>/<profile>/vision_language.json``."""
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != 1:
            raise LeukemiaError(f"chapter {CHAPTER} trains one seed, got seeds={seeds}; pass one seed")
        seed = int(seeds[0])
    if heldout_class not in WBC:
        raise LeukemiaError(f"heldout_class must be one of PBC's leukocytes {WBC}, got '{heldout_class}'")
    overrides = {"image_size": image_size} if image_size else {}
    P = profile.replace(**overrides) if isinstance(profile, Profile) else get_profile(profile, **overrides)
    S = chapter_sizes(CHAPTER, P)
    out, results_dir = resolve_paths(P.name, out, results_dir)
    results_path = Path(results_path) if results_path else results_dir / P.name / "vision_language.json"
    timer = Timer()
    torch.manual_seed(seed)
    o: dict = {"P": P, "S": S, "size": P.image_size, "seed": seed, "heldout_class": heldout_class, "out": out}

    o |= assemble_data(data_root, P, S, seed)
    train, test, data = o["train"], o["test"], o["data"]
    o |= sentence_tables(train)
    timer.tick("imports and data tables")

    o |= train_joint(data, train, P, S, seed, out, resume, timer)

    model = o["model"]
    feats = embed_splits(model, data, train, o["train_ds"], P, S, seed)
    o |= feats
    timer.tick("embedding test and probe images (two towers)")
    test_emb = o["test_emb"]
    is_pbc = np.array(test["dataset"] == "pbc")
    # PBC cells with WBCAtt attributes (all of PBC's white cells but the copies WBCAtt drops across its splits)
    has_attr = is_pbc & np.array(test["attr_key"] != "")
    pbc_labels = test.loc[is_pbc, "text_class"].tolist()
    o |= {"is_pbc": is_pbc, "has_attr": has_attr, "pbc_labels": pbc_labels, "pbc_test": test[has_attr]}

    o["zs"] = zero_shot_pbc(model, test_emb, pbc_labels, is_pbc)
    o["CLASSES8"] = classes8 = [c for c in o["texts"] if o["groups_of"][c] in GROUPS]
    o["group4"] = zero_shot_metrics(test_emb, test["group"].tolist(),
                                    prompt_embeddings(model, class_prompts(classes8)), classes8, o["groups_of"], GROUPS)
    o["claim70"] = next(c for c in load_claims()["papers"]["vlm_leukemia_2026"]["claims"] if c["id"] == "accuracy_70")
    o |= shortcut_checks(model, test, test_emb, o["probe"], feats, classes8, o["groups_of"])
    o["src_in"] = o["src_probe"]["ImageNet tower (no training)"]["accuracy"]
    o["shortcut_ok"] = o["src_in"] >= 0.9 and o["grp_probe_in"]["accuracy"] >= 0.9
    o |= retrieval_on_attributes(model, o["pbc_test"], test_emb[has_attr])
    o |= readout_attributes(model, test_emb[has_attr], o["pbc_test"], train)

    o |= train_heldout(model, train, o["train_ds"], o["config"], o["meta"], heldout_class, P, S, seed, out, resume)
    timer.tick("held-out-class training")
    o |= score_heldout(o["held_model"], o["test_ds"], is_pbc, pbc_labels, heldout_class)
    o["heldout_profile"] = heldout_profile_table(o["table"], o["texts"], heldout_class)

    o |= probes_and_supervised(o["train_ds"], o["test_ds"], feats, o["probe"], is_pbc, pbc_labels, o["config"],
                               P, S, seed, out, resume)
    timer.tick("supervised equal-budget training and test")
    o["probes"] = probe_table(o["probe_in"], o["probe_vl"], o["zs"], o["sup_test_m"])
    o |= chronic_prompts(model, test, test_emb, classes8)
    o["summary"] = summary_table(o, heldout_class)
    timer.tick("the rest (evaluation, probes, figures)")
    wall = timer.wall
    print(f"wall time: {wall:.0f} s; by phase (s): {timer.timings}")
    o["results_file"] = write_vl_results(results_path, o, P, S, seed, heldout_class, data_root, wall, timer.timings)
    write_run_results(o, P, seed, heldout_class, wall)
    print(f"results: {o['results_file']}")
    o |= {"timings": timer.timings, "wall": wall}
    return ExperimentRun(CHAPTER, P.name, results=[o["results_file"]], objects=o)


# --------------------------------------------------------------------------- figures
def cam_examples(res: ExperimentRun) -> tuple[list[int], torch.Tensor, np.ndarray]:
    """Up to ``cam_images`` test images (one per source of :data:`CAM_SOURCES`) and their
    similarity Grad-CAM maps against their own class's held-out prompt."""
    from leukemia_core.vl.cam import similarity_cam

    test, test_ds, model, classes8 = res["test"], res["test_ds"], res["model"], res["CLASSES8"]
    picks = []
    for src in CAM_SOURCES[:res["S"]["cam_images"]]:
        rows_ = np.flatnonzero(np.array(test["source"] == src))
        if len(rows_):
            picks.append(int(rows_[0]))
    x = torch.stack([test_ds[i][0] for i in picks])
    class_emb = prompt_embeddings(model, class_prompts(classes8))
    text_emb = torch.stack([class_emb[classes8.index(test.loc[i, "text_class"])] for i in picks])
    return picks, x, similarity_cam(model, x, text_emb)


# --------------------------------------------------------------------------- the reference tier
REFERENCE_USE = ("Teaching and reproducibility: the vision-language chapter's model at convergence, evaluated "
                 "live by the book. A research artefact, not a medical device: never for diagnosis.")
REFERENCE_LIMITS = ("Image tower and projections only: the text tower is the frozen all-MiniLM-L6-v2 of the "
                    "offline wheel, which loading rebuilds. Trained on the book's public taxonomy (PBC, Matek-19, "
                    "Aria: one hospital per disease group) with WBCAtt's attribute sentences for PBC: zero-shot "
                    "numbers on other hospitals, stains or phrasings will be lower. No CML or CLL images exist "
                    "publicly: their prompts were never matched to a cell.")
REFERENCE_HELDOUT = "monocyte"  # the chapter's default held-out class
#: (data root, image size) -> the decoded test data publish_reference left for the
#: evaluate_reference that usually follows it in the same process; popped on use.
_HANDOVER: dict = {}


def reference_names(heldout_class: str = REFERENCE_HELDOUT) -> dict[str, str]:
    """Reference checkpoint name -> its run folder stem under ``out``."""
    return {"vl_lite0_minilm": "vl_lite0_minilm", f"vl_without_{heldout_class}": f"vl_without_{heldout_class}"}


def _reference_metrics(model, held_model, o: dict, heldout_class: str) -> dict:
    """The chapter's headline measures of a (joint, held-out-class) model pair on the test split."""
    test, test_emb = o["test"], o["test_emb"]
    zs = zero_shot_pbc(model, test_emb, o["pbc_labels"], o["is_pbc"])
    classes8 = [c for c in class_texts() if text_class_groups()[c] in GROUPS]
    group4 = zero_shot_metrics(test_emb, test["group"].tolist(), prompt_embeddings(model, class_prompts(classes8)),
                               classes8, text_class_groups(), GROUPS)
    retrieval = retrieval_on_attributes(model, o["pbc_test"], test_emb[o["has_attr"]])
    readout = readout_attributes(model, test_emb[o["has_attr"]], o["pbc_test"], o["train"])["readout"]
    out = {"zero_shot_pbc": {w: _test_metrics(m) for w, m in zs.items()}, "zero_shot_groups": _test_metrics(group4),
           "retrieval": retrieval["retrieval"].to_dict(orient="records"),
           "attribute_readout": readout.to_dict(orient="records")}
    if held_model is not None:
        held = score_heldout(held_model, o["test_ds"], o["is_pbc"], o["pbc_labels"], heldout_class)
        out["heldout_class"] = {"class": heldout_class,
                                "five_class": {w: _test_metrics(m) for w, m in held["held"].items()},
                                "seen_four_class_accuracy": held["held_seen"]["accuracy"],
                                "unseen_class_summary": held["held_table_summary"].reset_index()
                                .to_dict(orient="records")}
    return out


def _reference_test_data(meta: dict, data_root, per_source: int | None = None) -> dict:
    """The test split as the reference run saw it (all of it; ``per_source``: the first so
    many images of every source), decoded at the checkpoint's size with the checkpoint's
    normalisation."""
    P = get_profile("reference", image_size=meta["image_size"], max_eval_per_class=per_source)
    S = chapter_sizes(CHAPTER, get_profile("reference"))
    o = assemble_data(data_root, P, S, 0)
    data, test = o["data"], o["test"]
    if [round(v, 6) for v in data.mean] != [round(v, 6) for v in meta["mean"]]:
        raise LeukemiaError(f"the reference checkpoint was trained with mean {meta['mean']}, this code normalises "
                            f"with {data.mean}: republish the checkpoint from a run of this commit")
    o["image_size"] = meta["image_size"]
    o["test_ds"] = IndexedDataset(data.dataset("test", meta["image_size"], preload=True))
    o["is_pbc"] = np.array(test["dataset"] == "pbc")
    o["has_attr"] = o["is_pbc"] & np.array(test["attr_key"] != "")
    o["pbc_labels"] = test.loc[o["is_pbc"], "text_class"].tolist()
    o["pbc_test"] = test[o["has_attr"]]
    return o


def evaluate_reference(data_root=None, results_dir=None, root=None, heldout_class: str = REFERENCE_HELDOUT,
                       per_class: int | None = None) -> dict:
    """Verify the chapter's reference checkpoints (the joint model and the one trained
    without ``heldout_class``) and evaluate them live on the whole test split; writes
    ``<results_dir>/reference/vision_language.json`` (the chapter's metric layout, so the
    claims file's headline rows apply). ``{"checks", "metrics" (None when the joint model
    is not verified), "logs", "cards"}``: a missing or corrupt checkpoint is listed with its
    message, never skipped. ``per_class``: the first so many test images of every source only
    (:func:`~leukemia_core.reproducibility.reference.test_per_class`), written under
    :func:`~leukemia_core.reproducibility.reference.evaluations_dir`."""
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    _, results_dir = resolve_paths("reference", None, results_dir)
    joint_name, held_name = reference_names(heldout_class)
    checks = [reference.check(CHAPTER, n, root) for n in (joint_name, held_name)]
    out = {"checks": checks, "metrics": None, "logs": {}, "cards": {}}
    if checks[0]["status"] != "verified":
        return out
    start = time.perf_counter()
    model, meta, _, card = reference.load_reference(CHAPTER, joint_name, root)
    held_model = None
    if checks[1]["status"] == "verified":
        held_model, _, _, out["cards"][held_name] = reference.load_reference(CHAPTER, held_name, root)
        out["logs"][held_name] = reference.training_log(CHAPTER, held_name, root).to_dict("records")
    out["cards"][joint_name] = card
    out["logs"][joint_name] = reference.training_log(CHAPTER, joint_name, root).to_dict("records")
    o = _HANDOVER.pop((str(data_root), meta["image_size"]), None)  # whole split, from a publish in this process
    if o is None or per_class is not None:
        o = _reference_test_data(meta, data_root, per_class)
    o["test_emb"], _ = embed_images(model, o["test_ds"], features=False)
    metrics = _reference_metrics(model, held_model, o, heldout_class)
    manifest = reference.read_manifest(root)
    test = o["test"]
    write_results(
        reference.evaluations_dir(results_dir, per_class) / "vision_language.json", overwrite=True,
        kind="reference_evaluation",
        chapter=CHAPTER, paper="vlm_leukemia_2026", reference=[c["name"] for c in checks if c["status"] == "verified"],
        dataset="taxonomy:leukemia (pbc, matek, aria) + wbcatt", model="efficientnet_lite0 (ImageNet) + all-MiniLM-L6-v2",
        profile="reference", seeds=[0],
        config={"checkpoints": {n: {"sha256": manifest[f"{CHAPTER}/{n}/model.safetensors"], "dtype": c["dtype"]}
                                for n, c in out["cards"].items()}, "image_size": meta["image_size"]},
        metrics=metrics, split_sha256=o["data"].table.attrs.get("split_sha256"), data_sha256=content_hash(test),
        training={n: {k: c.get(k) for k in ("wall_time_s", "train_time_s", "epochs_run", "git_sha", "hardware")}
                  for n, c in out["cards"].items()},
        wall_time_s=time.perf_counter() - start)
    out["metrics"] = metrics
    return out


def headline_measures(m: dict | None, heldout_class: str = REFERENCE_HELDOUT) -> dict:
    """The chapter's headline measures from a results file's ``metrics`` (the layout of the
    chapter's own results, which the reference evaluation shares); None: no measures."""
    if m is None:
        return {}
    held = m.get("heldout_class") or {}
    cls = held.get("class", heldout_class)
    summary = held.get("unseen_class_summary") or [{}]
    r5 = next((r["recall"] for r in m.get("retrieval") or () if r["direction"] == "image → text" and r["k"] == 5),
              None)
    readout = m.get("attribute_readout")
    return {"zero-shot PBC, 5 leukocytes (held-out prompts), accuracy": m["zero_shot_pbc"]["heldout"]["accuracy"],
            "zero-shot PBC, 5 leukocytes (held-out prompts), macro-F1": m["zero_shot_pbc"]["heldout"]["macro_f1"],
            "zero-shot normal / benign / AML / ALL, accuracy": m["zero_shot_groups"]["accuracy"],
            "image → text R@5 (attribute sentences)": r5,
            f"unseen class recall from its description ({cls})": summary[0].get(f"{cls} recall (unseen class)"),
            "attributes read out above their majority floor (fraction)":
                float(np.mean([r["accuracy"] > r["majority_floor"] for r in readout])) if readout else None}


def reference_table(res_metrics: dict | None, ref: dict, heldout_class: str = REFERENCE_HELDOUT) -> pd.DataFrame:
    """The headline measures (:func:`headline_measures`) of this build's own run
    (``res_metrics``: the ci results' ``metrics``, or None) beside the reference model's."""
    ours, theirs = headline_measures(res_metrics, heldout_class), headline_measures(ref.get("metrics"), heldout_class)
    keys = list(dict.fromkeys(list(ours) + list(theirs)))
    return pd.DataFrame({"this build": [ours.get(k) for k in keys], "reference": [theirs.get(k) for k in keys]},
                        index=pd.Index(keys, name="measure"))


def publish_reference(out, data_root=None, root=None, seed: int = 0, log=print, models=None,
                      note: str | None = None, heldout_class: str = REFERENCE_HELDOUT) -> list[Path]:
    """Publish the finished ``reference`` runs under ``out`` (``leukemia-core run
    05_vision_language --profile reference --out OUT``) into ``reference/05_vision_language/``:
    in the smallest storage (int8, fp16, fp32) whose zero-shot PBC accuracy and macro-F1
    (held-out prompts) stay within 0.1 point of the fp32 weights'
    (:func:`~leukemia_core.reproducibility.reference.publish_smallest`). A run without ``results.json``
    (not finished) is reported through ``log`` and left out."""

    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    names = reference_names(heldout_class)
    unknown = set(models or ()) - set(names)
    if unknown:
        raise LeukemiaError(f"no reference model {sorted(unknown)} in {CHAPTER}; choose from {sorted(names)}")
    published, o = [], None
    for name, stem in names.items():
        if models and name not in models:
            continue
        run_dir = Path(out) / f"{stem}_s{seed}"
        results = reference.finished_run(run_dir, name, log)
        if results is None:
            continue
        common = dict(description=f"Vision-language model (EfficientNet-Lite0 image tower, ImageNet, fine-tuned; "
                                  f"frozen all-MiniLM-L6-v2 text tower), {results['config']['image_size']} px, "
                                  f"seed {seed}" + (f", trained without {heldout_class}" if name != "vl_lite0_minilm"
                                                    else "") + ".",
                      command=reference.command_line(
                          f"leukemia-core run {CHAPTER} --profile reference --out {out} [--resume]", note),
                      intended_use=REFERENCE_USE, limits=REFERENCE_LIMITS, results=results, root=root)
        def score(name=name) -> dict:
            nonlocal o
            model, meta, _, _ = reference.load_reference(CHAPTER, name, root)
            o = o or _reference_test_data(meta, data_root)
            emb, _ = embed_images(model, Subset(o["test_ds"], np.flatnonzero(o["is_pbc"]).tolist()), features=False)
            m = zero_shot_metrics(emb, o["pbc_labels"], prompt_embeddings(model, class_prompts(WBC)), WBC)
            return {"zero_shot_pbc_accuracy": m["accuracy"], "zero_shot_pbc_macro_f1": m["macro_f1"]}

        published.append(reference.publish_smallest(run_dir, CHAPTER, name, score, **common))
    if o is not None:  # for an evaluate_reference that follows in this process
        _HANDOVER[str(data_root), o["image_size"]] = o
    return published
