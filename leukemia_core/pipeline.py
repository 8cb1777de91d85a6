"""One classification run end to end: data, split, transforms, model, fit, test, results.

The CLI (`leukemia-core train`) and the notebooks call :func:`train_classifier`,
so a chapter and a command line give the same numbers for the same profile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from leukemia_core.config import Profile, get_profile
from leukemia_core.data import load_dataset
from leukemia_core.data.prepare import PreparedData, content_hash, prepare_records, subsample  # noqa: F401 (re-exported)
from leukemia_core.data.splits import apply_split
from leukemia_core.data.dataroot import data_root
from leukemia_core.engine.checkpoint import WEIGHTS
from leukemia_core.engine.distributed import is_main_process
from leukemia_core.engine.train import FitConfig, FitResult, evaluate, fit
from leukemia_core.models import create_model, size_kwargs
from leukemia_core.models.pretrained import pretrained_norm
from leukemia_core.reproducibility.results import write_results
from leukemia_core.data.transforms import CLAHE, eval_transform_from, preprocess_dict

def prepare_data(dataset: str, profile: Profile, root=None, classes: list[str] | None = None,
                 seed: int = 0, clahe: CLAHE | None = None, model: str | None = None,
                 pretrained: bool = False) -> PreparedData:
    """Load ``dataset`` with its committed split, subsample per the profile, and fix the
    normalisation: the pretrained weights' own (models/pretrained.py) when ``pretrained``,
    else the training split's statistics."""
    return prepare_records(apply_split(load_dataset(dataset, root)), profile, classes, seed, clahe,
                           norm=pretrained_norm(model, pretrained), name=dataset)


def prepare_table(table: pd.DataFrame, profile: Profile, classes: list[str] | None = None,
                  seed: int = 0, clahe: CLAHE | None = None, model: str | None = None,
                  pretrained: bool = False, name: str = "table") -> PreparedData:
    """:func:`prepare_data` for a record table that already has a ``split`` column
    (e.g. several datasets joined by :func:`leukemia_core.data.taxonomy.load_taxonomy_table`)."""
    return prepare_records(table, profile, classes, seed, clahe, norm=pretrained_norm(model, pretrained),
                           name=name)


def make_loader(ds, profile: Profile, train: bool, weighted_sampler: bool = False) -> DataLoader:
    """Shuffled (or class-balanced) batches for training, ordered ones for evaluation.

    Evaluation of preloaded images runs in the main process: its transform is cheap,
    and idle worker processes would only hold memory.
    """
    sampler = None
    if train and weighted_sampler:
        counts = torch.bincount(torch.tensor(ds.targets), minlength=len(ds.classes)).float()
        sampler = WeightedRandomSampler((1.0 / counts)[ds.targets], num_samples=len(ds), replacement=True)
    workers = 0 if (not train and getattr(ds, "cache", None) is not None) else profile.num_workers
    return DataLoader(ds, batch_size=profile.batch_size if train else profile.batch_size * 2,
                      shuffle=train and sampler is None, sampler=sampler, drop_last=train and len(ds) > profile.batch_size,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())


@dataclass
class RunResult:
    model: torch.nn.Module
    data: PreparedData
    fit: FitResult
    test: dict  # metrics on the test split (plus probs/targets tensors)
    predictions: pd.DataFrame
    results_path: Path | None
    wall_time_s: float


def predictions_table(table: pd.DataFrame, probs: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    out = table[["relpath", "label"]].copy()
    out["pred"] = [classes[i] for i in probs.argmax(1).tolist()]
    out["confidence"] = probs.max(1).values.numpy()
    for i, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, i].numpy()
    return out


