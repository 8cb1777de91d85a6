"""PBC (Acevedo et al. 2020): 8 classes of normal peripheral blood cells, CellaVision."""
from __future__ import annotations

from pathlib import Path

from leukemia_core.data.dataroot import dataset_dir
from leukemia_core.errors import DatasetError
from leukemia_core.data.records import list_images, make_table

FOLDER = "pbc"
RELEASE_DIR = "PBC_dataset_normal_DIB"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]
#: Sub-labels carried in filename prefixes, per class.
SUBLABELS = {
    "neutrophil": {"SNE": "segmented", "BNE": "band", "NEUTROPHIL": "unspecified"},
    "ig": {"IG": "unspecified", "MMY": "metamyelocyte", "MY": "myelocyte",
           "PMY": "promyelocyte"},
}


def load_pbc(root: Path, hashes: bool = True):
    """One row per cell image; ``sublabel`` holds the filename prefix for neutrophil/ig."""
    base = dataset_dir(root, "pbc", FOLDER)
    release = dataset_dir(root, "pbc", f"{FOLDER}/{RELEASE_DIR}")
    found = sorted(p.name for p in release.iterdir() if p.is_dir())
    unknown = set(found) - set(CLASSES)
    if unknown:
        raise DatasetError(f"PBC: unexpected class folder(s) {sorted(unknown)} in {release}; "
                           f"expected {CLASSES}")
    missing = set(CLASSES) - set(found)
    if missing:
        raise DatasetError(f"PBC: class folder(s) {sorted(missing)} missing from {release}; "
                           "re-download with `leukemia-core data fetch pbc`")
    rows = []
    for cls in CLASSES:
        for path in list_images(release / cls):
            prefix = path.stem.split("_")[0].upper()
            sublabel = None
            if cls in SUBLABELS:
                if prefix not in SUBLABELS[cls]:
                    raise DatasetError(f"PBC: {path} has prefix '{prefix}', not one of "
                                       f"{sorted(SUBLABELS[cls])} for class {cls}")
                sublabel = prefix
            rows.append({"path": path, "label": cls, "domain": "pbc", "sublabel": sublabel})
    return make_table(rows, "pbc", base, hashes=hashes)
