"""The unlabelled pretraining pool holds training images only, never an exact or near
copy of an image any chapter evaluates on, and keeps one image per copy cluster."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukemia_core.data.pretraining_pool import POOL_DATASETS, POOL_FILE, REPORT_FILE, select_pool
from leukemia_core.data.splits import split_paths


def _cells(tmp_path, n=6, size=64, seed=0):
    """Distinct textured images (random blobs), one array each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((size + 8, size + 8, 3), np.float32)
        for _ in range(12):
            y, x = rng.integers(0, size + 8, 2)
            r = rng.integers(3, 10)
            yy, xx = np.ogrid[:size + 8, :size + 8]
            img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.uniform(0, 255, 3)
        out.append(img)
    return out


def _table(tmp_path, dataset, rows):
    """Records (path, relpath, sha256, split, dataset) for ``(name, array, split)`` rows."""
    recs = []
    for name, arr, split in rows:
        p = tmp_path / dataset / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(p)
        recs.append({"path": str(p), "relpath": f"{name}.png", "dataset": dataset, "split": split,
                     "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    return pd.DataFrame(recs)


def test_exact_and_near_copies_of_evaluated_images_and_repeats_are_removed(tmp_path):
    c = _cells(tmp_path)
    crop = lambda a, dy=0, dx=0: a[4 + dy:68 + dy, 4 + dx:68 + dx]  # noqa: E731
    a = _table(tmp_path, "a", [("same_bytes", crop(c[0]), "train"), ("near", crop(c[1], 1, 0), "train"),
                                ("kept", crop(c[2]), "train"), ("twin1", crop(c[3]), "train"),
                                ("twin2", crop(c[3]), "train"), ("a_test", crop(c[4]), "test")])
    b = _table(tmp_path, "b", [("b_val", crop(c[0]), "val"), ("b_test", crop(c[1]), "test"),
                                ("b_train", crop(c[5]), "train")])
    pool, report = select_pool({"a": a, "b": b}, {"a": 0.85, "b": 0.85}, pooled=("a", "b"), evaluated=("a", "b"))
    assert sorted(pool["dataset"] + ":" + pool["relpath"]) == ["a:kept.png", "a:twin1.png", "b:b_train.png"]
    assert report.loc["a"].tolist() == [5, 1, 1, 1, 2] and report.loc["b"].tolist() == [1, 0, 0, 0, 1]
    # a dataset that is pooled but not evaluated on does not protect its own test images
    pool, _ = select_pool({"a": a, "b": b}, {"a": 0.85, "b": 0.85}, pooled=("a",), evaluated=("b",))
    assert "a_test.png" not in set(pool["relpath"]) and "same_bytes.png" not in set(pool["relpath"])


def test_committed_pool_is_training_images_only_and_its_report_adds_up():
    pool = pd.read_csv(POOL_FILE)
    report = pd.read_csv(REPORT_FILE, index_col="dataset")
    assert not pool.duplicated(["dataset", "relpath"]).any() and not pool["sha256"].duplicated().any()
    for d in POOL_DATASETS:
        split = pd.read_csv(split_paths(d)[0]).set_index("relpath")["split"]
        rel = pool.loc[pool["dataset"] == d, "relpath"]
        assert rel.isin(split.index).all() and (split[rel] == "train").all(), d
        r = report.loc[d]
        assert r["in the pool"] == len(rel) == r["training images"] - r.iloc[1:4].sum()
        assert r["training images"] == (split == "train").sum()


@pytest.mark.slow
def test_committed_pool_reproduces_from_the_mirror(data_root):
    from leukemia_core.data.pretraining_pool import compute_pool, load_pool

    pool, report = compute_pool(data_root)
    committed = pd.read_csv(POOL_FILE)
    assert pool.drop(columns="path").sort_values(["dataset", "relpath"]).reset_index(drop=True).equals(committed)
    assert report.equals(pd.read_csv(REPORT_FILE, index_col="dataset").rename_axis(None))
    assert len(load_pool(data_root)) == len(committed)
