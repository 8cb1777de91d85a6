"""Committed splits: deterministic, stratified, deduplicated."""
import pandas as pd
import pytest

from leukemia_core.data import load_dataset
from leukemia_core.data.near_duplicates import clusters, crossing_clusters, near_duplicate_pairs
from leukemia_core.data.splits import (SPLIT_SPECS, apply_split, compute_split, make_split,
                                       read_near_duplicates, split_paths)
from leukemia_core.errors import DatasetError


def _toy():
    rows = []
    for c in "ab":
        for i in range(50):
            rows.append({"relpath": f"{c}/{i:03d}.jpg", "label": c, "sha256": f"{c}{i}"})
    rows.append({"relpath": "a/dup.jpg", "label": "a", "sha256": "a7"})       # same-class duplicate
    rows.append({"relpath": "b/cross.jpg", "label": "b", "sha256": "a3"})     # cross-class duplicate
    return pd.DataFrame(rows)


def test_toy_split_groups_duplicates_and_excludes_cross_class():
    split, excluded = make_split(_toy(), (0.6, 0.2, 0.2))
    assert set(excluded["relpath"]) == {"a/003.jpg", "b/cross.jpg"}
    s = split.set_index("relpath")["split"]
    assert s["a/dup.jpg"] == s["a/007.jpg"]
    assert split.groupby("label")["split"].value_counts().unstack().loc["b"].to_dict() == {
        "train": 30, "val": 10, "test": 10}
    again, _ = make_split(_toy().sample(frac=1, random_state=3), (0.6, 0.2, 0.2))
    assert split.equals(again)  # row order of the input does not matter


def test_group_column_keeps_groups_together():
    t = _toy().iloc[:100].assign(src=[f"img{i // 4}" for i in range(100)])
    split, _ = make_split(t, (0.6, 0.2, 0.2), group_col="src")
    merged = split.merge(t, on="relpath")
    assert (merged.groupby("src")["split"].nunique() == 1).all()


def test_near_duplicate_pairs_keep_each_cluster_in_one_split():
    pairs = pd.DataFrame({"a": ["a/000.jpg", "a/001.jpg", "b/010.jpg"], "b": ["a/001.jpg", "a/002.jpg", "b/011.jpg"]})
    split, _ = make_split(_toy(), (0.6, 0.2, 0.2), pairs=pairs)
    s = split.set_index("relpath")["split"]
    assert s["a/000.jpg"] == s["a/001.jpg"] == s["a/002.jpg"] and s["b/010.jpg"] == s["b/011.jpg"]
    assert crossing_clusters(split, pairs).empty
    moved = split.assign(split=split["split"].where(split["relpath"] != "a/002.jpg",
                                                    "test" if s["a/002.jpg"] != "test" else "train"))
    assert crossing_clusters(moved, pairs)[["a", "b"]].values.tolist() == [["a/001.jpg", "a/002.jpg"]]
    c = clusters(["a/000.jpg", "a/001.jpg", "a/002.jpg", "a/003.jpg"], pairs)
    assert c.tolist() == ["a/000.jpg"] * 3 + ["a/003.jpg"]


def _cell(rng):
    """A synthetic smear patch: a few dark blobs of random size and place on a light,
    noisy background (different draws are different 'cells')."""
    import numpy as np
    yy, xx = np.mgrid[:96, :96]
    img = 210 + rng.normal(0, 3, (96, 96, 3))
    for _ in range(rng.integers(2, 4)):
        cy, cx, r = rng.integers(20, 76), rng.integers(20, 76), rng.integers(12, 24)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2
        img[blob] = rng.integers(60, 140, 3) + rng.normal(0, 4, (blob.sum(), 3))
    return img.clip(0, 255).astype("uint8")


