"""Torch datasets over record tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from leukemia_core.errors import DatasetError, UnknownNameError


def read_image(path: str | Path) -> Image.Image:
    """Decode an image to RGB; a corrupt or missing file raises a DatasetError naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"cannot decode image {path} ({exc}); the file is corrupt or not an "
                           "image: re-fetch it or run `leukemia-core data check`") from exc


class ImageTableDataset(torch.utils.data.Dataset):
    """(image tensor, class index) pairs from a record table's ``path`` and ``label``.

    ``classes`` fixes the index order; a label outside it is an error, not a skip.
    ``preload`` (a callable PIL -> PIL, e.g. CLAHE + resize) decodes every image
    once up front and keeps the result in memory: on a 2-core machine this frees
    the cores the loader workers would spend decoding the same JPEGs every epoch.
    """

    def __init__(self, table: pd.DataFrame, classes: list[str], transform=None, preload=None):
        unknown = sorted(set(table["label"]) - set(classes))
        if unknown:
            raise UnknownNameError(f"labels {unknown} are not in the class list {classes}")
        self.paths = table["path"].tolist()
        self.classes = list(classes)
        self.targets = [self.classes.index(c) for c in table["label"]]
        self.transform = transform
        self.cache = None
        if preload is not None:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(4) as pool:
                self.cache = list(pool.map(lambda p: np.asarray(preload(read_image(p))), self.paths))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.fromarray(self.cache[i]) if self.cache is not None else read_image(self.paths[i])
        return (self.transform(image) if self.transform else image), self.targets[i]
