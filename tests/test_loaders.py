"""Loaders on the real mirror: counts from the datasets' own documentation."""
import shutil
import warnings

import pandas as pd
import pytest
from PIL import Image

from leukemia_core.data import LOADERS, RECORD_COLUMNS, load_dataset
from leukemia_core.data.fetch import read_sums
from leukemia_core.errors import DatasetError


def test_every_loader_returns_the_uniform_table(data_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in LOADERS:
            t = load_dataset(name, data_root)
            assert list(t.columns[:6]) == RECORD_COLUMNS, name
            assert t["sha256"].str.fullmatch("[0-9a-f]{64}").all(), name
            assert t["relpath"].is_unique, name
            assert (t["dataset"] == name).all()


def test_sha256_matches_the_mirror_checksums(data_root, pbc_table):
    sums = read_sums(data_root / "SHA256SUMS")
    for _, row in pbc_table.sample(20, random_state=0).iterrows():
        assert sums["pbc/" + row.relpath] == row.sha256


def test_pbc_classes_and_sublabels(pbc_table):
    counts = pbc_table["label"].value_counts().to_dict()
    assert counts == {"neutrophil": 3329, "eosinophil": 3117, "ig": 2895, "platelet": 2348,
                      "erythroblast": 1551, "monocyte": 1420, "basophil": 1218, "lymphocyte": 1214}
    sub = pbc_table.groupby("label")["sublabel"].apply(lambda s: set(s.dropna()))
    assert sub["neutrophil"] == {"SNE", "BNE", "NEUTROPHIL"}
    assert sub["ig"] == {"IG", "MMY", "MY", "PMY"}
    assert sub["lymphocyte"] == set()
    assert (pbc_table["sublabel"] == "SNE").sum() == 1646


def test_wbcatt_joins_onto_pbc(data_root):
    t = load_dataset("wbcatt", data_root)
    dropped = t.attrs["cross_split_copies"]  # copies of one cell across WBCAtt's splits
    assert len(dropped) == 6 and set(dropped["wbcatt_split"]) == {"train", "val"}
    published = {"train": 6169, "test": 3099, "val": 1030}
    assert len(t) + len(dropped) == sum(published.values())
    kept = {s: n - int((dropped["wbcatt_split"] == s).sum()) for s, n in published.items()}
    assert t["wbcatt_split"].value_counts().to_dict() == kept and kept["test"] == 3099
    assert set(t["label"]) == {"neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"}
    row = t.set_index("relpath").loc["PBC_dataset_normal_DIB/neutrophil/BNE_7323.jpg"]
    assert (row.cell_size, row.nucleus_shape, row.granule_colour) == ("big", "unsegmented-band", "pink")
    re = load_dataset("wbcatt", data_root, reannotated=True)
    reannotated = set(pd.read_csv(data_root / "wbcatt" / "pbc_attr_reannotations.csv")["path"])
    assert len(reannotated) == 1000
    assert re["reannotated"].sum() == len(reannotated - set(dropped["relpath"]))
    changed = (re.set_index("relpath")["cell_size"] != t.set_index("relpath")["cell_size"]).sum()
    assert changed > 0


def test_bccd_boxes_splits_and_subtypes(data_root):
    with pytest.warns(UserWarning, match="rows of labels.csv have no image"):
        t = load_dataset("bccd", data_root)
    assert len(t) == 364
    labels = pd.Series([l for ls in t["box_labels"] for l in ls]).value_counts().to_dict()
    assert labels == {"RBC": 4155, "WBC": 372, "Platelets": 361}
    assert t["split"].value_counts().to_dict() == {"train": 205, "val": 87, "test": 72}
    # never guessed: blank and multi-class rows have no label, same-class rows do
    assert t.loc[t.subtype_status.isin(["blank", "multi_class"]), "label"].isna().all()
    assert t.loc[t.subtype_status.isin(["single", "same_class_cells"]), "label"].notna().all()
    row = t.set_index("relpath").loc["BCCD/JPEGImages/BloodImage_00010.jpg"]
    assert row.subtype_status == "multi_class" and row.subtypes == ["neutrophil", "eosinophil"]
    assert len(t.attrs["labels_without_image"]) == 411 - 364
    box = t.set_index("relpath").loc["BCCD/JPEGImages/BloodImage_00000.jpg", "boxes"][0]
    assert box == [260.0, 177.0, 491.0, 376.0]


def test_bccd_crops_matek_aria_zheng(data_root):
    crops = load_dataset("bccd_crops", data_root)
    assert crops["label"].value_counts().to_dict() == {
        "neutrophil": 207, "eosinophil": 88, "lymphocyte": 33, "monocyte": 20, "basophil": 3}
    assert load_dataset("matek", data_root)["label"].value_counts().to_dict() == {
        "myeloblast": 1000, "neutrophil": 1000}
    assert load_dataset("aria", data_root)["label"].value_counts().to_dict() == {
        "early_pre_b": 985, "pre_b": 963, "pro_b": 804, "benign": 504}
    z = load_dataset("zheng", data_root)
    assert len(z) == 300 and z["mask_path"].str.endswith(".png").all()
    import numpy as np
    assert set(np.unique(np.asarray(Image.open(z["mask_path"].iloc[0])))) <= {0, 128, 255}


def test_txl_domains_and_boxes(data_root):
    t = load_dataset("txl_pbc", data_root)
    assert t["split"].value_counts().to_dict() == {"train": 1008, "val": 288, "test": 144}
    assert t["domain"].value_counts().to_dict() == {"raabin": 500, "pbc": 500, "bccd": 221, "bcd": 219}
    pbc = t[t.domain == "pbc"]
    assert pbc["source_path"].str.startswith("PBC_dataset_normal_DIB/").all()
    for _, r in t.head(50).iterrows():
        for x0, y0, x1, y1 in r.boxes:
            assert -1 <= x0 < x1 <= r.width + 1 and -1 <= y0 < y1 <= r.height + 1


def test_loaders_are_resolution_agnostic(data_root, tmp_path):
    """TXL-PBC upscaled back to about its original size gives the same table."""
    src = load_dataset("txl_pbc", data_root)
    pick = pd.concat([g.head(4) for _, g in src.groupby("domain")])
    scale = 1 / 0.6
    root = tmp_path / "txl_pbc"
    shutil.copy(data_root / "txl_pbc/source_map.csv", tmp_path / "source_map.csv")
    for split in ("train", "val", "test"):
        (root / "TXL_PBC/images" / split).mkdir(parents=True)
        (root / "TXL_PBC/labels" / split).mkdir(parents=True)
    shutil.move(tmp_path / "source_map.csv", root / "source_map.csv")
    for _, r in pick.iterrows():
        dst = root / r.relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(r.path) as im:
            im.resize((round(im.width * scale), round(im.height * scale))).save(dst)
        lab = data_root / "txl_pbc" / r.relpath.replace("images/", "labels/").rsplit(".", 1)[0]
        lab_dst = root / r.relpath.replace("images/", "labels/").rsplit(".", 1)[0]
        lab_dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(str(lab) + ".txt", str(lab_dst) + ".txt")
    big = load_dataset("txl_pbc", tmp_path).set_index("relpath")
    small = pick.set_index("relpath")
    assert (big["domain"] == small.loc[big.index, "domain"]).all()
    assert (big["width"] > small.loc[big.index, "width"] * 1.5).all()
    b0, s0 = big.iloc[0].boxes[0], small.loc[big.index[0]].boxes[0]
    assert b0[2] == pytest.approx(s0[2] * big.iloc[0].width / small.loc[big.index[0]].width, rel=1e-6)


def test_unknown_class_folder_is_an_error(tmp_path):
    (tmp_path / "all_aria/Benign").mkdir(parents=True)
    (tmp_path / "all_aria/Mystery").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "all_aria/Benign/a.jpg")
    with pytest.raises(DatasetError, match="unknown class folder .*Mystery"):
        load_dataset("aria", tmp_path)


def test_txl_domains_without_source_map(data_root, tmp_path):
    root = tmp_path / "txl_pbc"
    root.mkdir()
    (root / "TXL_PBC").symlink_to(data_root / "txl_pbc/TXL_PBC", target_is_directory=True)
    with pytest.warns(UserWarning, match="source_map.csv is missing"):
        inferred = load_dataset("txl_pbc", tmp_path, hashes=False)
    mapped = load_dataset("txl_pbc", data_root, hashes=False)
    assert (inferred["domain"] == mapped["domain"]).all()
    assert inferred["source_path"].isna().all()
