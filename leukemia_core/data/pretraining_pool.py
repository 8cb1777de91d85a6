"""The unlabelled pretraining pool (issue 19): the images a self-supervised encoder (FCMAE)
may learn from without ever seeing an image the book evaluates on.

The pool is every image of the **training split** of the single-cell datasets in
:data:`POOL_DATASETS`, minus

- every image whose bytes (SHA-256) equal a validation or test image of *any* dataset in
  :data:`EVALUATED` (the book evaluates on all of them, in one chapter or another);
- every image in a near-duplicate cluster (:mod:`.near_duplicates`, single-cell threshold)
  that holds such an image: copies across datasets are what per-dataset splits cannot see;
- repeated copies inside the pool (one image per cluster is kept, the smallest relpath).

BCCD crops are evaluated on (the domain-generalisation chapter) but not pooled: they are
cut from BCCD fields whose detection split is not theirs, so a crop of a detection test
field could otherwise enter. WBCAtt's images are PBC's (its split is PBC's).

The pool is committed as ``splits/pretraining_pool.csv`` (``dataset, relpath, sha256``)
with the counts of what was removed in ``splits/pretraining_pool_report.csv``; a test keeps
it consistent with the committed splits.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from leukemia_core.data.splits import SPLITS_DIR, apply_split

POOL_DATASETS = ("pbc", "matek", "aria", "zheng")
EVALUATED = ("pbc", "matek", "aria", "zheng", "bccd_crops")
POOL_FILE = SPLITS_DIR / "pretraining_pool.csv"
REPORT_FILE = SPLITS_DIR / "pretraining_pool_report.csv"
def compute_pool(root=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pool, report)`` from the data root's datasets and their committed splits (see
    :func:`select_pool`)."""
    from leukemia_core.data import load_dataset
    from leukemia_core.data.near_duplicates import NearDupConfig
    from leukemia_core.data.splits import NEAR_DUP_MIN_CORR

    names = list(dict.fromkeys(POOL_DATASETS + EVALUATED))
    default = NearDupConfig().min_corr
    return select_pool({d: apply_split(load_dataset(d, root)) for d in names},
                       {d: NEAR_DUP_MIN_CORR.get(d, default) for d in names})


def select_pool(tables: dict[str, pd.DataFrame], threshold: dict[str, float],
                pooled=POOL_DATASETS, evaluated=EVALUATED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pool, report)``: the ``pooled`` datasets' training rows that survive the rules of
    the module docstring against the val/test rows of the ``evaluated`` ones (``tables``:
    records with the committed ``split``), and per dataset how many each rule removed. A
    pair of images is a near copy at the lower of its two datasets' thresholds."""
    from leukemia_core.data.near_duplicates import NearDupConfig, clusters, near_duplicate_pairs

    tables = {d: t.assign(key=d + ":" + t["relpath"]) for d, t in tables.items()}  # relpaths: unique per dataset
    train = pd.concat([tables[d][tables[d]["split"] == "train"] for d in pooled], ignore_index=True)
    held = pd.concat([tables[d][tables[d]["split"] != "train"] for d in evaluated], ignore_index=True)
    exact = train["sha256"].isin(set(held["sha256"]))
    both = pd.concat([train, held], ignore_index=True)
    pairs = near_duplicate_pairs(both.assign(relpath=both["key"]), NearDupConfig(min_corr=min(threshold.values())))
    lower = [min(threshold[a.split(":", 1)[0]], threshold[b.split(":", 1)[0]]) for a, b in zip(pairs["a"], pairs["b"])]
    pairs = pairs[pairs["correlation"] >= pd.Series(lower, index=pairs.index, dtype=float)]
    cluster = clusters(both["key"], pairs)
    tainted = set(cluster[cluster.index.isin(set(held["key"]))])  # clusters holding an evaluated image
    near = ~exact & train["key"].map(cluster).isin(tainted)
    kept = train[~exact & ~near].copy()
    kept["cluster"] = kept["key"].map(cluster)
    kept = kept.sort_values("key")
    repeat = kept.duplicated("cluster") | kept.duplicated("sha256")
    pool = kept[~repeat]
    count = lambda rows: rows.groupby("dataset").size()  # noqa: E731
    report = pd.DataFrame({
        "training images": count(train),
        "removed: same bytes as a val/test image": count(train[exact]),
        "removed: near copy of a val/test image": count(train[near]),
        "removed: repeated inside the pool": count(kept[repeat]),
        "in the pool": count(pool),
    }).reindex(list(pooled)).fillna(0).astype(int)
    return pool[["dataset", "relpath", "sha256", "path"]].reset_index(drop=True), report


def write_pool(root=None, splits_dir: Path = SPLITS_DIR) -> tuple[Path, Path]:
    pool, report = compute_pool(root)
    pool_file, report_file = splits_dir / POOL_FILE.name, splits_dir / REPORT_FILE.name
    pool.drop(columns="path").sort_values(["dataset", "relpath"]).to_csv(pool_file, index=False,
                                                                          lineterminator="\n")
    report.rename_axis("dataset").to_csv(report_file, lineterminator="\n")
    return pool_file, report_file


def load_pool(root=None, splits_dir: Path = SPLITS_DIR) -> pd.DataFrame:
    """The committed pool joined to the data root's records (``path`` filled in); a pooled
    image missing from the mirror, or whose bytes changed, is an error naming it."""
    from leukemia_core.data import load_dataset
    from leukemia_core.errors import DatasetError

    committed = pd.read_csv(splits_dir / POOL_FILE.name)
    parts = []
    for d, rows in committed.groupby("dataset", sort=False):
        t = load_dataset(d, root)[["relpath", "sha256", "path"]]
        merged = rows.merge(t, on="relpath", how="left", suffixes=("", "_now"))
        bad = merged[merged["path"].isna() | (merged["sha256"] != merged["sha256_now"])]
        if len(bad):
            raise DatasetError(f"{len(bad)} pooled {d} image(s) are missing or changed in the data root "
                               f"(first: {bad['relpath'].iloc[0]}); fetch the dataset again or regenerate the "
                               "pool with `leukemia-core data pool`")
        parts.append(merged.drop(columns="sha256_now"))
    return pd.concat(parts, ignore_index=True)
