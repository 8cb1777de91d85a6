"""R3GAN objective and networks, synthetic-image provenance, the Raabin-like imbalance
and the ConvNeXtV2–Swin hybrid (method chapter 2's core)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import LeukemiaError, UnknownNameError
from leukemia_core.gan.provenance import assert_real_only, generate, is_synthetic
from leukemia_core.gan.r3gan import (Discriminator, Generator, R3GANConfig, R3GANTrainer, ResidualBlock,
                                     rpgan_losses, zero_centred_penalty)
from leukemia_core.data.imbalance import RAABIN_RATIOS, imbalanced_train
from leukemia_core.models import create_model, size_kwargs


# --- R3GAN ------------------------------------------------------------------------------
def test_rpgan_losses_match_hand_values():
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.5])
    loss_d, loss_g = rpgan_losses(d_real, d_fake)
    sp = lambda v: math.log1p(math.exp(v))
    assert loss_d.item() == pytest.approx((sp(-2.0) + sp(1.0)) / 2, rel=1e-6)
    assert loss_g.item() == pytest.approx((sp(2.0) + sp(-1.0)) / 2, rel=1e-6)
    # relativistic: only the difference of a pair matters
    shifted = rpgan_losses(d_real + 7, d_fake + 7)
    assert shifted[0].item() == pytest.approx(loss_d.item()) and shifted[1].item() == pytest.approx(loss_g.item())


def test_zero_centred_penalty_is_squared_gradient_norm():
    w = torch.tensor([1.0, -2.0, 3.0])
    x = torch.randn(4, 3, requires_grad=True)
    scores = x @ w + (x ** 2).sum(1)  # gradient 2x + w per sample
    expected = ((2 * x.detach() + w) ** 2).sum(1).mean()
    pen = zero_centred_penalty(scores, x)
    assert pen.item() == pytest.approx(expected.item(), rel=1e-5)
    pen.backward()  # differentiable (create_graph), as R1/R2 need
    assert x.grad is not None


def test_residual_blocks_start_as_identity_and_shapes():
    block = ResidualBlock(16)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)  # fix-up: the branch's last conv is zero at init
    g, d = Generator(3, image_size=16, base=8, max_width=32), Discriminator(3, image_size=16, base=8, max_width=32)
    img = g(torch.randn(5, g.z_dim), torch.tensor([0, 1, 2, 0, 1]))
    assert img.shape == (5, 3, 16, 16) and img.abs().max() <= 1
    assert d(img, torch.tensor([0, 1, 2, 0, 1])).shape == (5,)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for m in g.modules())
    with pytest.raises(LeukemiaError, match="power of two"):
        Generator(3, image_size=48)


@pytest.mark.slow
def test_class_conditional_r3gan_learns_two_colours():
    """Class 0 is red squares, class 1 blue: a trained generator must draw the right colour."""
    torch.manual_seed(0)
    n = 64
    y = torch.arange(n) % 2
    real = torch.full((n, 3, 8, 8), -0.8)
    real[y == 0, 0] = 0.8  # red
    real[y == 1, 2] = 0.8  # blue
    real += 0.05 * torch.randn_like(real)
    g = Generator(2, image_size=8, z_dim=8, base=16, max_width=32, embed_dim=8)
    d = Discriminator(2, image_size=8, base=16, max_width=32)
    trainer = R3GANTrainer(g, d, R3GANConfig(gamma=0.1, lr=2e-3))
    for step in range(300):
        idx = torch.randint(0, n, (32,))
        losses = trainer.step(real[idx], y[idx])
    assert all(math.isfinite(v) for v in losses.values())
    with torch.no_grad():
        fake = g(torch.randn(200, 8), torch.arange(200) % 2)
    red, blue = fake[0::2].mean((0, 2, 3)), fake[1::2].mean((0, 2, 3))
    assert red[0] > red[2] + 0.5 and blue[2] > blue[0] + 0.5, (red, blue)


# --- provenance ---------------------------------------------------------------------------
def test_generated_images_are_reproducible_and_carry_provenance():
    g = Generator(2, image_size=8, z_dim=8, base=8, max_width=16)
    a, rec = generate(g, 1, "basophil", 5, seed=3, checkpoint_sha256="ab" * 32)
    b, _ = generate(g, 1, "basophil", 5, seed=3, checkpoint_sha256="ab" * 32)
    c, _ = generate(g, 1, "basophil", 5, seed=4, checkpoint_sha256="ab" * 32)
    assert a.dtype == np.uint8 and a.shape == (5, 8, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert list(rec["seed"]) == [3] * 5 and set(rec["label"]) == {"basophil"}
    assert rec["generator_sha256"].eq("ab" * 32).all() and rec["synthetic"].all()
    assert rec["relpath"].is_unique


def test_synthetic_images_never_pass_into_evaluation():
    real = pd.DataFrame({"relpath": ["PBC/basophil/BA_1.jpg", "PBC/basophil/BA_2.jpg"], "label": "basophil"})
    assert_real_only(real, "test split")  # real rows pass
    _, rec = generate(Generator(1, image_size=8, base=8, max_width=8), 0, "basophil", 2, 0, "cd" * 32)
    mixed = pd.concat([real, rec], ignore_index=True)
    assert is_synthetic(mixed).tolist() == [False, False, True, True]
    with pytest.raises(LeukemiaError, match="2 synthetic image.*test split"):
        assert_real_only(mixed, "test split")
    # a path alone marks it, even if the flag column was lost
    with pytest.raises(LeukemiaError):
        assert_real_only(mixed.drop(columns="synthetic"), "validation split")


# --- Raabin-like imbalance (committed PBC split: no images needed) -------------------------
@pytest.fixture(scope="module")
def pbc_split():
    return pd.read_csv(REPO_ROOT / "splits" / "pbc.csv")


def test_raabin_imbalance_touches_only_training_rows(pbc_split):
    out = imbalanced_train(pbc_split, seed=0)
    five = pbc_split[pbc_split["label"].isin(RAABIN_RATIOS)]
    for split in ("val", "test"):  # evaluation keeps the committed, natural balance
        a = out[out.split == split].sort_values("relpath").reset_index(drop=True)
        b = five[five.split == split].sort_values("relpath").reset_index(drop=True)
        pd.testing.assert_frame_equal(a[["relpath", "label", "split"]], b[["relpath", "label", "split"]])
    train = out[out.split == "train"]
    assert set(train["relpath"]) <= set(pbc_split.loc[pbc_split.split == "train", "relpath"])
    counts = train.groupby("label").size()
    for cls, ratio in RAABIN_RATIOS.items():
        assert abs(counts[cls] / counts["neutrophil"] - ratio) < 0.002 + 1 / counts["neutrophil"]
    # some class is exhausted (the reference size is the largest feasible one)
    available = pbc_split[pbc_split.split == "train"].groupby("label").size()
    assert any(counts[c] == available[c] for c in RAABIN_RATIOS)
    assert counts["basophil"] / counts.sum() < 0.025


def test_raabin_imbalance_is_deterministic_and_recorded(pbc_split):
    a, b, c = (imbalanced_train(pbc_split, seed=s) for s in (0, 0, 1))
    assert a.attrs["imbalance"]["train_relpaths_sha256"] == b.attrs["imbalance"]["train_relpaths_sha256"]
    assert a.attrs["imbalance"]["train_relpaths_sha256"] != c.attrs["imbalance"]["train_relpaths_sha256"]
    assert a.attrs["imbalance"]["train_counts"] == c.attrs["imbalance"]["train_counts"]
    with pytest.raises(LeukemiaError, match="blast"):
        imbalanced_train(pbc_split, {"neutrophil": 1.0, "blast": 0.1})


# --- ConvNeXtV2–Swin hybrid ---------------------------------------------------------------
def test_hybrid_and_branches_are_registered_and_train():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    hybrid = create_model("convnextv2_swin_hybrid_atto", 5, **size_kwargs("convnextv2_swin_hybrid_atto", 64))
    cnn = create_model("convnextv2_branch_atto", 5, image_size=64)
    swin = create_model("swin_branch_atto", 5, image_size=64)
    assert hybrid(x).shape == cnn(x).shape == swin(x).shape == (2, 5)
    assert hybrid.num_features == cnn.num_features + swin.num_features
    hybrid(x).logsumexp(1).sum().backward()
    for branch in (hybrid.cnn, hybrid.swin):  # both branches get gradient through the fusion
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
    with pytest.raises(UnknownNameError, match="pretrained"):
        create_model("convnextv2_swin_hybrid_atto", 5, pretrained=True)
    with pytest.raises(LeukemiaError, match="divisible by 32"):
        create_model("convnextv2_swin_hybrid_atto", 5, image_size=48)


def test_hybrid_grad_cam_target_is_the_convolutional_branch():
    from leukemia_core.explain.cams import cam_target
    hybrid = create_model("convnextv2_swin_hybrid_atto", 3, image_size=64)
    target = cam_target(hybrid, 64)
    assert target.layers == [hybrid.cnn.stages[-1]]


def test_r3gan_training_resumes_exactly(tmp_path):
    """Killed after 3 of 6 steps and resumed from its state, the GAN ends with the EMA
    generator and loss history of an uninterrupted run."""
    from leukemia_core.gan.train import train_r3gan

    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    kw = dict(num_classes=2, steps=6, batch=4, net={"base": 8, "max_width": 16}, log_every=1, seed=1)
    whole = train_r3gan(images, [0, 1] * 6, **kw)
    train_r3gan(images, [0, 1] * 6, state_dir=tmp_path, stop_after_steps=3, **kw)
    again = train_r3gan(images, [0, 1] * 6, state_dir=tmp_path, resume=True, **kw)
    assert again.history == whole.history
    for (k, a), b in zip(whole.generator.state_dict().items(), again.generator.state_dict().values()):
        assert torch.equal(a, b), k


# --- the chapter's experiment (leukemia_core.experiments.r3gan_hybrid) ---------------------
def _fake_rows(val_f1: dict, test_f1: dict, baso: float = 0.5) -> dict:
    """Rows of one seed each with the given validation/test macro-F1 (what ``run_row`` keeps)."""
    def result(name):
        per_class = {c: {"recall": baso if c == "basophil" else 0.9, "precision": 0.9, "f1": 0.9, "support": 2}
                     for c in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")}
        test = {"accuracy": 0.8, "macro_f1": test_f1[name], "n": 10, "per_class": per_class,
                "probs": [[0.2] * 5], "targets": [0]}
        return {"seed": 0, "val": {"macro_f1": val_f1[name]}, "test": test, "history": [{"epoch": 0}],
                "n_train": 20, "n_synthetic": 4 if "R3GAN" in name else 0, "size": 32, "wall_s": 1.0,
                "data": type("Data", (), {"table": pd.DataFrame({"relpath": ["a.jpg"], "split": ["train"]})})(),
                "recipe": {"model": "efficientnet_lite0" if "hybrid" not in name else "convnextv2_swin_hybrid_atto"}}
    return {n: [result(n)] for n in val_f1}


def test_r3gan_experiment_rows_and_headline_are_chosen_on_validation():
    from leukemia_core.experiments import r3gan_hybrid as exp
    from leukemia_core.reproducibility.registry import load_claims

    assert list(exp.run.__code__.co_varnames[:6]) == ["profile", "seeds", "data_root", "out", "results_dir", "resume"]
    headline = load_claims()["papers"][exp.PAPER_ID]["headline"]["row"]
    assert headline in exp.ABLATION  # the pre-registered row is one the experiment trains
    names = exp.ABLATION + exp.BRANCHES[1:]
    assert exp.slug("+ R3GAN synthetic") == "r3gan_synthetic" and len({exp.slug(n) for n in names}) == len(names)
    # validation picks the best row, even where another row has the better test score
    val = {n: 0.5 for n in exp.ABLATION} | {"hybrid": 0.9}
    test = {n: 0.5 for n in exp.ABLATION} | {"+ CLAHE": 0.99, "+ R3GAN synthetic": 0.6, "+ oversampling": 0.4}
    s = exp.headline_summary(_fake_rows(val, test), headline)
    assert s["best"] == "hybrid" and s["b_f1"] == 0.5 and not s["met"]
    assert s["delta"]["macro-F1"] == pytest.approx(0.2) and s["delta"]["accuracy"] == 0
    table = exp.table_of(_fake_rows(val, test), ["+ CLAHE", "+ R3GAN synthetic"])
    assert table.loc["+ CLAHE", "macro-F1"] == "99.0%" and table.loc["+ R3GAN synthetic", "training images (generated)"] == "20 (4)"


def test_r3gan_experiment_gan_checks():
    from leukemia_core.experiments.r3gan_hybrid import gan_checks

    q = pd.DataFrame({"recall": [0.5, 0.4], "precision": [0.7, 0.6], "FID": [10.0, 12.0],
                      "FID real train vs val": [8.0, 8.0], "NN distance, generated": [2.0, 3.0],
                      "NN distance, real val": [1.0, 1.0]}, index=["monocyte", "basophil"])
    good = gan_checks(q, tstr=0.8, trtr=0.9)
    assert good["good"] and good["recall"] == pytest.approx(0.45) and list(good["nn_x"]) == [2.0, 3.0]
    assert not gan_checks(q, tstr=0.4, trtr=0.9)["good"]  # TSTR not halfway from chance (1/3) to TRTR
    assert not gan_checks(q.assign(recall=0.0), tstr=0.8, trtr=0.9)["good"]  # collapsed: no recall
    assert gan_checks(q.drop(columns="recall"), 0.8, 0.9) is None  # nothing measured (too few images)


def test_r3gan_experiment_writes_one_results_file_per_row(tmp_path):
    """The ablation's results: one valid JSON per row, only the headline row marked
    pre-registered, metrics from the test split and validation macro-F1 beside them."""
    import json

    from leukemia_core.config import get_profile
    from leukemia_core.experiments import r3gan_hybrid as exp
    from leukemia_core.reproducibility.results import validate

    names = ["+ oversampling", "hybrid + CLAHE + R3GAN"]
    rows = _fake_rows(dict(zip(names, (0.6, 0.7))), dict(zip(names, (0.5, 0.8))), baso=0.25)
    full = pd.DataFrame({"relpath": ["a.jpg"], "split": ["train"]})
    full.attrs["split_sha256"] = "0" * 64
    P = get_profile("smoke")
    ctx = exp.Context(P, {"image_size": 32}, [0], full, full, {"seed": 0}, tmp_path, rows=rows)
    gan = type("GAN", (), {"checkpoint_sha256": "f" * 64})()
    written = exp.write_ablation_results(ctx, tmp_path, "hybrid + CLAHE + R3GAN", gan)
    assert [p.name for p in written] == ["r3gan_ablation_oversampling.json", "r3gan_ablation_hybrid_clahe_r3gan.json"]
    a, b = (json.loads(p.read_text()) for p in written)
    assert not validate(a) and not validate(b)
    assert "selected_on" not in a and b["selected_on"] == "pre-registered"
    assert b["metrics"]["test"]["macro_f1"] == 0.8 and b["metrics"]["val"]["macro_f1"] == 0.7
    assert b["metrics"]["test"]["basophil_recall"] == 0.25 and "probs" not in b["metrics"]["per_seed"][0]
    assert b["config"]["gan_checkpoint_sha256"] == "f" * 64 and b["config"]["n_synthetic"] == 4
