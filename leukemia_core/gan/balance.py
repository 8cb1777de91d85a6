"""Adding generated images to a training set, and only to a training set.

:func:`top_up_counts` says how many images to generate per class; :func:`training_set`
joins the preloaded real training images with the synthetic ones (their provenance rows
kept beside them); :func:`evaluation_rows` is the one way the chapter takes validation
and test rows, and refuses any synthetic row (:func:`provenance.assert_real_only`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from leukemia_core.errors import LeukemiaError
from leukemia_core.gan.provenance import assert_real_only, is_synthetic


def top_up_counts(counts: dict[str, int], classes: list[str], target: int) -> dict[str, int]:
    """Images to generate so each of ``classes`` reaches ``target`` (0 where it already does)."""
    missing = sorted(set(classes) - set(counts))
    if missing:
        raise LeukemiaError(f"no real training images of {missing}: a generator cannot be trained for them")
    return {c: max(0, int(target) - int(counts[c])) for c in classes}


class ArrayImageDataset(torch.utils.data.Dataset):
    """(transform(image), class index) from uint8 HWC arrays held in memory.

    ``records`` (one row per image: ``relpath``, ``label``, provenance) travels with the
    images, so a training set always says which of its images are generated.
    """

    def __init__(self, images: list[np.ndarray], records: pd.DataFrame, classes: list[str], transform=None):
        if len(images) != len(records):
            raise LeukemiaError(f"{len(images)} images but {len(records)} records")
        unknown = sorted(set(records["label"]) - set(classes))
        if unknown:
            raise LeukemiaError(f"labels {unknown} are not in the class list {classes}")
        self.cache, self.records, self.classes = list(images), records.reset_index(drop=True), list(classes)
        self.targets = [self.classes.index(c) for c in self.records["label"]]
        self.transform = transform

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        image = Image.fromarray(self.cache[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


def training_set(real_images: list[np.ndarray], real_records: pd.DataFrame, classes: list[str],
                 transform=None, synthetic_images: list[np.ndarray] | None = None,
                 synthetic_records: pd.DataFrame | None = None) -> ArrayImageDataset:
    """Real training images plus (optionally) synthetic ones, as one dataset.

    ``real_records`` must be training rows (a ``split`` column, if present, says
    ``train``) and real; ``synthetic_records`` must be synthetic (provenance rows of
    :func:`provenance.generate`).
    """
    if "split" in real_records and (real_records["split"] != "train").any():
        raise LeukemiaError("training_set got rows of splits "
                            f"{sorted(set(real_records['split']) - {'train'})}: pass the training split only")
    assert_real_only(real_records, "the real part of the training set")
    images, records = list(real_images), real_records[["relpath", "label"]].assign(synthetic=False)
    if synthetic_records is not None and len(synthetic_records):
        if not is_synthetic(synthetic_records).all():
            raise LeukemiaError("synthetic_records holds rows without synthetic provenance "
                                "(no synthetic:// path or synthetic flag)")
        images += list(synthetic_images)
        records = pd.concat([records, synthetic_records.assign(split="train")], ignore_index=True)
    return ArrayImageDataset(images, records, classes, transform)


def evaluation_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of a validation or test split, after checking that none is synthetic."""
    if split not in ("val", "test"):
        raise LeukemiaError(f"evaluation_rows takes 'val' or 'test', not '{split}'")
    rows = table[table["split"] == split].reset_index(drop=True)
    assert_real_only(rows, f"the {split} split")
    return rows
