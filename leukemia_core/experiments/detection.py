"""Chapter 07's protocol: WBC detection from sparse annotations, with an attribute head.

The data (BCCD and TXL-PBC boxes with the leaks between them closed, WBCAtt's attribute
cells), the three training regimes (``full``, ``naive`` and ``masked`` sparse labels, one
run per regime and patch share), their evaluation (mAP@0.5 and per-class AP on BCCD's
test list, per source on TXL-PBC's), the attribute head on RoIAlign features of the
frozen full-label detector, the saved detector and the results JSONs
``<results_dir>/<profile>/detection_*.json``. :func:`run` does it all; the notebook
draws its figures and tables from what it returns.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.data import load_dataset
from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.data.dataroot import data_root as resolve_root
from leukemia_core.detection.data import (CLASSES, BoxDataset, attribute_table, attribute_values, bccd_boxes,
                                          encode_attributes, link_sources, link_wbcatt, load_image, txl_boxes)
from leukemia_core.detection.model import AttributeHead, WBCDetector
from leukemia_core.detection.sparse import OUTSIDE_WEIGHT, PSEUDO_CONF, PSEUDO_IOU, REGIMES, sparsify
from leukemia_core.detection.train import (DetTrainConfig, attribute_metrics, attribute_predictions,
                                           evaluate_detector, roi_features, save_detector, train_attribute_head,
                                           train_detector)
from leukemia_core.errors import LeukemiaError
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.pipeline import content_hash
from leukemia_core.reproducibility.results import write_results

CHAPTER = "07_detection"
PAPER = "rehman2025lld"
MODEL = "fcos_efficientnet_lite0_fpn"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PLATELET = CLASSES.index("Platelets")
#: LLD attribute of the paper -> WBCAtt attribute (None: no counterpart) and how they correspond.
LLD_MAP = [("cell size", "cell_size", "same notion (big / small)"),
           ("nuclear chromatin", "chromatin_density", "densely / loosely"),
           ("nuclear shape", "nucleus_shape", "6 shapes"),
           ("nucleoli", None, "no WBCAtt counterpart"),
           ("cytoplasm amount", "nuclear_cytoplasmic_ratio", "inverse proxy: high N:C = little cytoplasm"),
           ("cytoplasmic basophilia", "cytoplasm_colour", "proxy: blue / purple-blue vs light blue"),
           ("vacuoles", "cytoplasm_vacuole", "yes / no")]
#: The chapter's targets, fixed before the runs (protocol, not results).
TARGETS = {"wbc_ap50": 0.90, "masked_share_of_full": 0.90, "attribute_gain": 0.10}


class _Laps:
    """Seconds per section of the protocol, for the chapter's timing table."""

    def __init__(self):
        self.times, self._last = {}, time.perf_counter()

    def __call__(self, section: str) -> None:
        now = time.perf_counter()
        self.times[section] = self.times.get(section, 0.0) + now - self._last
        self._last = now


def sizes(profile, patch_fractions=None) -> dict:
    """The chapter's sizes under ``profile``; ``patch_fractions`` replaces its patch shares."""
    s = chapter_sizes(CHAPTER, profile)
    if patch_fractions is not None:  # an exercise's change: other patch shares than the profile's
        s["fractions"] = tuple(float(f) for f in patch_fractions)
    return s


def class_counts(table: pd.DataFrame) -> pd.Series:
    """Boxes per class in a box table."""
    return pd.Series({c: sum(lab.count(i) for lab in table["labels"]) for i, c in enumerate(CLASSES)})


# ----------------------------------------------------------------------------- data
def load_boxes(root) -> tuple[pd.DataFrame, pd.DataFrame]:
    """BCCD and TXL-PBC box tables, TXL linked to its BCCD sources and to WBCAtt's held-out cells."""
    bccd = bccd_boxes(root)
    txl = link_wbcatt(link_sources(bccd, txl_boxes(root)), load_dataset("wbcatt", root, hashes=False))
    return bccd, txl


def overview_table(bccd: pd.DataFrame, txl: pd.DataFrame) -> pd.DataFrame:
    """Boxes per class and images per dataset (TXL-PBC: per source) and split."""
    overview = pd.concat({("BCCD", s): class_counts(g).rename(None) for s, g in bccd.groupby("split")} |
                         {(f"TXL-PBC {d}", s): class_counts(g) for (d, s), g in txl.groupby(["domain", "split"])},
                         axis=1).T
    overview["images"] = [len(bccd[bccd.split == s]) if n == "BCCD" else
                          len(txl[(txl.domain == n.split()[1]) & (txl.split == s)]) for n, s in overview.index]
    return overview


