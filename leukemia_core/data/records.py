"""The uniform record table every loader returns, and content hashing."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from leukemia_core.errors import DatasetError

#: Columns every loader's table has, in this order, before its task columns.
RECORD_COLUMNS = ["path", "relpath", "label", "dataset", "domain", "sha256"]
#: The five white-blood-cell classes shared by PBC, BCCD, Zheng, Matek (neutrophils).
WBC_CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths, workers: int = 4) -> list[str]:
    """Hash many files (threads: hashlib releases the GIL)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_file, paths))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below it if ``recursive``), sorted, hidden files skipped."""
    return sorted(
        p for p in (Path(folder).rglob("*") if recursive else Path(folder).iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def find_images(folder, recursive: bool = False) -> list[Path]:
    """:func:`list_images` of a user-given folder: a missing folder or one without images
    is an error naming it (for ``predict`` / ``detect``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder of images")
    paths = list_images(folder, recursive)
    if not paths:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return paths


def make_table(rows: list[dict], dataset: str, root: Path, hashes: bool = True) -> pd.DataFrame:
    """Build a record table from dicts with at least ``path, label, domain``.

    ``relpath`` is the path relative to the dataset folder ``root`` (the same on the
    mirror and on a full-resolution download, so splits key on it).
    """
    if not rows:
        raise DatasetError(f"dataset '{dataset}': no images found under {root}")
    df = pd.DataFrame(rows)
    df["path"] = df["path"].map(str)
    df["relpath"] = [Path(p).relative_to(root).as_posix() for p in df["path"]]
    df["dataset"] = dataset
    df["sha256"] = sha256_files(df["path"]) if hashes else None
    extra = [c for c in df.columns if c not in RECORD_COLUMNS]
    df = df[RECORD_COLUMNS + extra].sort_values("relpath", kind="stable").reset_index(drop=True)
    df.attrs["dataset"] = dataset
    df.attrs["root"] = str(root)
    return df
