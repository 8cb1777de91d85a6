"""fit()/evaluate() on tiny generated tensors."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from leukemia_core.engine.checkpoint import read_meta
from leukemia_core.engine.metrics import classification_metrics
from leukemia_core.engine.train import FitConfig, fit

CLASSES = ["a", "b", "c"]


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y] += 2.0  # class = the brightest channel
    return TensorDataset(x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _loaders():
    return (DataLoader(_data(96, 0), batch_size=16, shuffle=True),
            DataLoader(_data(48, 1), batch_size=32))


def test_fit_learns_and_keeps_best_weights(tmp_path):
    train, val = _loaders()
    res = fit(_model(), train, val, CLASSES, FitConfig(epochs=6, lr=0.05, progress=False), out_dir=tmp_path)
    scores = [h["val_macro_f1"] for h in res.history]
    assert max(scores) > 0.9
    assert res.best_score == max(scores) and res.best_epoch == int(np.argmax(scores))
    meta = read_meta(tmp_path / "model.safetensors")
    assert meta["classes"] == CLASSES and meta["epoch"] == res.best_epoch
    lrs = [h["lr"] for h in res.history]
    assert lrs[-1] < lrs[1]  # cosine decay after warm-up


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = FitConfig(epochs=4, lr=0.05, progress=False, seed=3)
    train, val = _loaders()
    full_model = _model()
    full = fit(full_model, train, val, CLASSES, cfg, out_dir=tmp_path / "full")

    train, val = _loaders()
    fit(_model(), train, val, CLASSES, cfg, out_dir=tmp_path / "cut", stop_after_epoch=1)
    assert len(load_file(tmp_path / "cut/train_state.safetensors")) > 0  # optimizer moments saved
    resumed_model = _model(seed=99)  # different init: everything must come from the checkpoint
    resumed = fit(resumed_model, train, val, CLASSES, cfg, out_dir=tmp_path / "cut", resume=True)

    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], rel=1e-6)
    for (k, v), w in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_early_stopping(tmp_path):
    train, val = _loaders()
    res = fit(_model(), train, val, CLASSES, FitConfig(epochs=30, lr=0.0, warmup_epochs=0,
                                                      patience=2, progress=False))
    assert res.stopped_early and len(res.history) == 3


def test_class_weights_change_the_loss():
    train, _ = _loaders()
    a = fit(_model(), train, None, CLASSES, FitConfig(epochs=1, progress=False))
    b = fit(_model(), train, None, CLASSES, FitConfig(epochs=1, progress=False, class_weights=[5.0, 1.0, 1.0]))
    assert a.history[0]["train_loss"] != pytest.approx(b.history[0]["train_loss"], rel=1e-3)


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.integers(0, 3, 200))
    logits = torch.tensor(rng.normal(size=(200, 3))) + torch.nn.functional.one_hot(y, 3) * 0.8
    m = classification_metrics(logits, y, CLASSES)
    pred = logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx((pred == y.numpy()).mean(), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert np.array(m["confusion_matrix"]).sum() == 200
    assert m["per_class"]["b"]["support"] == int((y == 1).sum())
