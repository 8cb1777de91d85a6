"""Predict a folder of single-cell images of any size and source with a DG checkpoint,
and evaluate a checkpoint on any labelled folder (one subfolder per class).

The checkpoint's metadata names the preprocessing it was trained with (image size,
scale normalisation, normalisation statistics); :func:`predict_folder` applies exactly
that, so an image from an unseen hospital goes through the same steps as training.
Checkpoints written by ``leukemia-core train`` (no ``dg`` metadata) are accepted too and
use their own evaluation transform.

Images are decoded and preprocessed in batches (a DataLoader over the path list) and
only per-image results are kept, so memory does not grow with the folder's size beyond a
few hundred bytes per image. An unreadable image does not stop the run: its row carries
the message in the ``error`` column and empty prediction columns (``strict=True`` raises
:class:`DatasetError` naming it instead).
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.data.records import find_images, list_images, sha256_file
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.engine.checkpoint import checkpoint_file
from leukemia_core.errors import DatasetError, LeukemiaError


def load_predictor(checkpoint):
    """``(model, meta, preprocess)``: ``preprocess(PIL image) -> (3 x S x S float tensor, ok)``.
    Any image classifier checkpoint (:func:`leukemia_core.checkpoints.load_checkpoint`)."""
    from leukemia_core.checkpoints import load_checkpoint

    net, meta, prep = load_checkpoint(checkpoint)
    if meta["kind"] not in ("classifier", "dg_classifier"):
        raise LeukemiaError(f"{checkpoint} is a {meta['kind']} checkpoint; predict and evaluate need an image "
                            "classifier (leukemia-core train, or the domain-generalization chapter's)")
    return net, meta, prep


# --------------------------------------------------------------------------- streaming
class _Images(torch.utils.data.Dataset):
    """``(index, tensor or None, width, height, ok, error)`` per path; a read failure is
    returned as its message (raised with ``strict``)."""

    def __init__(self, paths, prep, strict: bool):
        self.paths, self.prep, self.strict = list(paths), prep, strict

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = read_image(self.paths[i])
        except DatasetError as exc:
            if self.strict:
                raise
            return i, None, -1, -1, False, str(exc)
        x, ok = self.prep(im)
        return i, x, im.width, im.height, bool(ok), None


def _collate(items):
    """A batch that tolerates failed reads: the readable images stacked, all items' facts."""
    good = [it for it in items if it[1] is not None]
    x = torch.stack([it[1] for it in good]) if good else None
    return x, [(i, w, h, ok, err) for i, _, w, h, ok, err in items]


def _batches(paths, prep, batch_size: int, strict: bool, num_workers: int):
    return torch.utils.data.DataLoader(_Images(paths, prep, strict), batch_size=batch_size,
                                       shuffle=False, num_workers=num_workers, collate_fn=_collate)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    # only on a terminal: a log or a pipe gets the summary lines, not the bar's redraws
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None if progress else True,
                leave=False)


def adapt_bn_stream(net: torch.nn.Module, paths, prep, batch_size: int = 64, strict: bool = False,
                    num_workers: int = 0, progress: bool = False, device=None) -> torch.nn.Module:
    """A copy of ``net`` whose BatchNorm running statistics are the cumulative average over
    the images of ``paths``, read batch by batch (the streaming form of
    :func:`leukemia_core.dg.recompute_bn_float`; unreadable images are skipped)."""
    import copy

    from leukemia_core.dg import _reestimate_bn

    net = copy.deepcopy(net)
    bar = _bar(len(paths), "adapting BatchNorm", progress)

    def xs():
        for x, facts in _batches(paths, prep, batch_size, strict, num_workers):
            bar.update(len(facts))
            if x is not None:
                yield x.to(device) if device is not None else x
    with torch.no_grad():
        _reestimate_bn(net, xs())
    bar.close()
    return net


