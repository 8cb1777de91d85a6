"""Detection chapter: box checks, sparse-annotation simulator, masked FCOS loss,
pseudo-labels, model shapes, the detect CLI, and loading the real data."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukemia_core.data import load_dataset
from leukemia_core.detection.data import (CLASSES, BoxDataset, check_box, link_wbcatt, read_voc_checked,
                                          read_yolo_checked)
from leukemia_core.detection.model import WBCDetector
from leukemia_core.detection.sparse import (centres_inside, location_weights, regime_targets, select_pseudo,
                                            sparsify)
from leukemia_core.errors import DatasetError, LeukemiaError

torch.set_num_threads(1)

VOC = """<annotation>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  <object>
    <name>WBC</name>
    <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>40</ymax></bndbox>
  </object>
  <object>
    <name>{name}</name>
    <bndbox><xmin>{x0}</xmin><ymin>20</ymin><xmax>{x1}</xmax><ymax>30</ymax></bndbox>
  </object>
</annotation>
"""


# ----------------------------------------------------------------------------- box checks
@pytest.mark.parametrize("name,x0,x1,what", [("RBC", 20, 20, "zero-area"), ("RBC", 60, 140, "outside"),
                                             ("Neutrophil", 20, 30, "unknown class")])
def test_voc_bad_box_names_file_and_line(tmp_path, name, x0, x1, what):
    xml = tmp_path / "img.xml"
    xml.write_text(VOC.format(name=name, x0=x0, x1=x1))
    with pytest.raises(DatasetError, match=rf"img\.xml line 7: {what}" if what != "outside"
                       else r"img\.xml line 7: box .* outside"):
        read_voc_checked(xml)


def test_voc_allow_list_reports_instead_of_dropping(tmp_path):
    xml = tmp_path / "img.xml"
    xml.write_text(VOC.format(name="RBC", x0=20, x1=20))
    ann = read_voc_checked(xml, "A/img.xml", allow=[("A/img.xml", 7)])
    assert ann["labels"] == [0] and len(ann["excluded"]) == 1
    assert ann["excluded"][0]["line"] == 7 and "zero-area" in ann["excluded"][0]["reason"]
    with pytest.raises(DatasetError, match="line 7"):  # an allow entry for another line does not help
        read_voc_checked(xml, "A/img.xml", allow=[("A/img.xml", 3)])


@pytest.mark.parametrize("line,what", [("1 0.5 0.5 0 0.2", "zero-area"), ("0 0.95 0.5 0.3 0.2", "outside"),
                                       ("7 0.5 0.5 0.2 0.2", "unknown class")])
def test_yolo_bad_line_names_file_and_line(tmp_path, line, what):
    txt = tmp_path / "a.txt"
    txt.write_text(f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(DatasetError, match=rf"a\.txt line 3: .*{what}"):
        read_yolo_checked(txt, 100, 100)


def test_valid_boxes_pass():
    assert check_box([0, 0, 100, 80], "Platelets", 100, 80, "x") == CLASSES.index("Platelets")


# ----------------------------------------------------------------------------- sparse simulator
def _table(n=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        xy = rng.uniform(0, 200, size=(40, 2))  # centres uniform over the image
        boxes = np.concatenate([xy - 4, xy + 4], 1).clip(0, 200).tolist()
        rows.append({"path": f"x{i}.jpg", "width": 200, "height": 200, "boxes": boxes,
                     "labels": rng.integers(0, 3, 40).tolist()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_sparsify_keeps_only_boxes_inside_the_patch(fraction):
    table = _table()
    sp = sparsify(table, fraction, seed=1)
    for r, full in zip(sp.itertuples(), table.itertuples()):
        x0, y0, x1, y1 = r.patch
        assert (x1 - x0) * (y1 - y0) == pytest.approx(fraction * r.width * r.height)
        assert 0 <= x0 and x1 <= r.width and 0 <= y0 and y1 <= r.height
        inside = centres_inside(torch.tensor(full.boxes), torch.tensor(r.patch))
        assert len(r.boxes) == int(inside.sum()) == len(r.labels)
        for b in r.boxes:
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            assert x0 <= cx < x1 and y0 <= cy < y1
    kept = sum(len(b) for b in sp["boxes"]) / sum(len(b) for b in table["boxes"])
    assert abs(kept - fraction) < 0.1  # uniform boxes: the kept share follows the area
    assert sparsify(table, fraction, seed=1)["patch"].tolist() == sp["patch"].tolist()


def test_location_weights():
    anchors = torch.tensor([[0, 0, 8, 8], [40, 40, 48, 48], [90, 90, 98, 98.]])
    w = location_weights([anchors], [torch.tensor([30, 30, 60, 60.])], 0.1)
    assert w.tolist() == [[pytest.approx(0.1), 1.0, pytest.approx(0.1)]]


# ----------------------------------------------------------------------------- masked loss
def _tiny_model(**kw):
    torch.manual_seed(0)
    return WBCDetector(attributes={"size": 2, "shape": 3}, short_side=64, fpn_channels=32, pretrained=False, **kw)


def _loss_and_grad(model, images, targets, weights_fn, perturb_outside):
    """Loss and head gradients when the head's outputs at outside locations are changed."""
    head = model.fcos.head
    orig = head.forward

    def forward(x):
        out = orig(x)
        if perturb_outside is not None:
            out = {k: torch.where(perturb_outside[..., None], v + 3.0 * torch.randn_like(v), v)
                   for k, v in out.items()}
        return out
    head.forward = forward
    model.zero_grad()
    loss = sum(model(images, targets, weights_fn=weights_fn).values())
    loss.backward()
    head.forward = orig
    grads = [p.grad.clone() for p in model.fcos.head.parameters() if p.grad is not None]
    return loss.item(), grads


