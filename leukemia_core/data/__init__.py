"""Dataset loaders: each returns one record table (see :mod:`.records`)."""
from __future__ import annotations

from pathlib import Path

from leukemia_core.data.dataroot import data_root
from leukemia_core.errors import UnknownNameError
from leukemia_core.data.bccd import load_bccd, load_bccd_crops
from leukemia_core.data.pbc import load_pbc
from leukemia_core.data.records import RECORD_COLUMNS, WBC_CLASSES
from leukemia_core.data.single_cell import load_aria, load_matek, load_zheng
from leukemia_core.data.txl_pbc import load_txl_pbc
from leukemia_core.data.wbcatt import ATTRIBUTES, load_wbcatt

#: name -> loader(root, hashes=True)
LOADERS = {
    "pbc": load_pbc, "wbcatt": load_wbcatt, "bccd": load_bccd, "bccd_crops": load_bccd_crops,
    "txl_pbc": load_txl_pbc, "matek": load_matek, "aria": load_aria, "zheng": load_zheng,
}
#: Datasets whose records are single images with a class label (classification).
CLASSIFICATION = ["pbc", "wbcatt", "bccd_crops", "matek", "aria", "zheng"]


def load_dataset(name: str, root: str | Path | None = None, hashes: bool = True, **kwargs):
    """Load the record table of dataset ``name`` from the data root."""
    if name not in LOADERS:
        raise UnknownNameError(f"unknown dataset '{name}'; choose one of {sorted(LOADERS)}")
    return LOADERS[name](data_root(root), hashes=hashes, **kwargs)


__all__ = ["ATTRIBUTES", "CLASSIFICATION", "LOADERS", "RECORD_COLUMNS", "WBC_CLASSES",
           "load_dataset"]