@torch.no_grad()
def predict_paths(net, classes: list[str], prep, paths, batch_size: int = 64, strict: bool = False,
                  restrict_to: list[str] | None = None, num_workers: int = 0, progress: bool = False,
                  device=None) -> pd.DataFrame:
    """One row per path, in order: path, width, height, pred, confidence, scale_ok, error,
    ``prob_<class>``; the prediction columns are empty where ``error`` is set.
    ``restrict_to`` takes the argmax over those classes only (``prob_*`` stay the model's
    softmax over all its classes; ``confidence`` is the chosen class's probability)."""
    paths = [str(p) for p in paths]
    n, k = len(paths), len(classes)
    probs = np.full((n, k), np.nan, np.float32)
    width = np.full(n, -1, np.int64)
    height = np.full(n, -1, np.int64)
    scale_ok = np.zeros(n, bool)
    errors: dict[int, str] = {}
    allowed = torch.tensor([c in set(restrict_to) for c in classes]) if restrict_to else None
    net = net.eval()
    bar = _bar(n, "predicting", progress)
    for x, facts in _batches(paths, prep, batch_size, strict, num_workers):
        good = [f for f in facts if f[4] is None]
        if x is not None:
            p = net(x.to(device) if device is not None else x).float().softmax(1).cpu().numpy()
            probs[[f[0] for f in good]] = p
        for i, w, h, ok, err in facts:
            if err is None:
                width[i], height[i], scale_ok[i] = w, h, ok
            else:
                errors[i] = err
        bar.update(len(facts))
    bar.close()
    readable = np.array([i not in errors for i in range(n)], bool)
    masked = probs if allowed is None else np.where(allowed.numpy()[None], probs, -np.inf)
    best = np.where(readable, np.nan_to_num(masked, nan=-np.inf).argmax(1), 0)
    table = pd.DataFrame({
        "path": paths,
        "width": pd.array(np.where(readable, width, 0), dtype="Int64"),
        "height": pd.array(np.where(readable, height, 0), dtype="Int64"),
        "pred": pd.array([classes[b] if r else None for b, r in zip(best, readable)], dtype=object),
        "confidence": np.where(readable, probs[np.arange(n), best] if n else np.zeros(0), np.nan),
        "scale_ok": pd.array(scale_ok, dtype="boolean"),
        "error": pd.array([errors.get(i) for i in range(n)], dtype=object),
        **{f"prob_{c}": probs[:, j].astype(np.float64) for j, c in enumerate(classes)}})
    for col in ("width", "height", "scale_ok"):
        table.loc[~readable, col] = pd.NA
    return table


def _device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _predict(predictor, checkpoint, paths, batch_size, adapt_bn, strict, restrict_to, num_workers,
             progress, device, stacklevel=3):
    net, meta, prep = predictor
    dg_meta = meta.get("dg", {})
    if (dg_meta.get("recipe", {}).get("domain_bn") or dg_meta.get("adapt_bn")) and not adapt_bn:
        why = ("was trained with domain-wise BatchNorm" if dg_meta.get("recipe", {}).get("domain_bn") else
               f"is used with test-time BatchNorm adaptation (its row: {dg_meta.get('row')})")
        warnings.warn(f"{checkpoint} {why} and expects the target "
                      "hospital's statistics: pass adapt_bn=True (CLI: --adapt-bn) with a folder of "
                      "many cells from one hospital", UserWarning, stacklevel=stacklevel)
    device = _device(device)
    net = net.to(device)
    if adapt_bn:
        net = adapt_bn_stream(net, paths, prep, batch_size, strict, num_workers, progress, device)
    table = predict_paths(net, meta["classes"], prep, paths, batch_size, strict, restrict_to,
                          num_workers, progress, device)
    return table, meta


def predict_folder(checkpoint, folder, out_csv, batch_size: int = 64, overwrite: bool = False,
                   adapt_bn: bool = False, strict: bool = False, num_workers: int = 0,
                   progress: bool = False, device=None) -> pd.DataFrame:
    """Class probabilities for every image under ``folder`` (recursively), written to
    ``out_csv``: one row per image with path, original width/height, predicted class,
    confidence, ``scale_ok`` (a nucleus was found for scale normalisation), ``error`` and
    ``prob_<class>``. Images are read in batches of ``batch_size`` (memory does not grow
    with the folder). An unreadable image gets its message in ``error`` and empty
    prediction columns; ``strict`` raises :class:`DatasetError` naming it instead.

    ``adapt_bn`` re-estimates the BatchNorm statistics on the folder's own images first,
    in a first streaming pass (test-time BN adaptation: worth it for a folder from one new
    hospital, with dozens of images or more; the predictions then depend on the folder as
    a whole)."""
    out = Path(out_csv)
    if out.exists() and not overwrite:
        raise LeukemiaError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    paths = find_images(folder, recursive=True)
    table, _ = _predict(load_predictor(checkpoint), checkpoint, paths, batch_size, adapt_bn, strict, None,
                        num_workers, progress, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return table


def _summary(n: int, k: int, out) -> str:
    if not k:
        return f"{n} images, none unreadable: wrote {out}"
    return f"{n} images, {k} unreadable: listed in the error column of {out}"


# --------------------------------------------------------------------------- labelled folders
@dataclass
class LabelledFolder:
    """A folder laid out ``DIR/<class>/<image>`` (images below a class folder, recursively)."""
    root: Path
    classes: list[str]  # the class subfolders holding images, sorted
    paths: list[Path]
    labels: list[str]  # the subfolder of each path
    loose: list[Path] = field(default_factory=list)  # images directly in root: no class


def read_labelled_folder(folder) -> LabelledFolder:
    """The class subfolders of ``folder`` and their images; an error naming the folder and
    the layout expected when it is missing or has no class subfolder with images."""
    root = Path(folder)
    layout = f"lay it out as {root}/<class>/<image> (e.g. {root}/neutrophil/cell1.jpg)"
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; evaluate --images needs a labelled folder: {layout}")
    root = root.resolve()  # absolute paths in predictions.csv: the explorer opens them from anywhere
    classes, paths, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub, recursive=True)
        if images:
            classes.append(sub.name)
            paths += images
            labels += [sub.name] * len(images)
    if not classes:
        raise DatasetError(f"{root} has no class subfolders with images: {layout}; for an unlabelled "
                           "folder use `leukemia-core predict --images`")
    return LabelledFolder(root, classes, paths, labels, list_images(root))


