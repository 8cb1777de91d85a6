"""check_data_root and find_duplicates on a small copy of real files and on the mirror."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from leukemia_core.data import load_dataset
from leukemia_core.data.check import check_data_root, find_duplicates
from leukemia_core.data.fetch import read_sums
from leukemia_core.data.pbc import CLASSES as PBC_CLASSES

from conftest import real_root

PBC = "pbc/PBC_dataset_normal_DIB"


MIRROR = real_root()  # conftest puts ../shared/datasets in LEUKEMIA_DATA
pytestmark = pytest.mark.skipif(
    MIRROR is None, reason="data mirror not found (set LEUKEMIA_DATA or put it at "
                           "../shared/datasets): these tests check real dataset files")


@pytest.fixture
def small_root(tmp_path) -> Path:
    """Zheng (all 300 cells) + 3 PBC images per class, with their SHA256SUMS lines."""
    sums = read_sums(MIRROR / "SHA256SUMS")
    keep = {p for p in sums if p.startswith("zheng_wbc/")}
    for cls in PBC_CLASSES:
        keep |= set(sorted(p for p in sums if p.startswith(f"{PBC}/{cls}/"))[:3])
    for p in keep:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MIRROR / p, tmp_path / p)  # copyfile: writable copies
    (tmp_path / "SHA256SUMS").write_text("".join(f"{sums[p]}  {p}\n" for p in sorted(keep)))
    return tmp_path


def first_pbc(root: Path, cls: str) -> Path:
    return sorted((root / PBC / cls).iterdir())[0]


def test_check_passes_on_clean_copy(small_root):
    report = check_data_root(small_root)
    assert report.ok, report.summary()
    assert report.datasets == ["pbc", "zheng"]  # only the folders present
    assert report.counts == {"pbc": 24, "zheng": 300}
    assert report.n_files == 24 + 300 + 300  # Zheng masks are decoded too
    assert report.n_checksummed == 24 + 603
    assert not (report.checksum_failures or report.missing or report.undecodable)
    # Zheng ships one exact duplicate pair (both lymphocytes): reported, not a failure.
    dup = report.duplicates
    assert sorted(dup["relpath"]) == ["Dataset 1/112.bmp", "Dataset 1/139.bmp"]
    assert not dup["cross_class"].any() and not dup["cross_dataset"].any()
    text = report.summary()
    assert "OK" in text and "1 groups" in text and "0 across classes" in text


def test_truncated_image_is_named(small_root):
    (small_root / "SHA256SUMS").unlink()  # decoding alone must catch it
    victim = first_pbc(small_root, "monocyte")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    report = check_data_root(small_root, ["pbc"])
    assert not report.ok
    assert [p for p, _ in report.undecodable] == [str(victim)]
    assert "truncated" in report.undecodable[0][1]
    assert str(victim) in report.summary() and "PROBLEMS FOUND" in report.summary()


def test_changed_and_missing_files_fail_checksums(small_root):
    changed, gone = first_pbc(small_root, "basophil"), first_pbc(small_root, "platelet")
    changed.write_bytes(changed.read_bytes() + b"\0")  # still decodes
    gone.unlink()
    report = check_data_root(small_root, ["pbc"])
    assert not report.ok and not report.undecodable
    assert [r for r, _ in report.checksum_failures] == [changed.relative_to(small_root).as_posix()]
    assert report.missing == [gone.relative_to(small_root).as_posix()]
    assert report.n_checksummed == 24 - 1  # zheng's lines are not checked for ["pbc"]


def test_cross_class_copy_is_reported(small_root):
    src = first_pbc(small_root, "neutrophil")
    copy = small_root / PBC / "eosinophil" / "EO_copy.jpg"
    shutil.copyfile(src, copy)
    report = check_data_root(small_root, ["pbc"])
    assert report.ok  # duplicates alone are not failures
    dup = report.duplicates
    assert set(dup["relpath"]) == {src.relative_to(small_root / "pbc").as_posix(),
                                   "PBC_dataset_normal_DIB/eosinophil/EO_copy.jpg"}
    assert dup["cross_class"].all() and not dup["cross_dataset"].any()
    assert set(dup["label"]) == {"neutrophil", "eosinophil"} and (dup["group_size"] == 2).all()
    assert "1 across classes" in report.summary() and "EO_copy.jpg" in report.summary()


def test_find_duplicates_across_datasets():
    a = pd.DataFrame({"path": ["/a/1", "/a/2", "/a/3"], "relpath": ["1", "2", "3"],
                      "label": ["x", "x", "y"], "sha256": ["h1", "h2", "h3"]})
    b = pd.DataFrame({"path": ["/b/9", "/a/2"], "relpath": ["9", "2"],
                      "label": [None, "x"], "sha256": ["h1", "h2"]})
    dup = find_duplicates({"a": a, "b": b})
    assert list(dup.columns) == ["sha256", "dataset", "relpath", "label", "group_size",
                                 "cross_dataset", "cross_class"]
    # h1: same content in two datasets; /a/2 listed twice is one file, not a duplicate.
    assert list(zip(dup["dataset"], dup["relpath"])) == [("a", "1"), ("b", "9")]
    assert dup["cross_dataset"].all() and not dup["cross_class"].any()
    assert find_duplicates({"a": a}).empty


def test_real_pbc_duplicates():
    """The mirror README: 'PBC contains a few exact duplicate files, one across classes'."""
    dup = find_duplicates({"pbc": load_dataset("pbc", MIRROR)})
    groups = dup.groupby("sha256")
    assert len(dup) == 34 and groups.ngroups == 17 and (dup["group_size"] == 2).all()
    cross = dup[dup["cross_class"]]
    assert sorted(cross["relpath"]) == [f"{PBC[4:]}/eosinophil/EO_225902.jpg",
                                        f"{PBC[4:]}/neutrophil/BNE_191112.jpg"]
    same = dup[~dup["cross_class"]].groupby("label")["sha256"].nunique().to_dict()
    assert same == {"basophil": 6, "eosinophil": 6, "ig": 3, "monocyte": 1}
    assert not dup["cross_dataset"].any()


def test_real_mirror_subset_check():
    report = check_data_root(MIRROR, ["zheng", "bccd_crops"])
    assert report.ok, report.summary()
    assert report.counts == {"zheng": 300, "bccd_crops": 351}
    assert report.n_checksummed == 603 + 351  # only these folders' SHA256SUMS lines
    assert report.duplicates["cross_dataset"].sum() == 0