def train_classifier(dataset: str = "pbc", model: str | None = None, profile: str | Profile = "ci",
                     root=None, out_dir: str | Path | None = None, pretrained: bool = False,
                     seed: int = 0, classes: list[str] | None = None, clahe: CLAHE | None = None,
                     class_weights: bool = False, weighted_sampler: bool = False,
                     results_path: str | Path | None = None, overwrite: bool = False,
                     resume: bool = False, progress: bool = True, **fit_overrides) -> RunResult:
    """Train and test one classifier under a profile; write checkpoint, predictions
    and a results JSON when ``out_dir`` / ``results_path`` are given."""
    start = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    model_name = model or prof.model
    data = prepare_data(dataset, prof, root, classes, seed, clahe, model_name, pretrained)
    datasets = {s: data.dataset(s, prof.image_size, preload=prof.preload_images)
                for s in ("train", "val", "test")}
    train_ds = datasets["train"]
    loaders = {s: make_loader(ds, prof, s == "train", weighted_sampler) for s, ds in datasets.items()}
    weights = None
    if class_weights:
        counts = torch.bincount(torch.tensor(train_ds.targets), minlength=len(data.classes)).float()
        weights = (counts.sum() / (len(counts) * counts)).tolist()
    config = FitConfig(epochs=prof.epochs, lr=prof.lr, warmup_epochs=prof.warmup_epochs,
                       patience=prof.patience, seed=seed, class_weights=weights,
                       progress=progress, **fit_overrides)
    torch.manual_seed(seed)
    net = create_model(model_name, num_classes=len(data.classes), pretrained=pretrained,
                       **size_kwargs(model_name, prof.image_size))
    meta = {"kind": "classifier", "model": model_name, "pretrained": pretrained, "dataset": dataset,
            "image_size": prof.image_size, "profile": prof.name,
            "preprocess": preprocess_dict(prof.image_size, data.mean, data.std, clahe)}
    fit_result = fit(net, loaders["train"], loaders["val"], data.classes, config, out_dir=out_dir,
                     resume=resume, meta=meta)
    test = evaluate(net, loaders["test"], data.classes)
    preds = predictions_table(data.split("test"), test["probs"], data.classes)
    wall = time.perf_counter() - start
    main = is_main_process()  # under DDP only rank 0 writes files
    if out_dir and main:
        preds.to_csv(Path(out_dir) / "predictions_test.csv", index=False)
    path = None
    if results_path and main:
        counts = data.table.groupby(["split", "label"]).size().unstack(fill_value=0)
        path = write_results(
            results_path, overwrite=overwrite, kind="classification", dataset=dataset,
            model=model_name, pretrained=pretrained, profile=prof.name, profile_sizes=prof.to_dict(),
            seeds=[seed], config=meta | {"fit": config.__dict__, "class_weights": class_weights,
                                        "weighted_sampler": weighted_sampler,
                                        "norm_source": data.norm_source},
            data_root=str(data_root(root)), split_file=data.table.attrs.get("split_file"),
            split_sha256=data.table.attrs.get("split_sha256"), data_sha256=content_hash(data.table),
            counts=counts.to_dict(orient="index"),
            metrics={"test": {k: v for k, v in test.items() if k not in ("probs", "targets")},
                     "best_epoch": fit_result.best_epoch, "best_val_score": fit_result.best_score,
                     "monitor": config.monitor},
            history=fit_result.history, wall_time_s=wall,
            checkpoint=str(Path(out_dir) / WEIGHTS) if out_dir else None)
    return RunResult(net, data, fit_result, test, preds, path, wall)


def load_classifier(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a classifier from a ``model.safetensors`` written by :func:`fit` (a run
    folder is accepted too); returns ``(model, meta)`` with ``meta['classes']``.
    :func:`leukemia_core.checkpoints.load_checkpoint` loads every kind of checkpoint."""
    from leukemia_core.engine.checkpoint import checkpoint_file, load_weights, read_meta
    from leukemia_core.errors import CheckpointError

    path = checkpoint_file(checkpoint)
    meta = upgrade_classifier_meta(read_meta(path))
    missing = {"model", "classes", "image_size", "preprocess"} - set(meta)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks metadata {sorted(missing)}; "
                              "it was not written by leukemia-core fit()")
    net = create_model(meta["model"], num_classes=len(meta["classes"]), pretrained=False,
                       **size_kwargs(meta["model"], meta["image_size"]))
    load_weights(path, net)
    return net.eval(), meta


def upgrade_classifier_meta(meta: dict) -> dict:
    """Metadata of a classifier checkpoint in today's form: checkpoints written before the
    structured ``preprocess`` field (mean, std and CLAHE as a repr string) are read too."""
    if "preprocess" in meta or not {"image_size", "mean", "std"} <= set(meta):
        return meta
    import re

    clahe = None
    if meta.get("clahe"):  # the old repr: "CLAHE(clip_limit=2.0, tile_grid=(8, 8))"
        clip, tx, ty = map(float, re.findall(r"[\d.]+", meta["clahe"]))
        clahe = CLAHE(clip, (int(tx), int(ty)))
    return {"kind": "classifier", **meta,
            "preprocess": preprocess_dict(meta["image_size"], meta["mean"], meta["std"], clahe)}


def eval_transform(meta: dict):
    """The evaluation transform a classifier checkpoint was trained with."""
    return eval_transform_from(upgrade_classifier_meta(meta)["preprocess"])