def split_data(bccd: pd.DataFrame, txl: pd.DataFrame, sz: dict, seed: int) -> dict:
    """Training and test tables with the leaks closed: no TXL image copied from BCCD or from a
    WBCAtt validation/test cell trains; no TXL test image copied from a BCCD training image is
    scored. Returns the tables and ``contaminated`` (the TXL test images removed)."""
    bccd_train = bccd[bccd.split == "train"]
    if sz["bccd_train_cap"]:
        bccd_train = bccd_train.sample(sz["bccd_train_cap"], random_state=seed)
    txl_pool = txl[(txl.split == "train") & txl.bccd_split.isna() & ~txl.wbcatt_heldout]
    cap = sz["txl_train_per_domain"]
    txl_train = pd.concat([g if cap is None else g.sample(min(cap, len(g)), random_state=seed)
                           for _, g in txl_pool.groupby("domain")])
    bccd_test = bccd[bccd.split == "test"]
    if sz["test_cap"]:
        bccd_test = bccd_test.head(sz["test_cap"])
    txl_test_all = txl[txl.split == "test"]
    contaminated = txl_test_all.bccd_split == "train"
    txl_test = txl_test_all[~contaminated]
    if sz["txl_test_per_domain"]:
        txl_test = txl_test.groupby("domain").head(sz["txl_test_per_domain"])
    return dict(bccd_train=bccd_train, txl_train=txl_train, bccd_test=bccd_test, txl_test=txl_test,
                train_table=pd.concat([bccd_train, txl_train], ignore_index=True),
                contaminated=int(contaminated.sum()))


def split_sha256(bccd: pd.DataFrame, txl: pd.DataFrame) -> str:
    """Hash of every image's relative path and split (BCCD and TXL-PBC)."""
    return hashlib.sha256("\n".join(sorted(f"{r}\t{s}" for r, s in zip(
        pd.concat([bccd.relpath, txl.relpath]), pd.concat([bccd.split, txl.split])))).encode()).hexdigest()


def kept_table(train_table: pd.DataFrame, sparse_tables: dict) -> pd.DataFrame:
    """Share of the boxes (all, and per class) each patch share keeps."""
    return pd.DataFrame({f"{f:.0%} patch": {"boxes kept": sum(map(len, t.boxes)) / sum(t.n_boxes_full),
                                           **{f"{c} kept": class_counts(t)[c] / class_counts(train_table)[c]
                                              for c in CLASSES}} for f, t in sparse_tables.items()}).T


def platelet_stats(train_table: pd.DataFrame, sparse: pd.DataFrame, short_side: int) -> dict:
    """Platelets of the BCCD training images, all and kept by ``sparse``, and their median box side."""
    is_bccd = (train_table["dataset"] == "bccd").to_numpy()  # sparsify keeps the rows and their order
    return dict(full=sum(lab.count(PLATELET) for lab in train_table.loc[is_bccd, "labels"]),
                kept=sum(lab.count(PLATELET) for lab in sparse.loc[is_bccd, "labels"]),
                side=np.median([((b[2] - b[0]) + (b[3] - b[1])) / 2 * short_side / min(r.width, r.height)
                                for r in train_table.itertuples() for b, lab in zip(r.boxes, r.labels)
                                if lab == PLATELET]))


# ----------------------------------------------------------------------------- detectors
def det_config(regime: str, sz: dict, seed: int) -> DetTrainConfig:
    """The training configuration of one regime (the same for all but the regime)."""
    return DetTrainConfig(epochs=sz["epochs"], batch_size=sz["batch_size"], lr=sz["lr"], regime=regime,
                          seed=seed, pseudo_start=1, pseudo_conf=PSEUDO_CONF, pseudo_iou=PSEUDO_IOU,
                          outside_weight=OUTSIDE_WEIGHT, repeat_threshold=sz["repeat_threshold"])


def run_name(regime: str, fraction: float) -> str:
    """``full``, or the regime and the patch share in percent (``masked_25``): results and run folders."""
    return regime if regime == "full" else f"{regime}_{round(fraction * 100)}"


