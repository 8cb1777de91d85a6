"""TXL-PBC (Gan et al. 2024): YOLO boxes from four sources, with per-image provenance."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukemia_core.data.dataroot import dataset_dir
from leukemia_core.errors import DatasetError
from leukemia_core.data.records import list_images, make_table

FOLDER = "txl_pbc"
BOX_CLASSES = ["WBC", "RBC", "Platelets"]
SPLITS = ("train", "val", "test")
#: Original square sizes of the sources not found by content hash.
SQUARE_SOURCES = {575: "raabin", 416: "bcd"}
PBC_ORIGINAL_WIDTH = 360


def read_yolo(txt: Path, width: int, height: int) -> tuple[list, list]:
    boxes, labels = [], []
    if not txt.exists():  # YOLO convention: no label file = no objects
        return boxes, labels
    for n, line in enumerate(txt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise DatasetError(f"TXL-PBC: {txt} line {n} has {len(parts)} fields, expected 5")
        cls, cx, cy, w, h = int(parts[0]), *map(float, parts[1:])
        if not 0 <= cls < len(BOX_CLASSES):
            raise DatasetError(f"TXL-PBC: {txt} line {n} has unknown class id {cls}")
        boxes.append([(cx - w / 2) * width, (cy - h / 2) * height,
                      (cx + w / 2) * width, (cy + h / 2) * height])
        labels.append(BOX_CLASSES[cls])
    return boxes, labels


def infer_domains(table: pd.DataFrame) -> pd.Series:
    """PBC/BCCD from ``source_map.csv`` (else from aspect ratio); Raabin vs BCD from
    size, scale-free.

    The scale of this copy is read off the PBC-sourced images (originally 360 px
    wide), so the rule works on the downscaled mirror and on the originals alike.
    """
    domain = table["source_dataset"].copy()
    aspect = table["width"] / table["height"]
    unmapped = domain.isna()
    domain[unmapped & ((aspect - 4 / 3).abs() < 0.01)] = "bccd"  # 640x480 fields
    domain[unmapped & (table["width"] != table["height"]) & ((aspect - 360 / 363).abs() < 0.01)] = "pbc"
    pbc_w = table.loc[domain == "pbc", "width"]
    scale = float(np.median(pbc_w)) / PBC_ORIGINAL_WIDTH if len(pbc_w) else 1.0
    for i in table.index[domain.isna()]:
        w, h = table.at[i, "width"], table.at[i, "height"]
        nominal = w / scale
        size = min(SQUARE_SOURCES, key=lambda s: abs(s - nominal))
        if w != h or abs(size - nominal) > 0.05 * size:
            raise DatasetError(f"TXL-PBC: cannot tell the source of {table.at[i, 'path']} "
                               f"({w}x{h} at scale {scale:.2f}); not in source_map.csv and "
                               f"not a {sorted(SQUARE_SOURCES)} px square")
        domain.at[i] = SQUARE_SOURCES[size]
    return domain


def load_txl_pbc(root: Path, hashes: bool = True):
    """One row per image: YOLO boxes in pixels, TXL split, source domain and source file."""
    base = dataset_dir(root, "txl_pbc", FOLDER)
    rel = dataset_dir(root, "txl_pbc", f"{FOLDER}/TXL_PBC")
    if (base / "source_map.csv").exists():
        smap = pd.read_csv(base / "source_map.csv").set_index("txl_path")
    else:
        warnings.warn(f"TXL-PBC: {base / 'source_map.csv'} is missing (it is computed by this "
                      "project, not part of the release); domains are inferred from image size "
                      "alone and source_path is empty", stacklevel=2)
        smap = pd.DataFrame(columns=["source_dataset", "source_path"])
    rows, orphans = [], []
    for split in SPLITS:
        img_dir = dataset_dir(root, "txl_pbc", f"{FOLDER}/TXL_PBC/images/{split}")
        lab_dir = rel / "labels" / split
        images = list_images(img_dir)
        stems = {p.stem for p in images}
        orphans += [str(t) for t in sorted(lab_dir.glob("*.txt"))
                    if t.stem not in stems and t.stem != "classes"]
        for path in images:
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except OSError as exc:
                raise DatasetError(f"TXL-PBC: cannot read {path}: {exc}") from exc
            boxes, labels = read_yolo(lab_dir / f"{path.stem}.txt", width, height)
            key = path.relative_to(base).as_posix()
            src = smap.loc[key] if key in smap.index else None
            rows.append({"path": path, "label": None, "domain": None, "split": split,
                         "width": width, "height": height, "boxes": boxes, "box_labels": labels,
                         "source_dataset": None if src is None else src["source_dataset"],
                         "source_path": None if src is None else src["source_path"]})
    table = make_table(rows, "txl_pbc", base, hashes=hashes)
    table["domain"] = infer_domains(table)
    table.attrs["labels_without_image"] = orphans
    if orphans:
        warnings.warn(f"TXL-PBC: label files without an image: {orphans}", stacklevel=2)
    return table