def test_masked_loss_ignores_outside_locations():
    from leukemia_core.detection.train import _weights_fn

    model = _tiny_model().train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    patch = torch.tensor([0, 0, 32, 32.])
    targets = [{"boxes": torch.tensor([[4, 4, 28, 28.]]), "labels": torch.tensor([0]), "patch": patch}] * 2
    fn = _weights_fn("masked", 0.0)
    # which locations lie outside the patch (anchor centres)
    image_list, feats, _ = model.features(images)
    anchors = model.fcos.anchor_generator(image_list, list(feats.values()))
    outside = torch.stack([~centres_inside(a, patch) for a in anchors])
    assert outside.any() and (~outside).any()
    loss0, g0 = _loss_and_grad(model, images, targets, fn, None)
    torch.manual_seed(1)
    loss1, g1 = _loss_and_grad(model, images, targets, fn, outside)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # without the mask the same perturbation changes the loss (the test can fail)
    loss2, _ = _loss_and_grad(model, images, targets, None, None)
    torch.manual_seed(1)
    loss3, _ = _loss_and_grad(model, images, targets, None, outside)
    assert abs(loss3 - loss2) > 1e-3
    # with outside weight 0.1 the outside negatives count, but less than unmasked
    loss4, _ = _loss_and_grad(model, images, targets, _weights_fn("masked", 0.1), None)
    assert loss0 < loss4 < loss2


def test_pseudo_labels_use_conf_and_nms_thresholds():
    patch = torch.tensor([0, 0, 50, 50.])
    boxes = torch.tensor([[60, 60, 80, 80], [61, 61, 81, 81],  # IoU ~0.9: one survives NMS
                          [100, 60, 120, 80],  # score 0.49 < 0.5: dropped
                          [60, 100, 80, 120], [66, 100, 86, 120],  # IoU 0.54 > 0.2: one survives
                          [10, 10, 30, 30.]])  # inside the patch: not a pseudo-label
    scores = torch.tensor([0.9, 0.8, 0.49, 0.7, 0.6, 0.95])
    labels = torch.tensor([1, 1, 2, 0, 1, 1])
    b, lab = select_pseudo(boxes, scores, labels, patch)
    assert b.tolist() == [[60, 60, 80, 80], [60, 100, 80, 120]] and lab.tolist() == [1, 0]
    b, _ = select_pseudo(boxes, scores, labels, patch, conf=0.4, iou=0.6)
    assert len(b) == 4  # lower thresholds keep more
    t = [{"boxes": torch.tensor([[1, 1, 9, 9.]]), "labels": torch.tensor([2]), "patch": patch}]
    out = regime_targets("masked", t, [{"boxes": boxes, "scores": scores, "labels": labels}])
    assert len(out[0]["boxes"]) == 3 and out[0]["labels"].tolist() == [2, 1, 0]
    assert regime_targets("naive", t, None) is t