def train_regimes(train_table, sparse_tables, eval_sets, txl_groups, sz, seed, out: Path, resume=False,
                  lap=lambda s: None) -> dict:
    """One detector per regime and patch share (full: all boxes), trained from the same ImageNet
    backbone, scored on BCCD's test list (the full-label one also on TXL-PBC's, per source).
    Returns ``(regime, fraction) -> dict(model, history, metrics, seconds)``; each run's
    training state lives in ``out/detection_<run_name>`` (``resume`` continues it)."""
    runs = {}
    for regime in REGIMES:
        for f in ([1.0] if regime == "full" else sz["fractions"]):
            start = time.perf_counter()
            table = train_table if regime == "full" else sparse_tables[f]
            model = WBCDetector(short_side=sz["short_side"]).to(DEVICE)
            history = train_detector(model, BoxDataset(table, sz["short_side"], train=True),
                                     det_config(regime, sz, seed), out_dir=out / f"detection_{run_name(regime, f)}",
                                     resume=resume)
            lap(f"train {regime}")
            metrics = {"BCCD test": evaluate_detector(model, eval_sets["BCCD test"])[0]["all"]}
            if regime == "full":  # the sparse regimes are compared on BCCD's test list only
                metrics["TXL-PBC test"] = evaluate_detector(model, eval_sets["TXL-PBC test"], groups=txl_groups)[0]
            lap(f"evaluate {regime}")
            runs[(regime, f)] = dict(model=model, history=history, metrics=metrics,
                                     seconds=time.perf_counter() - start)
    return runs


def summary_table(runs: dict) -> pd.DataFrame:
    """One row per regime and patch share: BCCD mAP@0.5, mAP@[.5:.95], AP@0.5 per class, seconds."""
    return pd.DataFrame([{"regime": r, "patch": f"{f:.0%}", "BCCD mAP@0.5": m["metrics"]["BCCD test"]["map_50"],
                          "BCCD mAP@[.5:.95]": m["metrics"]["BCCD test"]["map"],
                          **{f"BCCD AP50 {c}": m["metrics"]["BCCD test"][f"AP50_{c}"] for c in CLASSES},
                          "train s": m["seconds"]} for (r, f), m in runs.items()]).set_index(["regime", "patch"])


def per_domain_table(runs: dict) -> pd.DataFrame:
    """The full-label detector on BCCD's test list and on TXL-PBC's test set, per source."""
    full_metrics = runs[("full", 1.0)]["metrics"]
    per_domain = {"BCCD (VOC test list)": full_metrics["BCCD test"]} | {
        f"TXL-PBC {d}": m for d, m in full_metrics["TXL-PBC test"].items() if d != "all"} | {
        "TXL-PBC all": full_metrics["TXL-PBC test"]["all"]}
    return pd.DataFrame(per_domain).T[["n_images", "map_50", "map", *[f"AP50_{c}" for c in CLASSES]]]


def anchors_table(res: ExperimentRun) -> pd.DataFrame:
    """Published detectors on BCCD (``results/claims.yaml``) next to the full-label detector."""
    from leukemia_core.reproducibility.registry import load_claims

    full, sz, profile = res["runs"][("full", 1.0)]["metrics"], res["sizes"], res.profile
    bccd_m, txl_m = full["BCCD test"], full["TXL-PBC test"]["all"]
    anchors = {a["id"]: a for a in load_claims()["papers"][PAPER]["anchors"]}
    return pd.DataFrame([
        *({"model": a["statement"].split(" on BCCD")[0].strip(), "data": f"BCCD; {a['source']}",
           "mAP@0.5": f"{a['value']:.3f}", "WBC AP@0.5": "–"} for a in anchors.values()),
        {"model": f"ours: FCOS + EfficientNet-Lite0 FPN, full labels ({profile})",
         "data": f"BCCD test list, shorter side {sz['short_side']}px, {sz['epochs']} epochs",
         "mAP@0.5": f"{bccd_m['map_50']:.3f}", "WBC AP@0.5": f"{bccd_m['AP50_WBC']:.3f}"},
        {"model": f"ours, same model ({profile})",
         "data": f"TXL-PBC test ({len(res['data']['txl_test'])} images, leak-free)",
         "mAP@0.5": f"{txl_m['map_50']:.3f}", "WBC AP@0.5": f"{txl_m['AP50_WBC']:.3f}"},
    ]).set_index("model")


