"""One classification run end to end: data, split, transforms, model, fit, test, results.

The CLI (`leukemia-core train`) and the notebooks call :func:`train_classifier`,
so a chapter and a command line give the same numbers for the same profile.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from .config import Profile, get_profile
from .data import load_dataset
from .data.splits import apply_split
from .data.torch_dataset import ImageTableDataset
from .dataroot import data_root
from .engine.checkpoint import WEIGHTS
from .engine.distributed import is_main_process
from .engine.train import FitConfig, FitResult, evaluate, fit
from .errors import UnknownNameError
from .models import create_model, size_kwargs
from .results import write_results
from .transforms import CLAHE, build_transform, compute_norm_stats, static_transform

PRETRAINED_NORM = {"efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def content_hash(table: pd.DataFrame) -> str:
    """sha256 over the sorted (relpath, split, sha256) rows a run used: the data's fingerprint."""
    cols = [c for c in ("relpath", "split", "sha256") if c in table]
    rows = sorted("\t".join(map(str, r)) for r in table[cols].itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def subsample(table: pd.DataFrame, cap: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``cap`` records per label, chosen deterministically from ``seed``."""
    if cap is None:
        return table
    parts = [g.sample(min(len(g), cap), random_state=seed) for _, g in table.groupby("label")]
    return pd.concat(parts).sort_values("relpath").reset_index(drop=True)


@dataclass
class PreparedData:
    table: pd.DataFrame  # records with a ``split`` column, after subsampling
    classes: list[str]
    mean: list[float]
    std: list[float]
    norm_source: str
    clahe: CLAHE | None

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name].reset_index(drop=True)

    def dataset(self, name: str, image_size: int, train: bool | None = None,
                preload: bool = False) -> ImageTableDataset:
        """Torch dataset of one split; ``preload`` keeps CLAHE'd, resized images in memory."""
        train = (name == "train") if train is None else train
        if preload:
            tf = build_transform(image_size, train, self.mean, self.std, None)
            return ImageTableDataset(self.split(name), self.classes, tf,
                                     preload=static_transform(image_size, self.clahe))
        tf = build_transform(image_size, train, self.mean, self.std, self.clahe)
        return ImageTableDataset(self.split(name), self.classes, tf)


def prepare_data(dataset: str, profile: Profile, root=None, classes: list[str] | None = None,
                 seed: int = 0, clahe: CLAHE | None = None, model: str | None = None,
                 pretrained: bool = False) -> PreparedData:
    """Load ``dataset`` with its committed split, subsample per the profile, and fix
    the normalisation (training-split statistics, or the pretrained weights' own)."""
    return prepare_table(apply_split(load_dataset(dataset, root)), profile, classes, seed, clahe,
                         model, pretrained, name=dataset)


def prepare_table(table: pd.DataFrame, profile: Profile, classes: list[str] | None = None,
                  seed: int = 0, clahe: CLAHE | None = None, model: str | None = None,
                  pretrained: bool = False, name: str = "table") -> PreparedData:
    """:func:`prepare_data` for a record table that already has a ``split`` column
    (e.g. several datasets joined by :func:`leukemia_core.taxonomy.load_taxonomy_table`)."""
    attrs = dict(table.attrs)
    table = table[table["label"].notna()]
    if classes is not None:
        unknown = sorted(set(classes) - set(table["label"]))
        if unknown:
            raise UnknownNameError(f"classes {unknown} do not occur in '{name}'; "
                                   f"its classes are {sorted(table['label'].unique())}")
        table = table[table["label"].isin(classes)]
    classes = list(classes) if classes is not None else sorted(table["label"].unique())
    parts = [subsample(table[table["split"] == "train"], profile.max_train_per_class, seed)]
    parts += [subsample(table[table["split"] == s], profile.max_eval_per_class, seed) for s in ("val", "test")]
    table = pd.concat(parts, ignore_index=True)
    table.attrs.update(attrs)
    if pretrained and model in PRETRAINED_NORM:
        (mean, std), source = PRETRAINED_NORM[model], f"{model} pretraining"
    else:
        mean, std = compute_norm_stats(table.loc[table["split"] == "train", "path"],
                                       profile.image_size, seed=seed, clahe=clahe)
        source = "training split"
    return PreparedData(table, classes, list(mean), list(std), source, clahe)


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
    meta = {"model": model_name, "pretrained": pretrained, "dataset": dataset,
            "image_size": prof.image_size, "mean": data.mean, "std": data.std,
            "clahe": repr(clahe) if clahe else None, "profile": prof.name}
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
    """Rebuild a classifier from a ``model.safetensors`` written by :func:`fit`
    (a run folder is accepted too); returns ``(model, meta)`` with ``meta['classes']``."""
    from .engine.checkpoint import load_weights, read_meta
    from .errors import CheckpointError

    path = Path(checkpoint)
    if path.is_dir():
        path = path / WEIGHTS
    meta = read_meta(path)
    missing = {"model", "classes", "image_size", "mean", "std"} - set(meta)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks metadata {sorted(missing)}; "
                              "it was not written by leukemia-core fit()")
    net = create_model(meta["model"], num_classes=len(meta["classes"]), pretrained=False,
                       **size_kwargs(meta["model"], meta["image_size"]))
    load_weights(path, net)
    return net.eval(), meta


def eval_transform(meta: dict):
    """The evaluation transform a checkpoint was trained with."""
    clahe = None
    if meta.get("clahe"):
        import re
        clip, tx, ty = map(float, re.findall(r"[\d.]+", meta["clahe"]))
        clahe = CLAHE(clip, (int(tx), int(ty)))
    return build_transform(meta["image_size"], False, meta["mean"], meta["std"], clahe)