def folder_metrics(true: list[str], pred: list[str], shared: list[str], columns: list[str]) -> dict:
    """Macro-F1 over ``shared`` (the classes both the folder and the model have), accuracy,
    per-class recall / precision / F1 / support, and the confusion matrix (true rows in
    ``columns`` order, predicted columns in ``columns`` order)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    if not true:
        return {"macro_f1": None, "accuracy": None, "per_class": {}, "confusion_matrix": None}
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=shared, zero_division=0)
    cm = confusion_matrix(true, pred, labels=columns)
    return {"macro_f1": float(f1_score(true, pred, labels=shared, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(true, pred)),
            "per_class": {c: {"recall": float(r[i]), "precision": float(p[i]), "f1": float(f[i]),
                              "support": int(s[i])} for i, c in enumerate(shared)},
            "confusion_matrix": {"classes": list(columns), "rows": "true", "columns": "predicted",
                                 "matrix": cm.tolist()}}


def evaluate_folder(checkpoint, folder, out_dir, adapt_bn: bool = False, restrict_to_shared: bool = False,
                    strict: bool = False, overwrite: bool = False, batch_size: int = 64,
                    num_workers: int = 0, progress: bool = False, device=None) -> dict:
    """Evaluate ``checkpoint`` on a labelled folder (one subfolder per class, any names that
    :func:`leukemia_core.data.class_names.map_classes` maps to the model's classes).

    Writes ``out_dir/predictions.csv`` (path, relpath, folder_class, label, pred,
    confidence, error, prob_<class>, ...; opens in the prediction explorer) and
    ``out_dir/metrics.json`` (macro-F1 over the classes the folder shares with the model,
    accuracy, per-class recall and precision, confusion matrix, counts, the class mapping,
    unreadable files, the checkpoint and its sha256). Folder classes the model lacks are
    predicted but left out of the metrics. ``restrict_to_shared`` takes the argmax over
    the shared classes only. Returns the metrics dict."""
    from leukemia_core.data.class_names import map_classes

    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LeukemiaError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to "
                            "replace its predictions.csv and metrics.json, or choose another --out")
    data = read_labelled_folder(folder)
    ckpt = checkpoint_file(checkpoint)
    predictor = load_predictor(ckpt)
    model_classes = predictor[1]["classes"]
    mapping = map_classes(data.classes, model_classes)
    shared = [c for c in model_classes if c in set(mapping.values())]
    lacking = [c for c, m in mapping.items() if m is None]
    if not shared:
        raise DatasetError(f"none of the class folders of {data.root} ({', '.join(data.classes)}) is a "
                           f"class of checkpoint {checkpoint} ({', '.join(model_classes)}); rename the "
                           "folders to the model's classes or to a synonym listed in "
                           "leukemia_core/data/class_names.py (SYNONYMS)")
    table, meta = _predict(predictor, checkpoint, data.paths, batch_size, adapt_bn, strict,
                           shared if restrict_to_shared else None, num_workers, progress, device)
    table.insert(1, "relpath", [p.relative_to(data.root).as_posix() for p in data.paths])
    table.insert(2, "folder_class", data.labels)
    table.insert(3, "label", [mapping[c] or c for c in data.labels])
    table.insert(4, "dataset", data.root.name)
    ok = table["error"].isna()
    scored = table[ok & table["folder_class"].map(mapping).notna()]
    columns = shared if restrict_to_shared else list(model_classes)
    metrics = folder_metrics(scored["label"].tolist(), scored["pred"].tolist(), shared, columns)
    other = table[ok & table["folder_class"].map(mapping).isna()]
    result = {
        "schema": "leukemia-core/evaluate-images/v1",
        "images": str(data.root.resolve()), "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": sha256_file(ckpt),
        "adapt_bn": bool(adapt_bn), "restrict_to_shared": bool(restrict_to_shared), "strict": bool(strict),
        "model_classes": list(model_classes), "mapping": mapping, "shared_classes": shared,
        "folder_classes_model_lacks": lacking,
        **metrics,
        "n_images": len(table), "n_scored": len(scored), "n_unreadable": int((~ok).sum()),
        "unreadable": table.loc[~ok, "path"].tolist(),
        "counts": {c: int(n) for c, n in table["folder_class"].value_counts().reindex(data.classes).items()},
        "counts_scored": {c: int((scored["label"] == c).sum()) for c in shared},
        "predictions_of_classes_model_lacks": {
            c: {k: int(v) for k, v in other.loc[other["folder_class"] == c, "pred"].value_counts().items()}
            for c in lacking},
        "images_outside_class_folders": [str(p) for p in data.loose],
        "wall_time_s": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