# ----------------------------------------------------------------------------- attributes
def attribute_splits(attr_tab: pd.DataFrame, sz: dict, seed: int) -> dict:
    """WBCAtt's own splits: training cells (PBC, capped by a random sample that keeps the value
    frequencies, plus the TXL-PBC training fields copied from them), validation (selects the
    head's epoch) and test cells (PBC)."""
    attr_train = attr_tab[(attr_tab.wbcatt_split == "train") &
                          ((attr_tab.source == "pbc") | (attr_tab.txl_split == "train"))]
    attr_pbc = attr_train[attr_train.source == "pbc"]
    if sz["attr_train_cap"]:
        attr_pbc = attr_pbc.sample(min(sz["attr_train_cap"], len(attr_pbc)), random_state=seed)
    attr_train = pd.concat([attr_pbc, attr_train[attr_train.source == "txl_pbc"]])
    attr_test = attr_tab[(attr_tab.wbcatt_split == "test") & (attr_tab.source == "pbc")]
    attr_val = attr_tab[(attr_tab.wbcatt_split == "val") & (attr_tab.source == "pbc")]
    if sz["attr_test_cap"]:
        attr_test = attr_test.sample(min(sz["attr_test_cap"], len(attr_test)), random_state=seed)
        attr_val = attr_val.sample(min(sz["attr_test_cap"], len(attr_val)), random_state=seed)
    return {"train": attr_train, "val": attr_val, "test": attr_test}


def cell_inputs(table: pd.DataFrame, short_side: int, cell_side: int):
    """Images (PBC crops at ``cell_side``, TXL-PBC fields at ``short_side``) and their cell's box."""
    images, boxes = [], []
    for r in table.itertuples():
        img, s = load_image(r.path, cell_side if r.source == "pbc" else short_side)
        images.append(img.float() / 255)
        boxes.append(torch.tensor([r.box], dtype=torch.float32) * s)
    return images, boxes


def train_attributes(detector: WBCDetector, splits: dict, values: dict, sz: dict, seed: int, cell_side: int,
                     out_dir=None, resume=False) -> dict:
    """An :class:`AttributeHead` on the frozen detector's RoIAlign features, trained on the
    training cells, its epoch selected on the validation cells; per-attribute metrics on the
    test cells against the majority floor (``table``, with a ``mean`` row)."""
    attrs = list(values)
    torch.manual_seed(seed)  # the head's initialisation, independent of what ran before
    detector.attr_head = AttributeHead(detector.config["fpn_channels"], {a: len(v) for a, v in values.items()},
                                       hidden=detector.config["attr_hidden"]).to(DEVICE)
    detector.config["attributes"] = {a: len(v) for a, v in values.items()}
    feats = {name: roi_features(detector, *cell_inputs(splits[name], sz["short_side"], cell_side))
             for name in ("train", "val", "test")}
    y_train, y_val, y_test = (encode_attributes(splits[n], values) for n in ("train", "val", "test"))
    history = train_attribute_head(detector.attr_head, feats["train"], y_train, epochs=sz["attr_epochs"],
                                   lr=3e-3, seed=seed, val=(feats["val"], y_val), out_dir=out_dir, resume=resume)
    pred = attribute_predictions(detector.attr_head, feats["test"]).numpy()
    metrics = attribute_metrics(pred, y_test.numpy(), y_train.numpy(), attrs)
    table = pd.DataFrame(metrics).T
    table["accuracy gain"] = table["accuracy"] - table["majority_accuracy"]
    table["LLD name"] = [next((m[0] for m in LLD_MAP if m[1] == a), "–") for a in table.index]
    table.loc["mean"] = table.drop(columns="LLD name").mean().tolist() + [""]
    return dict(history=history, epoch=next(r for r in history if r["selected"]), metrics=metrics, table=table)


