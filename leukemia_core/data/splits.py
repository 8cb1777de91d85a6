"""Deterministic, stratified, deduplicated splits, committed as CSV under ``splits/``.

Splits key on ``relpath`` (the same on the mirror and on full-resolution originals).
Exact duplicates (same sha256), near duplicates (the same cell or field shifted or
re-encoded: :mod:`leukemia_core.data.near_duplicates`, committed as
``splits/<name>_near_duplicates.csv``) and, optionally, records sharing a group column
(e.g. crops of one smear image) always land in the same split; copies whose members
disagree on the label are excluded and listed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import DatasetError

SPLITS_DIR = REPO_ROOT / "splits"
#: dataset -> (fractions train/val/test, group column or None)
SPLIT_SPECS = {
    "pbc": ((0.7, 0.1, 0.2), None),
    "bccd_crops": ((0.7, 0.1, 0.2), "source_image"),
    "matek": ((0.7, 0.1, 0.2), None),
    "aria": ((0.7, 0.1, 0.2), None),
    "zheng": ((0.7, 0.1, 0.2), None),
}
#: near-duplicate confirmation threshold per dataset (see near_duplicates): Aria's
#: images are whole smear fields, whose copies separate from other fields more clearly
NEAR_DUP_MIN_CORR = {"aria": 0.75}
#: datasets that reuse another dataset's split file (same relpaths)
SPLIT_ALIASES = {"wbcatt": "pbc"}
SPLIT_NAMES = ("train", "val", "test")


def duplicate_groups(table: pd.DataFrame, group_col: str | None = None,
                     pairs: pd.DataFrame | None = None) -> pd.Series:
    """Connected components of 'same sha256' (and 'same group_col', and the relpath pairs
    ``a, b`` of ``pairs``), as integer ids."""
    parent = list(range(len(table)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [table["sha256"]] + ([table[group_col]] if group_col else [])
    for key in keys:
        for members in key.groupby(key, sort=False).indices.values():
            for j in members[1:]:
                parent[find(j)] = find(members[0])
    if pairs is not None and len(pairs):
        row = {r: k for k, r in enumerate(table["relpath"])}
        for a, b in zip(pairs["a"], pairs["b"]):
            if a in row and b in row:
                parent[find(row[b])] = find(row[a])
    return pd.Series([find(i) for i in range(len(table))], index=table.index)


def make_split(table: pd.DataFrame, fractions=(0.7, 0.1, 0.2), group_col: str | None = None,
               seed: int = 0, pairs: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(split, excluded)`` tables with columns ``relpath, label, split`` and
    ``relpath, label, sha256, reason``.

    ``pairs``: near-duplicate relpath pairs (columns ``a, b``) kept together like exact
    copies. Exact copies under different labels are excluded (the label is unknowable);
    a near-duplicate cluster with mixed labels is kept together (most are similar-looking
    different cells). Stratified per class over groups; a group's label is its most
    common one.
    Deterministic: depends only on the table's content, ``pairs`` and ``seed``.
    """
    if table["sha256"].isna().any():
        raise DatasetError("splits need content hashes: load the dataset with hashes=True")
    t = table.sort_values("relpath").reset_index(drop=True)
    t["group"] = duplicate_groups(t, group_col, pairs)
    cross = t.groupby("sha256")["label"].transform("nunique") > 1
    excluded = t.loc[cross, ["relpath", "label", "sha256"]].assign(
        reason="exact duplicate across classes")
    t = t.loc[~cross]
    # name each group by its first relpath so the order is content-defined
    group_key = t.groupby("group")["relpath"].min()
    group_label = t.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assign = {}
    for label in sorted(group_label.unique()):
        groups = sorted(group_label.index[group_label == label], key=group_key.__getitem__)
        order = rng.permutation(len(groups))
        n = len(groups)
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        for rank, idx in enumerate(order):
            assign[groups[idx]] = ("train" if rank < n_train else
                                   "val" if rank < n_train + n_val else "test")
    split = t[["relpath", "label"]].assign(split=t["group"].map(assign).to_numpy())
    return split.reset_index(drop=True), excluded.reset_index(drop=True)


def split_paths(name: str, splits_dir: Path = SPLITS_DIR) -> tuple[Path, Path]:
    name = SPLIT_ALIASES.get(name, name)
    return splits_dir / f"{name}.csv", splits_dir / f"{name}_excluded.csv"


