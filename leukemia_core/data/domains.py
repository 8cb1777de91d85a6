"""The domain table for domain generalisation: one record table over several hospitals.

PBC (Barcelona), BCCD crops and Zheng Dataset 1 (Jiangxi) share the white-cell
classes; Matek (Munich) adds a neutrophil-only probe. Records keep their committed
split and gain a ``domain`` column. Files that repeat content across domains (the same
bytes under two names, as in repackagings such as TXL-PBC) are dropped from the later
domain before any cross-domain evaluation.
"""
from __future__ import annotations

import pandas as pd

from leukemia_core.data import load_dataset
from leukemia_core.data.splits import apply_split

#: Leave-one-domain-out domains -> loader name.
DOMAINS = {"pbc": "pbc", "bccd": "bccd_crops", "zheng": "zheng"}
#: The one-class probe: Matek neutrophils.
PROBE = {"matek": "matek"}
#: Classes every LODO domain has; macro-F1 is taken over these.
SHARED = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
#: What the models predict: the shared classes plus basophil (reported where present).
CLASSES = SHARED + ["basophil"]


def dedup_across(table: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first occurrence of each ``sha256`` by domain ``order``; return
    ``(kept, removed)`` where ``removed`` lists the later copies and the domain kept."""
    rank = table["domain"].map({d: i for i, d in enumerate(order)})
    t = table.assign(_rank=rank).sort_values(["_rank", "relpath"], kind="stable")
    first = t.drop_duplicates("sha256")[["sha256", "domain"]].rename(columns={"domain": "kept_in"})
    dup = t.duplicated("sha256", keep="first")
    cross = dup & (t["domain"] != t["sha256"].map(first.set_index("sha256")["kept_in"]))
    removed = t[cross].merge(first, on="sha256")[["domain", "relpath", "label", "sha256", "kept_in"]]
    kept = t[~cross].drop(columns="_rank").reset_index(drop=True)
    return kept, removed.reset_index(drop=True)


def load_domains(root=None, classes: list[str] = CLASSES, probe: bool = True
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All domains' records of ``classes`` with their committed split, deduplicated across
    domains by content (PBC first). Returns ``(table, removed)``."""
    names = {**DOMAINS, **(PROBE if probe else {})}
    parts = []
    for domain, loader in names.items():
        t = apply_split(load_dataset(loader, root))
        t = t[t["label"].isin(["neutrophil"] if domain in PROBE else classes)]
        parts.append(t.assign(domain=domain)[["path", "relpath", "label", "domain", "sha256", "split"]]
                     .assign(mask_path=t.get("mask_path")))
    table, removed = dedup_across(pd.concat(parts, ignore_index=True), list(names))
    return table, removed


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per domain (rows) and class (columns), with a share-of-largest-class column."""
    counts = table.groupby(["domain", "label"]).size().unstack(fill_value=0)
    counts = counts[[c for c in CLASSES if c in counts.columns]]
    shared = counts[SHARED].astype(float).where(counts[SHARED] > 0)
    counts["imbalance (max/min shared)"] = (shared.max(axis=1) / shared.min(axis=1)).where(shared.count(axis=1) > 1)
    return counts