def end_to_end(detector: WBCDetector, attr_tab: pd.DataFrame, txl: pd.DataFrame, values: dict,
               short_side: int) -> dict:
    """On the TXL-PBC test fields copied from WBCAtt test cells: the detected WBC that best
    overlaps the annotated one (IoU ≥ 0.5) and its attributes; a missed cell is wrong for
    every attribute. Returns ``fields``, ``hits`` (detected per field) and ``accuracy`` per attribute."""
    from torchvision.ops import box_iou

    attrs = list(values)
    e2e = attr_tab[(attr_tab.source == "txl_pbc") & (attr_tab.txl_split == "test") &
                   (attr_tab.wbcatt_split == "test")]
    if not len(e2e):
        return dict(fields=0, hits=[], accuracy={})
    e2e_ds = BoxDataset(txl[txl.relpath.isin(e2e.relpath)].set_index("relpath").loc[e2e.relpath].reset_index(),
                        short_side)
    _, e2e_preds = evaluate_detector(detector, e2e_ds)
    y_e2e = encode_attributes(e2e, values).numpy()
    hits, pred_e2e = [], []
    for (img, t), d, r in zip(e2e_ds, e2e_preds, e2e.itertuples()):
        wbc = d["labels"] == 0
        gt = torch.tensor([r.box]) * (img.shape[-2] / txl.set_index("relpath").loc[r.relpath, "height"])
        iou = box_iou(gt, d["boxes"][wbc])[0] if wbc.any() else torch.zeros(0)
        ok = len(iou) > 0 and iou.max() >= 0.5
        hits.append(bool(ok))
        pred_e2e.append([int(d["attributes"][a][wbc][iou.argmax()].argmax()) if ok else -1 for a in attrs])
    pred_e2e = np.array(pred_e2e)
    return dict(fields=len(e2e), hits=hits,
                accuracy={a: float((pred_e2e[:, j] == y_e2e[:, j]).mean()) for j, a in enumerate(attrs)})


# ----------------------------------------------------------------------------- results
def write_detection_results(dest: Path, runs: dict, attributes: dict, e2e: dict, data: dict, common: dict,
                            sz: dict, seed: int, values: dict, cell_side: int, attr_start: float) -> list[Path]:
    """``detection_<run_name>.json`` per regime and patch share, and ``detection_attributes.json``."""
    full_map = runs[("full", 1.0)]["metrics"]["BCCD test"]["map_50"]
    written = []
    for (regime, f), r in runs.items():
        bm = r["metrics"]["BCCD test"]
        written.append(write_results(
            dest / f"detection_{run_name(regime, f)}.json", overwrite=True,
            kind="detection", method=regime, dataset="bccd+txl_pbc", **common,
            config={"short_side": sz["short_side"], "train": det_config(regime, sz, seed).__dict__,
                    "patch_fraction": f, "train_images": len(data["train_table"]),
                    "pseudo": {"conf": PSEUDO_CONF, "iou": PSEUDO_IOU, "weight": OUTSIDE_WEIGHT}},
            metrics={"bccd_test": bm, "txl_pbc_test": r["metrics"].get("TXL-PBC test"),
                     "relative_map50_to_full": bm["map_50"] / full_map if full_map else None,
                     "history": r["history"]},
            wall_time_s=r["seconds"]))
    table, hits = attributes["table"], e2e["hits"]
    splits = attributes["splits"]
    written.append(write_results(
        dest / "detection_attributes.json", overwrite=True, kind="detection_attributes",
        method="roi_attribute_head", dataset="wbcatt", **common,
        config={"train_cells": len(splits["train"]), "val_cells": len(splits["val"]),
                "test_cells": len(splits["test"]), "epochs": sz["attr_epochs"],
                "selected_epoch": attributes["epoch"]["epoch"], "cell_side": cell_side, "values": values,
                "lld_map": LLD_MAP},
        metrics={"test": {a: attributes["metrics"][a] for a in values},
                 "mean_accuracy": float(table.loc["mean", "accuracy"]),
                 "mean_majority_accuracy": float(table.loc["mean", "majority_accuracy"]),
                 "mean_macro_f1": float(table.loc["mean", "macro_f1"]),
                 "mean_majority_macro_f1": float(table.loc["mean", "majority_macro_f1"]),
                 "end_to_end": {"fields": len(hits), "detected": float(np.mean(hits)) if hits else None,
                                "accuracy": e2e["accuracy"]}},
        wall_time_s=time.perf_counter() - attr_start))
    return written


def headline(res: ExperimentRun) -> dict:
    """The numbers the chapter's text reads: full-label metrics, the masked and naive runs at the
    demo share (a quarter, else the first listed), the attribute head's mean gain."""
    runs, f25, table = res["runs"], res["f_demo"], res["attributes"]["table"]
    full_m = runs[("full", 1.0)]["metrics"]["BCCD test"]
    masked_m, naive_m = runs[("masked", f25)]["metrics"]["BCCD test"], runs[("naive", f25)]["metrics"]["BCCD test"]
    return dict(f25=f25, full=full_m, masked=masked_m, naive=naive_m, full_map=full_m["map_50"],
                masked_map=masked_m["map_50"], naive_map=naive_m["map_50"],
                attr_gain=table.loc["mean", "accuracy"] - table.loc["mean", "majority_accuracy"])


