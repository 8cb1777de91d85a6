"""WBCAtt (Tsutsui et al. 2023): 11 morphological attributes joined onto PBC records."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from leukemia_core.data.dataroot import dataset_dir
from leukemia_core.errors import DatasetError
from leukemia_core.data.pbc import load_pbc

FOLDER = "wbcatt"
ATTRIBUTES = ["cell_size", "cell_shape", "nucleus_shape", "nuclear_cytoplasmic_ratio",
              "chromatin_density", "cytoplasm_vacuole", "cytoplasm_texture",
              "cytoplasm_colour", "granule_type", "granule_colour", "granularity"]
SPLIT_FILES = {s: f"pbc_attr_v1_{s}.csv" for s in ("train", "val", "test")}
REANNOTATIONS = "pbc_attr_reannotations.csv"


def read_attribute_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str)
    need = {"path", "label", *ATTRIBUTES}
    if need - set(df.columns):
        raise DatasetError(f"WBCAtt: {path} lacks columns {sorted(need - set(df.columns))}")
    if df["path"].duplicated().any():
        raise DatasetError(f"WBCAtt: {path} lists a path twice: "
                           f"{df.loc[df['path'].duplicated(), 'path'].iloc[0]}")
    return df


def load_wbcatt(root: Path, hashes: bool = True, reannotated: bool = False):
    """PBC records of the 5 WBC classes carrying WBCAtt attributes.

    ``wbcatt_split`` keeps WBCAtt's own split; ``reannotated=True`` replaces the
    attributes of the 1,000 re-annotated cells by their new values.
    """
    base = dataset_dir(root, "wbcatt", FOLDER)
    parts = []
    for split, name in SPLIT_FILES.items():
        part = read_attribute_csv(base / name)
        part["wbcatt_split"] = split
        parts.append(part)
    attrs = pd.concat(parts, ignore_index=True)
    if attrs["path"].duplicated().any():
        raise DatasetError("WBCAtt: a cell appears in two of its split files: "
                           f"{attrs.loc[attrs['path'].duplicated(), 'path'].iloc[0]}")
    attrs["reannotated"] = False
    if reannotated:
        new = read_attribute_csv(base / REANNOTATIONS).set_index("path")
        unknown = set(new.index) - set(attrs["path"])
        if unknown:
            raise DatasetError(f"WBCAtt: re-annotations name unknown cells, e.g. {sorted(unknown)[0]}")
        hit = attrs["path"].isin(new.index)
        attrs.loc[hit, ATTRIBUTES] = new.loc[attrs.loc[hit, "path"], ATTRIBUTES].to_numpy()
        attrs.loc[hit, "reannotated"] = True
    pbc = load_pbc(root, hashes=hashes)
    merged = pbc.merge(attrs.drop(columns=["img_name"], errors="ignore")
                       .rename(columns={"path": "relpath", "label": "wbcatt_label"}),
                       on="relpath", how="inner", validate="one_to_one")
    missing = set(attrs["path"]) - set(merged["relpath"])
    if missing:
        raise DatasetError(f"WBCAtt: {len(missing)} attribute rows have no PBC image, e.g. "
                           f"{sorted(missing)[0]}; is the PBC release complete?")
    bad = merged["wbcatt_label"].str.lower() != merged["label"]
    if bad.any():
        raise DatasetError(f"WBCAtt: label disagrees with PBC folder for {merged.loc[bad, 'relpath'].iloc[0]}")
    merged = merged.drop(columns="wbcatt_label").reset_index(drop=True)
    merged, dropped = drop_cross_split_copies(merged)
    merged["dataset"] = "wbcatt"
    merged.attrs.update(dataset="wbcatt", root=pbc.attrs["root"], cross_split_copies=dropped)
    return merged


#: which copy of a cell survives when WBCAtt's own split holds it twice: the published
#: test (then validation) set stays whole, the leaking copy leaves training/validation
KEEP_ORDER = {"test": 0, "val": 1, "train": 2}


def drop_cross_split_copies(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Remove copies of one cell that sit in two of WBCAtt's splits.

    Copies are PBC's committed near-duplicate clusters (``splits/pbc_near_duplicates.csv``,
    exact byte copies included). In a cluster spread over several WBCAtt splits, the
    members in the most held-out split (test, then val) stay and the others are
    dropped. Returns ``(kept, dropped)``; ``dropped`` lists each removed cell with the
    split it was in and the copy it duplicates."""
    from leukemia_core.data.near_duplicates import clusters
    from leukemia_core.data.splits import read_near_duplicates

    cluster = clusters(table["relpath"], read_near_duplicates("pbc"))
    t = table.assign(_cluster=cluster[table["relpath"]].to_numpy(),
                     _rank=table["wbcatt_split"].map(KEEP_ORDER))
    best = t.groupby("_cluster")["_rank"].transform("min")
    drop = t["_rank"] > best
    keeper = t[~drop].groupby("_cluster")["relpath"].first()
    dropped = pd.DataFrame({"relpath": t.loc[drop, "relpath"], "wbcatt_split": t.loc[drop, "wbcatt_split"],
                            "copy_of": keeper[t.loc[drop, "_cluster"]].to_numpy()}).reset_index(drop=True)
    return t[~drop].drop(columns=["_cluster", "_rank"]).reset_index(drop=True), dropped
