"""From records to the data a run trains on: classes kept, each split subsampled per the
profile, the normalisation fixed, and the data's fingerprint. The data layer: it imports
no model and no training engine."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd

from leukemia_core.config import Profile
from leukemia_core.errors import UnknownNameError
from leukemia_core.data.transforms import CLAHE, build_transform, compute_norm_stats, static_transform
from leukemia_core.data.torch_dataset import ImageTableDataset


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


def prepare_records(table: pd.DataFrame, profile: Profile, classes: list[str] | None = None,
                    seed: int = 0, clahe: CLAHE | None = None,
                    norm: tuple[list[float], list[float], str] | None = None,
                    name: str = "table") -> PreparedData:
    """Records with a ``split`` column -> the classes kept, each split subsampled per the
    profile, and the normalisation fixed: ``norm = (mean, std, source)`` (a pretrained
    backbone's, from :func:`leukemia_core.models.pretrained.pretrained_norm`) or, when
    None, the training split's statistics."""
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
    if norm is not None:
        mean, std, source = norm
    else:
        mean, std = compute_norm_stats(table.loc[table["split"] == "train", "path"],
                                       profile.image_size, seed=seed, clahe=clahe)
        source = "training split"
    return PreparedData(table, classes, list(mean), list(std), source, clahe)
