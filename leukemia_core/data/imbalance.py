"""Imposing a published class imbalance on the training split only.

Raabin-WBC, the data set of the R3GAN/ConvNeXtV2–Swin paper, is not public in a form
this book can mirror, so that chapter runs on PBC with Raabin-WBC's class ratios
imposed on PBC's *training* split. Validation and test keep their committed, natural
class balance: the imbalance is what the model learns from, never what it is judged on.
"""
from __future__ import annotations

import hashlib

import pandas as pd

from leukemia_core.errors import LeukemiaError

#: Raabin-WBC training-set class sizes relative to neutrophils (Kouzehkanan et al. 2022).
RAABIN_RATIOS = {"neutrophil": 1.0, "lymphocyte": 0.406, "monocyte": 0.0894,
                 "eosinophil": 0.120, "basophil": 0.0339}


def imbalanced_train(table: pd.DataFrame, ratios: dict[str, float] = RAABIN_RATIOS,
                     seed: int = 0) -> pd.DataFrame:
    """Keep every val/test row; subsample the train rows so that class sizes follow
    ``ratios`` (relative to the largest-ratio class) as closely as the data allows.

    The reference class size is the largest for which every class still has enough
    training images. Selection is deterministic in ``seed``; the result's
    ``attrs['imbalance']`` records the ratios, counts and a hash of the kept paths.
    """
    for col in ("relpath", "label", "split"):
        if col not in table.columns:
            raise LeukemiaError(f"imbalanced_train needs a '{col}' column (a table with committed splits)")
    unknown = set(ratios) - set(table["label"])
    if unknown:
        raise LeukemiaError(f"classes {sorted(unknown)} in the ratios are not in the table "
                            f"(its classes: {sorted(table['label'].unique())})")
    train = table[(table["split"] == "train") & table["label"].isin(ratios)]
    available = train.groupby("label").size()
    top = max(ratios.values())
    rel = {c: r / top for c, r in ratios.items()}
    reference = min(available[c] / rel[c] for c in ratios)  # largest feasible reference size
    target = {c: max(1, round(reference * rel[c])) for c in ratios}
    kept = pd.concat([g.sample(target[c], random_state=seed) for c, g in train.groupby("label")])
    rest = table[(table["split"] != "train") & table["label"].isin(ratios)]
    out = pd.concat([kept, rest]).sort_values(["split", "relpath"]).reset_index(drop=True)
    out.attrs = dict(table.attrs)
    digest = hashlib.sha256("\n".join(sorted(kept["relpath"])).encode()).hexdigest()
    out.attrs["imbalance"] = {"ratios": dict(ratios), "seed": seed, "train_counts": target,
                              "train_relpaths_sha256": digest}
    return out
