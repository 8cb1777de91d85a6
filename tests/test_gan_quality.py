"""Sample-quality metrics, the R3GAN training loop and the synthetic-only-in-training
guard (chapter 08's core), on tiny generated tensors."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from leukemia_core.errors import LeukemiaError
from leukemia_core.gan import quality
from leukemia_core.gan.balance import evaluation_rows, top_up_counts, training_set
from leukemia_core.gan.provenance import file_sha256, generate
from leukemia_core.gan.r3gan import R3GANConfig
from leukemia_core.gan.train import train_r3gan


class MeanColour(nn.Module):
    """A stand-in classifier: its 'features' are the mean RGB of the image."""
    num_features = 3

    def forward_features(self, x):
        return x.mean((2, 3))


def extractor():
    return quality.ClassifierFeatures(MeanColour(), 8, (0, 0, 0), (1, 1, 1), name="mean RGB")


def solid(colour, n, rng, noise=8):
    base = np.array(colour, dtype=float)[None, None, None, :]
    return np.clip(base + rng.normal(0, noise, (n, 8, 8, 3)), 0, 255).astype(np.uint8)


def test_features_resize_and_normalise():
    fx = quality.ClassifierFeatures(MeanColour(), 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), name="t")
    x = torch.full((2, 3, 16, 16), 0.75)
    assert torch.allclose(fx(x), torch.full((2, 3), 0.5))
    assert fx.num_features == 3


def test_kid_fid_separate_same_from_different_sets():
    rng = np.random.default_rng(0)
    a, b, c = solid((200, 50, 50), 40, rng), solid((200, 50, 50), 40, rng), solid((50, 50, 200), 40, rng)
    same, diff = quality.kid_fid(extractor(), a, b), quality.kid_fid(extractor(), a, c)
    assert diff["kid"] > 10 * max(same["kid"], 1e-6) and diff["fid"] > 10 * max(same["fid"], 1e-6)
    assert same["features"] == "mean RGB" and same["n_fake"] == 40
    with pytest.raises(LeukemiaError, match="at least 2"):
        quality.kid_fid(extractor(), a[:1], b)


def test_knn_precision_recall_detects_mode_collapse_and_outliers():
    torch.manual_seed(0)
    real = torch.randn(200, 2)
    assert quality.knn_precision_recall(real, torch.randn(200, 2))["precision"] > 0.8
    collapsed = quality.knn_precision_recall(real, 0.05 * torch.randn(200, 2))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3  # looks real, covers little
    far = quality.knn_precision_recall(real, torch.randn(200, 2) + 20)
    assert far["precision"] == 0 and far["recall"] == 0


def test_train_on_synthetic_test_on_real_and_nearest_neighbour():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    y = np.arange(100) % 2
    good = centres[y] + 0.5 * torch.randn(100, 2)
    swapped = centres[1 - y] + 0.5 * torch.randn(100, 2)  # a generator that mixes up the classes
    real = centres[y] + 0.5 * torch.randn(100, 2)
    assert quality.train_on_test_on(good, y, real, y) > 0.95
    assert quality.train_on_test_on(swapped, y, real, y) < 0.05
    idx, dist = quality.nearest_real(real[:3] + 1e-3, real)
    assert idx.tolist() == [0, 1, 2] and (dist < 0.01).all()


def test_r3gan_training_loop_writes_a_traceable_generator(tmp_path):
    rng = np.random.default_rng(0)
    images = np.concatenate([solid((220, 40, 40), 16, rng), solid((40, 40, 220), 16, rng)])
    run = train_r3gan(images, [0] * 16 + [1] * 16, 2, steps=6, batch=8, seed=0,
                      net=dict(base=8, max_width=16, z_dim=8, embed_dim=8),
                      config=R3GANConfig(lr=1e-3), log_every=2, out=tmp_path / "g.safetensors")
    assert run.checkpoint_sha256 == file_sha256(tmp_path / "g.safetensors")
    assert [h["step"] for h in run.history] == [0, 2, 4, 5] and run.train_images_per_s > 0
    assert not run.generator.training and run.generator.image_size == 8
    ims, rec = generate(run.generator, 1, "blue", 3, seed=0, checkpoint_sha256=run.checkpoint_sha256)
    assert ims.shape == (3, 8, 8, 3) and rec["relpath"].str.contains(run.checkpoint_sha256[:12]).all()
    with pytest.raises(LeukemiaError, match="uint8"):
        train_r3gan(images.astype(np.float32), [0] * 32, 2, steps=1)
    with pytest.raises(LeukemiaError, match=r"\[0, 2\)"):
        train_r3gan(images, [0] * 31 + [2], 2, steps=1)


def test_top_up_counts():
    assert top_up_counts({"a": 10, "b": 300}, ["a", "b"], 100) == {"a": 90, "b": 0}
    with pytest.raises(LeukemiaError, match="c"):
        top_up_counts({"a": 10}, ["a", "c"], 100)


def test_synthetic_images_go_to_training_only():
    from leukemia_core.gan.r3gan import Generator
    real = pd.DataFrame({"relpath": ["b/1.jpg", "n/2.jpg"], "label": ["basophil", "neutrophil"],
                         "split": "train"})
    real_ims = [np.zeros((8, 8, 3), np.uint8)] * 2
    fake_ims, fake = generate(Generator(1, image_size=8, base=8, max_width=8), 0, "basophil", 3, 0, "ef" * 32)
    ds = training_set(real_ims, real, ["neutrophil", "basophil"], None, list(fake_ims), fake)
    assert len(ds) == 5 and ds.targets == [1, 0, 1, 1, 1]
    assert ds.records["synthetic"].tolist() == [False, False, True, True, True]
    assert ds[4][0].size == (8, 8)
    # real rows of another split, synthetic rows posing as real, real rows posing as synthetic
    with pytest.raises(LeukemiaError, match="training split only"):
        training_set(real_ims, real.assign(split="test"), ["neutrophil", "basophil"])
    with pytest.raises(LeukemiaError, match="synthetic image"):
        training_set(list(fake_ims), fake, ["basophil"])
    with pytest.raises(LeukemiaError, match="without synthetic provenance"):
        training_set(real_ims, real, ["neutrophil", "basophil"], None, real_ims, real)
    # evaluation splits: a synthetic row anywhere in val/test stops the chapter
    table = pd.concat([real.assign(split="test"), fake.assign(split="test")], ignore_index=True)
    assert len(evaluation_rows(table.iloc[:2], "test")) == 2
    with pytest.raises(LeukemiaError, match="3 synthetic image.*test split"):
        evaluation_rows(table, "test")
    with pytest.raises(LeukemiaError, match="'val' or 'test'"):
        evaluation_rows(table, "train")
