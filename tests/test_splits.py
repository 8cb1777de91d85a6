"""Committed splits: deterministic, stratified, deduplicated."""
import pandas as pd
import pytest

from leukemia_core.data import load_dataset
from leukemia_core.data.splits import SPLIT_SPECS, apply_split, make_split, split_paths
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


@pytest.mark.parametrize("name", sorted(SPLIT_SPECS))
def test_committed_split_is_reproducible_and_leak_free(data_root, name):
    table = load_dataset(name, data_root)
    regenerated, excluded = make_split(table, *SPLIT_SPECS[name])
    committed = pd.read_csv(split_paths(name)[0])
    assert committed.equals(regenerated), f"regenerating {name} changed its split"
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
