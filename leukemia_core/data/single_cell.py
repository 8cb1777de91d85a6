"""Folder-per-class single-image sets: Matek-19 subset, Aria ALL, Zheng Dataset 1."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from leukemia_core.data.dataroot import dataset_dir
from leukemia_core.errors import DatasetError
from leukemia_core.data.records import list_images, make_table

#: Matek-19 folder names (TCIA release abbreviations and the mirror's names) -> label.
MATEK_FOLDERS = {
    "myeloblast": "myeloblast", "MYB": "myeloblast", "MYO": "myeloblast",
    "seg_neutrophil": "neutrophil", "NGS": "neutrophil",
    "BAS": "basophil", "EOS": "eosinophil", "LYT": "lymphocyte", "MON": "monocyte",
    "NGB": "neutrophil_band", "LYA": "atypical_lymphocyte", "EBO": "erythroblast",
    "KSC": "smudge_cell", "MMZ": "metamyelocyte", "MOB": "monoblast",
    "PMB": "promyelocyte_bilobed", "PMO": "promyelocyte",
}
#: Aria ALL folders (mirror names and the Kaggle release's names) -> label.
ARIA_FOLDERS = {
    "Benign": "benign", "Early": "early_pre_b", "Pre": "pre_b", "Pro": "pro_b",
    "[Malignant] early Pre-B": "early_pre_b", "[Malignant] Pre-B": "pre_b",
    "[Malignant] Pro-B": "pro_b",
}
ZHENG_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}


def load_folders(root: Path, name: str, folder: str, mapping: dict, domain: str,
                 hashes: bool = True):
    base = dataset_dir(root, name, folder)
    rows = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        if sub.name not in mapping:
            raise DatasetError(f"{name}: unknown class folder {sub}; known: {sorted(mapping)}")
        for path in list_images(sub):
            rows.append({"path": path, "label": mapping[sub.name], "domain": domain,
                         "source_label": sub.name})
    return make_table(rows, name, base, hashes=hashes)


def load_matek(root: Path, hashes: bool = True):
    """Matek-19 (Munich, AML): the mirrored myeloblast and segmented-neutrophil classes."""
    return load_folders(root, "matek", "matek_subset", MATEK_FOLDERS, "matek", hashes)


def load_aria(root: Path, hashes: bool = True):
    """Aria B-ALL (Tehran): smear fields, benign hematogones and three B-ALL stages."""
    return load_folders(root, "aria", "all_aria", ARIA_FOLDERS, "aria", hashes)


def load_zheng(root: Path, hashes: bool = True):
    """Zheng Dataset 1 (Jiangxi Tecom): image, mask (0/128/255) and class per cell."""
    base = dataset_dir(root, "zheng", "zheng_wbc")
    images = dataset_dir(root, "zheng", "zheng_wbc/Dataset 1")
    csv_path = base / "Class Labels of Dataset 1.csv"
    if not csv_path.exists():
        raise DatasetError(f"zheng: label file {csv_path} is missing")
    labels = pd.read_csv(csv_path)
    labels.columns = [c.strip().lower() for c in labels.columns]
    bad = ~labels["class label"].isin(ZHENG_CLASSES)
    if bad.any():
        raise DatasetError(f"zheng: {csv_path} has unknown class ids {sorted(labels.loc[bad, 'class label'].unique())}")
    rows = []
    for image_id, cls in zip(labels["image id"], labels["class label"]):
        path = images / f"{int(image_id):03d}.bmp"
        mask = path.with_suffix(".png")
        for p in (path, mask):
            if not p.exists():
                raise DatasetError(f"zheng: {csv_path} lists image {image_id} but {p} is missing")
        rows.append({"path": path, "label": ZHENG_CLASSES[cls], "domain": "zheng",
                     "mask_path": str(mask)})
    return make_table(rows, "zheng", base, hashes=hashes)
