"""`leukemia-core predict` and `evaluate --images` on a hospital's own folder: streaming
prediction (same result as decoding everything at once), streaming BatchNorm adaptation
(same statistics as the full-tensor recompute), unreadable files recorded in the error
column (or fatal with --strict), class-name synonyms and the macro-F1 over the shared
classes, clean CLI errors, and the memory benchmark at a tiny size. Tiny generated images
and an untrained EfficientNet-Lite0; no dataset needed."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukemia_core import dg
from leukemia_core import predict as P
from leukemia_core.data.class_names import map_classes
from leukemia_core.cli.main import main
from leukemia_core.data.records import find_images
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.errors import DatasetError

CLASSES = ["neutrophil", "lymphocyte", "monocyte"]


def cell(size, radius, colour=(120, 60, 160), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 225, np.uint8) - rng.integers(0, 20, (h, w, 3)).astype(np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < radius ** 2] = colour
    return Image.fromarray(img)


def truncated_jpeg(path):
    cell((64, 64), 20, seed=99).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = dg.DGNet(dg.build_backbone("bn", len(CLASSES), pretrained=False))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return dg.save_dg_checkpoint(path, model, CLASSES, 32, None, dg.Recipe("test"))


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "cells"
    (f / "sub").mkdir(parents=True)
    for i, size in enumerate([(50, 40), (64, 64), (80, 72), (48, 60), (70, 50), (90, 90)]):
        cell(size, 12 + i, colour=(100 + 20 * i, 60, 160 - 10 * i), seed=i).save(
            f / ("sub" if i % 3 == 2 else "") / f"cell{i}.png")
    return f


def old_batch_predict(ckpt, folder, adapt=False, batch_size=64):
    """What predict_folder did before streaming: decode everything, one stacked tensor."""
    net, meta, prep = P.load_predictor(ckpt)
    paths = find_images(folder, recursive=True)
    x_all = torch.stack([prep(read_image(p))[0] for p in paths])
    if adapt:
        net = dg.recompute_bn_float(net, x_all, batch_size)
    with torch.no_grad():
        probs = torch.cat([net(x_all[i:i + batch_size]).softmax(1) for i in range(0, len(x_all), batch_size)])
    return [str(p) for p in paths], probs.numpy(), net


def test_streaming_equals_batch(ckpt, folder, tmp_path):
    out = P.predict_folder(ckpt, folder, tmp_path / "p.csv", batch_size=4)  # batches of 4 and 2
    paths, probs, _ = old_batch_predict(ckpt, folder)
    assert out["path"].tolist() == paths
    assert np.allclose(out[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs, atol=1e-5)
    assert out["pred"].tolist() == [CLASSES[i] for i in probs.argmax(1)]
    assert out["error"].isna().all()
    assert [read_image(p).size for p in paths] == list(zip(out["width"], out["height"]))
    saved = pd.read_csv(tmp_path / "p.csv")
    assert len(saved) == 6 and saved["error"].isna().all() and saved["width"].dtype.kind == "i"


def test_adapt_bn_streaming_equals_full_tensor_recompute(ckpt, folder, tmp_path):
    net, _, prep = P.load_predictor(ckpt)
    paths = find_images(folder, recursive=True)
    streamed = P.adapt_bn_stream(net, paths, prep, batch_size=3)
    _, probs, full = old_batch_predict(ckpt, folder, adapt=True, batch_size=3)
    bns = lambda m: [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert len(bns(streamed)) > 10
    for a, b, orig in zip(bns(streamed), bns(full), bns(net)):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bns(streamed)[0].running_mean, bns(net)[0].running_mean)  # it did adapt
    out = P.predict_folder(ckpt, folder, tmp_path / "a.csv", batch_size=3, adapt_bn=True)
    assert np.allclose(out[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs, atol=1e-5)


def test_unreadable_files_recorded_counted_or_strict(ckpt, folder, tmp_path, capsys):
    truncated_jpeg(folder / "truncated.jpg")
    (folder / "sub" / "garbage.png").write_bytes(b"not a png at all")
    out = P.predict_folder(ckpt, folder, tmp_path / "p.csv")
    assert len(out) == 8
    bad = out[out["error"].notna()]
    assert sorted(p.rsplit("/", 1)[1] for p in bad["path"]) == ["garbage.png", "truncated.jpg"]
    assert all(p.rsplit("/", 1)[1] in e for p, e in zip(bad["path"], bad["error"]))
    assert bad["pred"].isna().all() and bad[[f"prob_{c}" for c in CLASSES]].isna().all().all()
    good = out[out["error"].isna()]
    assert len(good) == 6 and good["pred"].notna().all()
    saved = pd.read_csv(tmp_path / "p.csv")
    assert saved["error"].notna().sum() == 2 and saved.loc[saved["error"].notna(), "pred"].isna().all()
    with pytest.raises(DatasetError, match="garbage.png|truncated.jpg"):
        P.predict_folder(ckpt, folder, tmp_path / "strict.csv", strict=True)
    # the CLI: summary counts them; --strict exits 2 naming the file
    assert main(["predict", "--images", str(folder), "--checkpoint", str(ckpt), "--out", str(tmp_path / "c.csv")]) == 0
    assert f"8 images, 2 unreadable: listed in the error column of {tmp_path / 'c.csv'}" in capsys.readouterr().out
    assert main(["predict", "--images", str(folder), "--checkpoint", str(ckpt), "--out", str(tmp_path / "d.csv"),
                 "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leukemia-core: error:") and ("garbage.png" in err or "truncated.jpg" in err)
    assert not (tmp_path / "d.csv").exists()


def test_class_name_synonyms():
    model = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    names = {"Segmented neutrophils": "neutrophil", "NEUTROPHIL": "neutrophil", " neutrophil ": "neutrophil",
             "SNE": "neutrophil", "Band neutrophils": "neutrophil", "seg_neutrophil": "neutrophil",
             "Lymphocyte": "lymphocyte", "lymphocytes": "lymphocyte", "Monocyte": "monocyte",
             "Eosinophil": "eosinophil", "Basophil": "basophil", "ig": "ig", "immature granulocytes": "ig",
             "Myelocyte": "ig", "metamyelocytes": "ig", "promyelocyte": "ig", "erythroblast": "erythroblast",
             "NRBC": "erythroblast", "platelets": "platelet", "Thrombocyte": "platelet",
             "myeloblast": None, "Smudge cells": None}
    assert map_classes(list(names), model) == names
    assert map_classes(["Myeloblasts", "seg_neutrophil"], ["myeloblast", "neutrophil"]) == {
        "Myeloblasts": "myeloblast", "seg_neutrophil": "neutrophil"}


class _ColourNet(torch.nn.Module):
    """Logits = 10 x the mean RGB: red -> neutrophil, green -> lymphocyte, blue -> monocyte."""

    def forward(self, x):
        return x * 10


def _fake_predictor(monkeypatch, tmp_path):
    prep = lambda im: (torch.from_numpy(np.asarray(im, np.float32).mean((0, 1)) / 255), True)
    monkeypatch.setattr(P, "load_predictor", lambda ckpt: (_ColourNet(), {"classes": CLASSES}, prep))
    ckpt = tmp_path / "fake.safetensors"
    ckpt.write_bytes(b"weights")
    return ckpt


RED, GREEN, BLUE, BLUEISH = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 80, 255)


@pytest.fixture
def labelled(tmp_path):
    layout = {"Segmented neutrophils": [RED, RED, GREEN], "LYMPHOCYTES": [GREEN, GREEN, BLUEISH],
              "Myeloblast": [RED, RED], "band neutrophil": [RED]}
    root = tmp_path / "hospital"
    for cls, colours in layout.items():
        (root / cls).mkdir(parents=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (20, 20), c).save(root / cls / f"{i}.png")
    truncated_jpeg(root / "LYMPHOCYTES" / "broken.jpg")
    return root


def test_evaluate_maps_synonyms_and_scores_shared_classes(monkeypatch, tmp_path, labelled, capsys):
    ckpt = _fake_predictor(monkeypatch, tmp_path)
    m = P.evaluate_folder(ckpt, labelled, tmp_path / "ev")
    assert m["mapping"] == {"LYMPHOCYTES": "lymphocyte", "Myeloblast": None,
                            "Segmented neutrophils": "neutrophil", "band neutrophil": "neutrophil"}
    assert m["shared_classes"] == ["neutrophil", "lymphocyte"] and m["folder_classes_model_lacks"] == ["Myeloblast"]
    # true neutrophil: N N L N; true lymphocyte: L L M. Neutrophil P=1 R=3/4 F1=6/7;
    # lymphocyte P=2/3 R=2/3 F1=2/3; macro-F1 over the two shared classes = 16/21
    assert m["macro_f1"] == pytest.approx(16 / 21) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_class"]["neutrophil"] == pytest.approx({"recall": 0.75, "precision": 1.0, "f1": 6 / 7, "support": 4})
    assert m["per_class"]["lymphocyte"]["recall"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["classes"] == CLASSES
    assert m["confusion_matrix"]["matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 0]]
    assert m["n_images"] == 10 and m["n_scored"] == 7 and m["n_unreadable"] == 1
    assert m["unreadable"][0].endswith("broken.jpg")
    assert m["predictions_of_classes_model_lacks"] == {"Myeloblast": {"neutrophil": 2}}
    assert m["counts"] == {"LYMPHOCYTES": 4, "Myeloblast": 2, "Segmented neutrophils": 3, "band neutrophil": 1}
    assert len(m["checkpoint_sha256"]) == 64 and m["adapt_bn"] is False
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["macro_f1"] == pytest.approx(16 / 21)
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    for col in ("path", "label", "pred", "confidence", "error", *[f"prob_{c}" for c in CLASSES]):
        assert col in preds, col
    assert (preds.loc[preds["folder_class"] == "Myeloblast", "pred"] == "neutrophil").all()  # still predicted
    assert preds["error"].notna().sum() == 1
    # restricted to the shared classes: the blue-ish lymphocyte becomes a lymphocyte
    r = P.evaluate_folder(ckpt, labelled, tmp_path / "ev2", restrict_to_shared=True)
    assert r["macro_f1"] == pytest.approx(6 / 7) and r["accuracy"] == pytest.approx(6 / 7)
    assert r["confusion_matrix"]["classes"] == ["neutrophil", "lymphocyte"]
    # the output folder opens in the prediction explorer (unreadable rows left out)
    from leukemia_core.explain.explorer import load_run
    d = load_run(tmp_path / "ev")
    assert len(d.table) == 9 and d.classes == CLASSES and "Myeloblast" in d.true_classes
    assert d.confusion(d.select()).loc["neutrophil", "neutrophil"] == 3
    # the CLI prints the mapping, the unreadable count and the metrics
    assert main(["evaluate", "--images", str(labelled), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev3")]) == 0
    text = capsys.readouterr().out
    assert "'Segmented neutrophils' -> neutrophil" in text and "'Myeloblast' -> (not a class of the model" in text
    assert "10 images, 1 unreadable: listed in the error column of" in text and "macro-F1 0.7619" in text
    assert main(["evaluate", "--images", str(labelled), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev3")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _clean_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("leukemia-core: error:") and err.count("\n") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_evaluate_cli_errors(monkeypatch, tmp_path, capsys):
    ckpt = _fake_predictor(monkeypatch, tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    args = ["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert main([*args, "--images", str(flat)]) == 2
    _clean_error(capsys, str(flat), "no class subfolders", "<class>/<image>")
    assert main([*args, "--images", str(tmp_path / "missing")]) == 2
    _clean_error(capsys, str(tmp_path / "missing"), "not a folder")
    (flat / "Smudge cells").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "Smudge cells" / "b.png")
    assert main([*args, "--images", str(flat)]) == 2
    _clean_error(capsys, str(flat), "Smudge cells", "class_names.py")
    assert main(args) == 2
    _clean_error(capsys, "--dataset", "--images")
    assert main([*args, "--images", str(flat), "--dataset", "pbc"]) == 2
    _clean_error(capsys, "not both")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "pbc", "--adapt-bn"]) == 2
    _clean_error(capsys, "--adapt-bn", "--images")


@pytest.mark.slow
def test_bench_predict_tiny_through_cli(capsys):
    """The memory benchmark's plumbing at n = 1 (one fresh process; the real run uses 2000
    and 20000 images: `leukemia-core bench predict`)."""
    assert main(["bench", "predict", "--n", "1"]) == 0
    res = json.loads(capsys.readouterr().out)["predict"]
    assert [r["n_images"] for r in res["runs"]] == [1]
    r = res["runs"][0]
    assert r["unreadable"] == 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 50 and r["python_alloc_peak_mb"] > 0