def checks_table(res: ExperimentRun) -> pd.DataFrame:
    """The chapter's targets (:data:`TARGETS`), their values and whether they are met."""
    h = headline(res)
    full_map, masked_map, naive_map, wbc = h["full_map"], h["masked_map"], h["naive_map"], h["full"]["AP50_WBC"]
    return pd.DataFrame([
        (f"BCCD test WBC AP@0.5 ≥ {TARGETS['wbc_ap50']:.2f}", wbc, wbc >= TARGETS["wbc_ap50"]),
        (f"masked ≥ {TARGETS['masked_share_of_full']:.0%} of full mAP@0.5 ({h['f25']:.0%} patch)",
         masked_map / full_map if full_map else float("nan"),
         masked_map >= TARGETS["masked_share_of_full"] * full_map),
        ("masked above naive (mAP@0.5)", masked_map - naive_map, masked_map > naive_map),
        (f"mean attribute accuracy − majority floor ≥ {TARGETS['attribute_gain']:.2f}", h["attr_gain"],
         h["attr_gain"] >= TARGETS["attribute_gain"]),
    ], columns=["target", "value", "met"]).set_index("target")


# ----------------------------------------------------------------------------- the protocol
def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False,
        runs_dir="runs", patch_fractions=None) -> ExperimentRun:
    """Chapter 07 end to end; writes ``<results_dir>/<profile>/detection_*.json`` and the
    full-label detector with its attribute head, ``<runs_dir>/<profile>/detection/detector_full.safetensors``
    (relative: from the repository root). The chapter trains one seed: ``seeds`` None takes the
    profile's first. Training state per run: ``<out>/detection_<run>/`` and
    ``<out>/detection_attribute_head/`` (``resume=True`` continues them)."""
    P = profile if isinstance(profile, Profile) else get_profile(profile)
    seeds = list(seeds) if seeds is not None else list(P.seeds[:1])
    if len(seeds) != 1:
        raise LeukemiaError(f"chapter {CHAPTER} trains one seed, got seeds {seeds}")
    seed = int(seeds[0])
    out, results_dir = resolve_paths(P.name, out, results_dir)
    lap = _Laps()
    torch.manual_seed(seed)
    sz = sizes(P, patch_fractions)
    root = resolve_root(data_root)
    S = sz["short_side"]

    bccd, txl = load_boxes(root)
    lap("read and check boxes")
    data = split_data(bccd, txl, sz, seed)
    eval_sets = {"BCCD test": BoxDataset(data["bccd_test"], S), "TXL-PBC test": BoxDataset(data["txl_test"], S)}
    txl_groups = data["txl_test"]["domain"].tolist()
    lap("decode test images")
    split_sha = split_sha256(bccd, txl)
    sparse_tables = {f: sparsify(data["train_table"], f, seed) for f in sz["fractions"]}
    f_demo = 0.25 if 0.25 in sz["fractions"] else sz["fractions"][0]
    lap("sparsify")

    runs = train_regimes(data["train_table"], sparse_tables, eval_sets, txl_groups, sz, seed, out, resume, lap)

    attr_tab = attribute_table(root, txl)
    values = attribute_values(attr_tab, attr_tab.attrs["attributes"])
    splits = attribute_splits(attr_tab, sz, seed)
    cell_side = int(S * 0.8)  # PBC crops: cell ~ as large as in a TXL-PBC field at side S
    detector = runs[("full", 1.0)]["model"]
    t0 = time.perf_counter()
    attributes = train_attributes(detector, splits, values, sz, seed, cell_side,
                                  out_dir=out / "detection_attribute_head", resume=resume)
    attributes.update(splits=splits, seconds=time.perf_counter() - t0)
    lap("attribute head")
    e2e = end_to_end(detector, attr_tab, txl, values, S)
    lap("end to end")

    checkpoint = Path(runs_dir) / P.name / "detection" / "detector_full.safetensors"
    checkpoint = checkpoint if checkpoint.is_absolute() else REPO_ROOT / checkpoint
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    detector.cpu()
    save_detector(detector, checkpoint, values)
    detector.to(DEVICE)
    lap("save detector")

    data_sha = content_hash(pd.concat([data["train_table"], data["bccd_test"], data["txl_test"]])
                            [["relpath", "split", "sha256"]])
    common = dict(chapter=CHAPTER, paper=PAPER, profile=P.name, seeds=[seed], split_sha256=split_sha,
                  data_sha256=data_sha, model=MODEL, profile_sizes=P.to_dict() | {"chapter": sz})
    written = write_detection_results(results_dir / P.name, runs, attributes, e2e, data, common, sz, seed,
                                      values, cell_side, t0)
    lap("results")
    return ExperimentRun(CHAPTER, P.name, results=written, objects=dict(
        sizes=sz, seed=seed, device=DEVICE, bccd=bccd, txl=txl, data=data, eval_sets=eval_sets,
        txl_groups=txl_groups, sparse_tables=sparse_tables, f_demo=f_demo, runs=runs, attr_tab=attr_tab,
        values=values, attributes=attributes, end_to_end=e2e, detector=detector, checkpoint=checkpoint,
        cell_side=cell_side, section_times=lap.times))