def test_near_duplicates_find_shifted_copies_not_other_cells(tmp_path):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        cell = _cell(rng)
        Image.fromarray(cell).save(tmp_path / f"c{k:02d}.jpg", quality=90)
        rows.append({"path": str(tmp_path / f"c{k:02d}.jpg"), "relpath": f"c{k:02d}.jpg"})
    original = np.asarray(Image.open(tmp_path / "c03.jpg"))
    Image.fromarray(np.roll(original, (3, -2), axis=(0, 1))).save(tmp_path / "copy.jpg", quality=70)
    rows.append({"path": str(tmp_path / "copy.jpg"), "relpath": "copy.jpg"})
    pairs = near_duplicate_pairs(pd.DataFrame(rows))
    assert pairs[["a", "b"]].values.tolist() == [["c03.jpg", "copy.jpg"]], pairs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("pbc", "aria") else n
                                  for n in sorted(SPLIT_SPECS)])
def test_committed_split_is_reproducible_and_leak_free(data_root, name):
    table = load_dataset(name, data_root)
    regenerated, excluded, pairs = compute_split(name, table)
    committed = pd.read_csv(split_paths(name)[0])
    assert committed.equals(regenerated), f"regenerating {name} changed its split"
    assert read_near_duplicates(name)[["a", "b"]].equals(pairs[["a", "b"]]), \
        f"regenerating {name}'s near-duplicate pairs changed them"
    crossing = crossing_clusters(committed, pairs)
    assert crossing.empty, f"near-duplicate pairs straddle splits:\n{crossing}"
    assert pd.read_csv(split_paths(name)[1])["relpath"].tolist() == excluded["relpath"].tolist()
    applied = apply_split(table, name)
    assert (applied.groupby("sha256")["split"].nunique() == 1).all(), "a content hash straddles splits"
    assert len(applied) + len(excluded) == len(table)


def test_pbc_split_is_70_10_20_per_class_and_lists_cross_class_pairs(data_root, pbc_table):
    applied = apply_split(pbc_table)
    frac = applied.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert frac["train"].between(0.69, 0.71).all()
    assert frac["val"].between(0.09, 0.11).all()
    assert frac["test"].between(0.19, 0.21).all()
    excluded = pd.read_csv(split_paths("pbc")[1])
    assert len(excluded) == 2 and excluded["sha256"].nunique() == 1 and excluded["label"].nunique() == 2


def test_split_mismatch_is_an_error(pbc_table):
    with pytest.raises(DatasetError, match="missing from the data root"):
        apply_split(pbc_table.iloc[:100])
    extra = pd.concat([pbc_table, pbc_table.iloc[:1].assign(relpath="PBC_dataset_normal_DIB/x/new.jpg")])
    extra.attrs = pbc_table.attrs
    with pytest.raises(DatasetError, match="not in .*pbc.csv"):
        apply_split(extra)


@pytest.mark.parametrize("name, a, b", [
    ("aria", "Early/WBC-Malignant-Early-228.jpg", "Early/WBC-Malignant-Early-229.jpg"),
    ("aria", "Benign/WBC-Benign-500.jpg", "Benign/WBC-Benign-501.jpg"),
    ("pbc", "PBC_dataset_normal_DIB/eosinophil/EO_246684.jpg", "PBC_dataset_normal_DIB/eosinophil/EO_409717.jpg"),
    ("bccd_crops", "BCCD_cropped/Neutrophil/BloodImage_00205_1.jpg", "BCCD_cropped/Neutrophil/BloodImage_00276_1.jpg"),
])
def test_known_copies_share_a_split(name, a, b):
    """Copies found by reading the data (same field / same cell, shifted): one cluster, one split."""
    pairs = read_near_duplicates(name)
    assert ((pairs["a"] == a) & (pairs["b"] == b)).any(), f"{a} / {b} not found as near duplicates"
    s = pd.read_csv(split_paths(name)[0]).set_index("relpath")["split"]
    assert s[a] == s[b]


def test_wbcatt_copies_never_cross_its_splits(data_root):
    w = load_dataset("wbcatt", data_root, hashes=True)
    assert (w.groupby("sha256")["wbcatt_split"].nunique() == 1).all(), "an exact copy straddles WBCAtt splits"
    s = w.rename(columns={"wbcatt_split": "split"})[["relpath", "split"]]
    assert crossing_clusters(s, read_near_duplicates("pbc")).empty
    dropped = w.attrs["cross_split_copies"]
    assert len(dropped) >= 5 and set(dropped["wbcatt_split"]) <= {"train", "val"}
    assert not set(dropped["relpath"]) & set(w["relpath"])
