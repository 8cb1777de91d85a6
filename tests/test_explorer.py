"""The prediction explorer without a browser: loading runs, filters, the confusion-matrix
click, CAM overlays, top-k, and the optional vision-language / detection columns, on tiny
generated images and a random-weight checkpoint (no dataset needed)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukemia_core.explain import explorer as ex
from leukemia_core.engine.checkpoint import save_weights
from leukemia_core.errors import CheckpointError, DatasetError, LeukemiaError
from leukemia_core.models import create_model

CLASSES = ["blast", "lymphocyte", "neutrophil"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the CLI writes it, with absolute image paths (``path`` column)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        path = folder / "images" / f"cell_{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        probs = rng.dirichlet(np.ones(3))
        rows.append({"path": str(path), "relpath": path.name, "label": CLASSES[i % 3],
                     "pred": CLASSES[int(probs.argmax())], "confidence": probs.max(),
                     **{f"prob_{c}": p for c, p in zip(CLASSES, probs)}})
    pd.DataFrame(rows).to_csv(folder / "predictions_test.csv", index=False)
    pd.DataFrame(rows[:4]).to_csv(folder / "predictions_val.csv", index=False)
    model = create_model("convnext_atto", num_classes=3)
    save_weights(folder / "model.safetensors", model, {
        "model": "convnext_atto", "classes": CLASSES, "image_size": 32, "dataset": "toy",
        "mean": [0.5] * 3, "std": [0.25] * 3})
    return folder


def test_load_run_folder(run):
    d = ex.load_run(run)
    assert d.has_cams and d.classes == CLASSES and len(d.table) == 22
    assert set(d.table["split"]) == {"test", "val"} and set(d.table["dataset"]) == {"toy"}
    rows = d.select(split="test", true="blast")
    assert len(rows) == 6 and (rows["label"] == "blast").all()
    assert rows["confidence"].is_monotonic_decreasing
    assert len(d.select(confidence=(0.9, 1.0))) == (d.table["confidence"] >= 0.9).sum()
    cm = d.confusion(d.select(split="test"))
    assert list(cm.index) == CLASSES and cm.values.sum() == 18
    top = d.topk(0, 2)
    assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][0] == d.table.at[0, "pred"]


def test_csv_without_checkpoint_has_no_cams(run, tmp_path):
    csv = tmp_path / "preds.csv"
    pd.read_csv(run / "predictions_test.csv").drop(columns=["label"]).to_csv(csv, index=False)
    d = ex.load_run(csv)
    assert not d.has_cams and set(d.table["label"]) == {ex.UNLABELLED}
    assert d.true_classes == CLASSES + [ex.UNLABELLED]
    html = d.grid_html(d.select().head(2), method=None)
    assert html.count("<figure") == 2


def test_grid_html_and_cam_overlay(run):
    d = ex.load_run(run)
    rows = d.select(split="test").head(3)
    plain = d.grid_html(rows, None, k=2)
    cam = d.grid_html(rows, "Grad-CAM", k=2)
    for r in rows.itertuples():
        assert f'data-relpath="{r.relpath}"' in plain and f'alt="{r.relpath}"' in plain
    assert 'data-cam="off"' in plain and 'data-cam="Grad-CAM"' in cam
    src = lambda h: [s.split('"')[0] for s in h.split('src="')[1:]]
    assert all(a != b for a, b in zip(src(plain), src(cam)))  # the overlay changed each image
    assert all((i, "Grad-CAM") in d._cams for i in rows.index)  # computed once, cached


def test_optional_sentences_and_boxes(run, tmp_path):
    table = pd.read_csv(run / "predictions_test.csv").head(2)
    table["top_sentences"] = [json.dumps([["large nucleus, scant cytoplasm", 0.31], ["granular", 0.2]]),
                              json.dumps(["no sentence scores"])]
    table["boxes"] = [json.dumps([{"box": [2, 2, 20, 20], "label": "neutrophil", "score": 0.9,
                                   "attributes": {"granularity": "yes"}}]), ""]
    table.to_csv(tmp_path / "predictions_test.csv", index=False)
    d = ex.load_run(tmp_path / "predictions_test.csv")
    html = d.grid_html(d.table, None)
    assert "large nucleus, scant cytoplasm (0.31)" in html and "no sentence scores" in html
    assert 'class="lk-boxes"' in html and "neutrophil 0.90: granularity: yes" in html
    plain = np.asarray(Image.open(d.table.at[0, "path"]).convert("RGB").resize((d.thumb_px,) * 2))
    assert not np.array_equal(d.thumbnail(0), plain)  # the box is drawn
    table.loc[0, "boxes"] = json.dumps([{"label": "no coordinates"}])
    table.to_csv(tmp_path / "predictions_test.csv", index=False)
    with pytest.raises(DatasetError, match=r"'box': \[x0, y0, x1, y1\]"):
        ex.load_run(tmp_path / "predictions_test.csv").boxes(0)


def test_widgets_filter_click_and_cam(run):
    pytest.importorskip("anywidget")
    app = ex.explorer(run, page_size=4)
    assert 'data-count="22"' in app.status.value and app.grid.value.count("<figure") == 4
    app.split.value = "test"
    app.true.value = "lymphocyte"
    assert 'data-count="6"' in app.status.value and app.page.max == 2
    assert app.grid.value.count('data-label="lymphocyte"') == 4
    app._on_cell(None, SimpleNamespace(xs=["neutrophil"], ys=["blast"]), None)
    assert (app.true.value, app.pred.value) == ("blast", "neutrophil")
    expected = app.data.select(split="test", true="blast", pred="neutrophil")
    assert f'data-count="{len(expected)}"' in app.status.value
    assert app.figure.layout.shapes and app.figure.data[0].z.sum() == 18
    app.cam.value = True
    assert 'data-cam="Grad-CAM"' in app.grid.value or not len(expected)
    assert max(t for what, t in app.data.timings if what == "refresh") < 5


def test_bad_runs(run, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="neither a run folder nor a predictions CSV"):
        ex.load_run(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="no predictions_"):
        ex.load_run(tmp_path)
    bad = pd.read_csv(run / "predictions_test.csv")
    bad.drop(columns=["pred"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DatasetError, match=r"lack column\(s\) \['pred'\]"):
        ex.load_run(tmp_path / "a.csv")
    bad.rename(columns={"prob_blast": "prob_monocyte"}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(CheckpointError, match="different runs"):
        ex.load_run(tmp_path / "b.csv", checkpoint=run / "model.safetensors")
    bad.assign(path=bad["path"] + ".gone").to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DatasetError, match="missing"):
        ex.load_run(tmp_path / "c.csv")
    monkeypatch.delenv(ex.RUN_ENV, raising=False)
    with pytest.raises(LeukemiaError, match="LEUKEMIA_EXPLORER_RUN"):
        ex.explorer(None)