# ----------------------------------------------------------------------------- figures
COLORS = {"WBC": "tab:purple", "RBC": "tab:red", "Platelets": "tab:green"}


def plot_sparse_patches(res: ExperimentRun):
    """Three training images of the demo share: the annotated patch (gold), solid boxes keep
    their label, dotted ones lose it."""
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt
    from PIL import Image

    demo, train_table = res["sparse_tables"][res["f_demo"]], res["data"]["train_table"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, i in zip(axes, [0, len(res["data"]["bccd_train"]), len(demo) - 1]):
        r, full = demo.iloc[i], train_table.iloc[i]
        with Image.open(r.path) as im:
            ax.imshow(im.convert("RGB"))
        kept_boxes = {tuple(b) for b in r.boxes}
        for b, lab in zip(full.boxes, full.labels):
            ax.add_patch(mpatches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1.2,
                                            ec=COLORS[CLASSES[lab]], ls="-" if tuple(b) in kept_boxes else ":"))
        x0, y0, x1, y1 = r.patch
        ax.add_patch(mpatches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, ec="gold"))
        ax.set_title(f"{r.domain}: {len(r.boxes)}/{len(full.boxes)} boxes kept", fontsize=9)
        ax.axis("off")
    fig.suptitle("annotated patch (gold); solid boxes keep their label, dotted ones lose it", fontsize=10)
    plt.tight_layout()
    return fig


def plot_detections(res: ExperimentRun, show=("cell_size", "nucleus_shape", "chromatin_density",
                                               "cytoplasm_colour"), score=0.4):
    """The full-label detector on BCCD and TXL-PBC test fields (one per source), each WBC with
    the attribute values its head predicts (``show``)."""
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    detector, eval_sets, txl_groups, values = res["detector"], res["eval_sets"], res["txl_groups"], res["values"]
    picks = [("BCCD test", 0), ("BCCD test", 1)] + [("TXL-PBC test", txl_groups.index(d)) for d in
                                                      ("pbc", "raabin", "bcd", "bccd") if d in txl_groups]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for ax, (name, i) in zip(axes.ravel(), picks[:6]):
        ds = eval_sets[name]
        img, _ = ds[i]
        with torch.no_grad():
            d = detector([img.to(DEVICE)])[0]
        ax.imshow(img.permute(1, 2, 0).numpy())
        for j in torch.where(d["scores"].cpu() >= score)[0].tolist():
            b, cls = d["boxes"][j].tolist(), CLASSES[int(d["labels"][j])]
            ax.add_patch(mpatches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1.2,
                                            ec=COLORS[cls]))
            if cls == "WBC":
                cap = "\n".join(f"{a.replace('_', ' ')}: {values[a][int(d['attributes'][a][j].argmax())]}"
                                for a in show)
                ax.text(b[0], b[1], cap, fontsize=6, va="bottom", color="white",
                        bbox=dict(facecolor="tab:purple", alpha=0.75, pad=1, lw=0))
        ax.set_title(f"{name} ({ds.table.iloc[i].domain})", fontsize=9)
        ax.axis("off")
    for ax in axes.ravel()[len(picks):]:
        ax.axis("off")
    fig.legend(handles=[mpatches.Patch(color=c, label=k) for k, c in COLORS.items()], loc="lower center", ncol=3)
    plt.tight_layout()
    return fig