def near_duplicates_path(name: str, splits_dir: Path = SPLITS_DIR) -> Path:
    return splits_dir / f"{SPLIT_ALIASES.get(name, name)}_near_duplicates.csv"


def read_near_duplicates(name: str, splits_dir: Path = SPLITS_DIR) -> pd.DataFrame:
    """The committed near-duplicate pairs of dataset ``name`` (``a, b, hamming, correlation``)."""
    path = near_duplicates_path(name, splits_dir)
    if not path.exists():
        raise DatasetError(f"no committed near-duplicate list {path}; create it with "
                           f"`leukemia-core data splits {name}`")
    return pd.read_csv(path)


def compute_split(name: str, table: pd.DataFrame):
    """``(split, excluded, near-duplicate pairs)`` of dataset ``name``, from its images."""
    from leukemia_core.data.near_duplicates import NearDupConfig, near_duplicate_pairs

    if name not in SPLIT_SPECS:
        raise DatasetError(f"no split spec for '{name}'; datasets with splits: {sorted(SPLIT_SPECS)}")
    fractions, group_col = SPLIT_SPECS[name]
    cfg = NearDupConfig(**({"min_corr": NEAR_DUP_MIN_CORR[name]} if name in NEAR_DUP_MIN_CORR else {}))
    pairs = near_duplicate_pairs(table, cfg)
    split, excluded = make_split(table, fractions, group_col, pairs=pairs)
    return split, excluded, pairs


def write_split(name: str, table: pd.DataFrame, splits_dir: Path = SPLITS_DIR) -> tuple[Path, Path, Path]:
    """Compute and write the committed split files of dataset ``name``."""
    split, excluded, pairs = compute_split(name, table)
    split_file, excl_file = split_paths(name, splits_dir)
    pairs_file = near_duplicates_path(name, splits_dir)
    splits_dir.mkdir(parents=True, exist_ok=True)
    split.to_csv(split_file, index=False, lineterminator="\n")
    excluded.to_csv(excl_file, index=False, lineterminator="\n")
    pairs.to_csv(pairs_file, index=False, lineterminator="\n")
    return split_file, excl_file, pairs_file


def split_hash(name: str, splits_dir: Path = SPLITS_DIR) -> str:
    """sha256 of the committed split file (recorded in every results JSON)."""
    return hashlib.sha256(split_paths(name, splits_dir)[0].read_bytes()).hexdigest()


def apply_split(table: pd.DataFrame, name: str | None = None,
                splits_dir: Path = SPLITS_DIR) -> pd.DataFrame:
    """Add the committed ``split`` column; excluded records are removed (and listed
    in the excluded file). Any record unknown to the split file, or any split row
    missing from the table, is an error: regenerate splits or complete the data."""
    name = name or table.attrs["dataset"]
    split_file, excl_file = split_paths(name, splits_dir)
    if not split_file.exists():
        raise DatasetError(f"no committed split {split_file}; create it with "
                           f"`leukemia-core data splits {name}`")
    split = pd.read_csv(split_file)
    excluded = set(pd.read_csv(excl_file)["relpath"]) if excl_file.exists() else set()
    known = set(split["relpath"]) | excluded
    unknown = sorted(set(table["relpath"]) - known)
    if unknown:
        raise DatasetError(f"{len(unknown)} records of '{name}' are not in {split_file}, e.g. "
                           f"{unknown[0]}; regenerate with `leukemia-core data splits {name}`")
    missing = sorted(set(split["relpath"]) - set(table["relpath"]))
    if missing and SPLIT_ALIASES.get(name) is None:
        raise DatasetError(f"{len(missing)} files of split {split_file} are missing from the "
                           f"data root, e.g. {missing[0]}; re-fetch with `leukemia-core data fetch {name}`")
    out = table[~table["relpath"].isin(excluded)].merge(
        split.rename(columns={"label": "split_label"}), on="relpath", how="left",
        validate="one_to_one")
    bad = out["split_label"] != out["label"]
    if bad.any():
        raise DatasetError(f"label of {out.loc[bad, 'relpath'].iloc[0]} differs from {split_file}")
    out = out.drop(columns="split_label")
    out.attrs.update(table.attrs, split_file=str(split_file), split_sha256=split_hash(name, splits_dir))
    return out