def test_pseudo_labels_come_from_the_training_forward():
    """The masked regime decodes pseudo-labels from the training forward pass itself; they
    must equal the detections of a separate eval-mode forward (frozen BN, GroupNorm head)."""
    from leukemia_core.detection.train import DetTrainConfig, _pseudo_fn

    model = _tiny_model(score_thresh=0.0)
    with torch.no_grad():  # make some outputs confident enough to pass conf 0.5
        model.fcos.head.classification_head.cls_logits.bias.fill_(3.0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    patch = torch.tensor([0, 0, 32, 32.])
    targets = [{"boxes": torch.tensor([[4, 4, 28, 28.]]), "labels": torch.tensor([0]), "patch": patch}] * 2
    with torch.no_grad():
        eval_dets = model.eval()(images)
    expected = regime_targets("masked", targets, eval_dets)
    seen, counter = [], [0]
    fn = _pseudo_fn(DetTrainConfig(regime="masked"), counter)

    def spy(dets, tg, image_list, sizes):
        out = fn(dets, tg, image_list, sizes)
        seen.extend(out)
        return out
    model.train()(images, targets, targets_fn=spy)
    assert counter[0] > 0 and counter[0] == sum(len(e["boxes"]) - 1 for e in expected)
    for got, exp in zip(seen, expected):
        torch.testing.assert_close(got["boxes"], exp["boxes"], rtol=1e-4, atol=1e-3)
        assert got["labels"].tolist() == exp["labels"].tolist()


def test_repeat_factors_favour_images_with_rare_labelled_classes():
    from leukemia_core.detection.train import repeat_factors

    class DS:  # 1 of 8 images has a platelet (class 2), all have RBCs (class 1)
        targets = [{"labels": torch.tensor([1, 1, 2])}] + [{"labels": torch.tensor([1])}] * 7
    r = repeat_factors(DS, 0.5)
    assert r[0] == pytest.approx(2.0) and (r[1:] == 1).all()  # sqrt(0.5 / (1/8)) = 2
    assert (repeat_factors(DS, None) == 1).all()


# ----------------------------------------------------------------------------- model
def test_model_forward_shapes():
    model = _tiny_model(score_thresh=0.0, detections_per_img=7).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80), torch.rand(3, 48, 64)])
    assert len(out) == 2
    for d, (h, w) in zip(out, [(64, 80), (48, 64)]):
        n = len(d["boxes"])
        assert 0 < n <= 7 and d["boxes"].shape == (n, 4) and d["scores"].shape == (n,)
        assert set(d["labels"].tolist()) <= {0, 1, 2}
        assert d["attributes"]["size"].shape == (n, 2) and d["attributes"]["shape"].shape == (n, 3)
        assert (d["boxes"][:, 2] <= w + 1e-3).all() and (d["boxes"][:, 3] <= h + 1e-3).all()
    model.train()
    losses = model([torch.rand(3, 64, 64)] * 2, [{"boxes": torch.tensor([[5, 5, 40, 40.]]), "labels": torch.tensor([0]),
                                                 "patch": torch.tensor([0, 0, 64, 64.])}] * 2)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}


def test_box_dataset_flips_boxes_and_patch(tmp_path):
    Image.new("RGB", (80, 60), "white").save(tmp_path / "a.jpg")
    table = pd.DataFrame([{"path": str(tmp_path / "a.jpg"), "width": 80, "height": 60,
                           "boxes": [[0, 0, 20, 10]], "labels": [1], "patch": [0, 0, 40, 30]}])
    ds = BoxDataset(table, 30, train=True)
    for _ in range(10):
        img, t = ds[0]
        assert img.shape == (3, 30, 40)
        b, p = t["boxes"][0], t["patch"]
        assert (b[2] - b[0]).item() == pytest.approx(10) and (p[2] - p[0]).item() == pytest.approx(20)
        assert centres_inside(t["boxes"], p).all()  # the patch moves with the boxes


# ----------------------------------------------------------------------------- CLI
def test_detect_cli_writes_one_record_per_image(tmp_path):
    import argparse

    from leukemia_core.cli.detect import add_detect_parser
    from leukemia_core.detection.train import save_detector

    folder = tmp_path / "smears"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    (folder / "notes.txt").write_text("not an image")
    model = _tiny_model(score_thresh=0.0)
    ckpt = tmp_path / "det.safetensors"
    save_detector(model, ckpt, {"size": ["big", "small"], "shape": ["a", "b", "c"]})
    parser = argparse.ArgumentParser()
    add_detect_parser(parser.add_subparsers(dest="cmd"))
    for out in ("boxes.json", "boxes.csv"):
        args = parser.parse_args(["detect", str(folder), "--checkpoint", str(ckpt), "--out",
                                  str(tmp_path / out), "--score-thresh", "0"])
        assert args.func(args) == 0
    records = json.loads((tmp_path / "boxes.json").read_text())
    assert [r["image"].rsplit("/", 1)[1] for r in records] == ["s0.png", "s1.png", "s2.png"]
    dets = [d for r in records for d in r["detections"]]
    assert dets and all(d["class"] in CLASSES and len(d["box"]) == 4 for d in dets)
    wbc = [d for d in dets if d["class"] == "WBC"]
    assert all(d["attributes"]["size"]["value"] in ("big", "small") for d in wbc)
    assert records[0]["width"] == 70 and records[0]["height"] == 50
    rows = pd.read_csv(tmp_path / "boxes.csv")
    assert sorted(set(rows["image"].str.rsplit("/", n=1).str[1])) == ["s0.png", "s1.png", "s2.png"]
    assert len(rows) == len(dets)
    again = parser.parse_args(["detect", str(folder), "--checkpoint", str(ckpt), "--out", str(tmp_path / "boxes.csv")])
    with pytest.raises(LeukemiaError, match="--overwrite"):  # never replaced silently
        again.func(again)
    assert len(pd.read_csv(tmp_path / "boxes.csv")) == len(dets)
    bad = parser.parse_args(["detect", str(tmp_path / "missing"), "--checkpoint", str(ckpt), "--out", "x.json"])
    with pytest.raises(DatasetError, match="missing"):
        bad.func(bad)


# ----------------------------------------------------------------------------- real data
def test_real_boxes_load(data_root):
    from leukemia_core.detection.data import attribute_table, bccd_boxes, link_sources, txl_boxes

    bccd = bccd_boxes(data_root)
    assert bccd["split"].value_counts().to_dict() == {"train": 205, "val": 87, "test": 72}
    assert len(bccd.attrs["excluded_boxes"]) == 2  # the two zero-area boxes, reported
    n = {c: sum(lab.count(i) for lab in bccd["labels"]) for i, c in enumerate(CLASSES)}
    assert n == {"WBC": 372, "RBC": 4155 - 2, "Platelets": 361}  # the two excluded boxes are RBCs
    txl = link_sources(bccd, txl_boxes(data_root))
    assert len(txl) == 1440 and set(txl["domain"]) == {"raabin", "pbc", "bccd", "bcd"}
    assert txl["bccd_split"].notna().sum() == 221
    attrs = attribute_table(data_root, txl)
    n_txl = (attrs["source"] == "txl_pbc").sum()
    assert 0 < n_txl and n_txl + len(attrs.attrs["txl_without_wbc_box"]) <= 500
    assert attrs.groupby("source")["wbcatt_split"].value_counts().loc["pbc"].to_dict() == \
        {"train": 6169 - 4, "test": 3099, "val": 1030 - 2}  # WBCAtt copies across its splits dropped
    # no detector training image is a copy of a WBCAtt validation/test cell
    wb = load_dataset("wbcatt", data_root, hashes=False)
    linked = link_wbcatt(txl, wb)
    held = set(wb.loc[wb["wbcatt_split"] != "train", "relpath"])
    assert linked.loc[linked["source_path"].isin(held), "wbcatt_heldout"].all()
    assert linked["wbcatt_heldout"].sum() >= len(set(linked["source_path"].dropna()) & held) > 0


def test_attribute_head_keeps_its_best_validation_epoch():
    """With a validation set the head ends on the epoch with the best mean val accuracy,
    and exactly that epoch is marked selected."""
    from leukemia_core.detection.model import AttributeHead
    from leukemia_core.detection.train import attribute_predictions, train_attribute_head

    torch.manual_seed(0)
    head = AttributeHead(2, {"a": 3, "b": 2}, hidden=16, dropout=0.0)
    feats = torch.randn(60, 2 * 49)
    targets = torch.stack([feats[:, 0].gt(0).long() + feats[:, 1].gt(0.5).long(), feats[:, 2].gt(0).long()], 1)
    val_x, val_y = feats[:20], targets[:20]
    history = train_attribute_head(head, feats[20:], targets[20:], epochs=6, lr=1e-2, batch_size=16,
                                   val=(val_x, val_y))
    assert [r["epoch"] for r in history] == list(range(1, 7)) and sum(r["selected"] for r in history) == 1
    best = max(history, key=lambda r: r["val_accuracy"])
    assert best["selected"]
    final = (attribute_predictions(head, val_x) == val_y).float().mean().item()
    assert final == pytest.approx(best["val_accuracy"])


@pytest.mark.slow
def test_detector_and_attribute_head_resume_exactly(tmp_path):
    """The detector (masked regime, pseudo-labels switched on in the second epoch) and the
    attribute head, each killed mid-run and resumed with the one loop, end exactly as
    uninterrupted runs."""
    from leukemia_core.detection.data import BoxDataset
    from leukemia_core.detection.model import AttributeHead
    from leukemia_core.detection.train import DetTrainConfig, train_attribute_head, train_detector

    rows = []
    for i in range(4):
        rng = np.random.default_rng(i)
        im = rng.integers(0, 80, (64, 96, 3), dtype=np.uint8)
        im[10:30, 20:45] = 220  # one bright "cell"
        Image.fromarray(im).save(tmp_path / f"s{i}.png")
        rows.append({"path": str(tmp_path / f"s{i}.png"), "boxes": [[20, 10, 45, 30]], "labels": [0],
                     "width": 96, "height": 64, "patch": [0, 0, 60, 64]})
    ds = BoxDataset(pd.DataFrame(rows), 64, train=True)
    cfg = DetTrainConfig(epochs=2, batch_size=2, lr=1e-3, warmup_steps=2, regime="masked", pseudo_start=1,
                         pseudo_conf=0.0)

    def run(out, **kw):
        model = _tiny_model(score_thresh=0.0)
        hist = train_detector(model, ds, cfg, log=lambda *_: None, out_dir=out, **kw)
        return model, hist

    whole, ref = run(tmp_path / "whole")
    run(tmp_path / "killed", stop_after_steps=3)  # inside the second epoch
    again, hist = run(tmp_path / "killed", resume=True)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in hist] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in ref]
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    feats = torch.randn(40, 2 * 49, generator=torch.Generator().manual_seed(0))
    targets = torch.stack([feats[:, 0].gt(0).long(), feats[:, 1].gt(0).long()], 1)

    def head_run(out, **kw):
        torch.manual_seed(0)
        head = AttributeHead(2, {"a": 2, "b": 2}, hidden=8, dropout=0.2)
        return head, train_attribute_head(head, feats[10:], targets[10:], epochs=4, batch_size=8,
                                          val=(feats[:10], targets[:10]), out_dir=out, **kw)

    h1, r1 = head_run(tmp_path / "head")
    h2, r2 = head_run(tmp_path / "head", resume=True)  # resuming a finished run changes nothing
    assert r1 == r2 and all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values()))


# ----------------------------------------------------------------------------- the chapter's protocol
def _box_table(rows):
    return pd.DataFrame([{"relpath": r[0], "split": r[1], "domain": r[2], "bccd_split": r[3],
                          "wbcatt_heldout": r[4], "boxes": [[0, 0, 4, 4]], "labels": [0]} for r in rows])


def test_chapter_split_closes_the_leaks():
    """leukemia_core.experiments.detection.split_data: no TXL image copied from BCCD or from a
    WBCAtt validation/test cell trains, and no TXL test image copied from a BCCD training
    image is scored; the profile's caps apply."""
    from leukemia_core.experiments.detection import run, run_name, sizes, split_data

    assert list(run.__code__.co_varnames[:6]) == ["profile", "seeds", "data_root", "out", "results_dir", "resume"]
    bccd = _box_table([(f"b{i}", s, "bccd", None, False) for i, s in enumerate(["train"] * 3 + ["test"] * 2)])
    txl = _box_table([("t_own", "train", "pbc", None, False), ("t_copy_test", "train", "bccd", "test", False),
                      ("t_copy_train", "train", "bccd", "train", False), ("t_held", "train", "pbc", None, True),
                      ("t_raabin", "train", "raabin", None, False),
                      ("x_leak", "test", "bccd", "train", False), ("x_ok", "test", "bccd", "test", False),
                      ("x_pbc", "test", "pbc", None, False)])
    sz = dict(bccd_train_cap=None, txl_train_per_domain=None, test_cap=None, txl_test_per_domain=None)
    d = split_data(bccd, txl, sz, seed=0)
    assert set(d["txl_train"].relpath) == {"t_own", "t_raabin"}
    assert set(d["train_table"].relpath) == {"b0", "b1", "b2", "t_own", "t_raabin"}
    assert set(d["txl_test"].relpath) == {"x_ok", "x_pbc"} and d["contaminated"] == 1
    assert set(d["bccd_test"].relpath) == {"b3", "b4"}
    capped = split_data(bccd, txl, sz | dict(bccd_train_cap=2, txl_train_per_domain=1, test_cap=1,
                                             txl_test_per_domain=1), seed=0)
    assert len(capped["bccd_train"]) == 2 and len(capped["txl_train"]) == 2 and len(capped["bccd_test"]) == 1
    assert capped["txl_test"].domain.value_counts().max() == 1
    assert sizes("smoke", [0.1, 0.5])["fractions"] == (0.1, 0.5)
    assert run_name("full", 1.0) == "full" and run_name("masked", 0.25) == "masked_25"
