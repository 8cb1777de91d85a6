"""FCMAE (ConvNeXtV2's masked-autoencoder pretraining): hidden patches never reach the
encoder, the loss counts hidden patches only, and the encoder is the hybrid's branch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leukemia_core.models.fcmae import FCMAE


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return FCMAE("convnextv2_atto", image_size=64, mask_ratio=0.5, decoder_dim=32).eval()


def _change_hidden(m: FCMAE, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with new random pixels in the hidden patches only."""
    hidden = m.unpatchify(mask.unsqueeze(-1).expand(-1, -1, m.patch ** 2 * 3)).bool()
    return torch.where(hidden, torch.randn_like(x) * 5, x)


def test_hidden_patches_do_not_reach_the_encoder(mae):
    x = torch.randn(3, 3, 64, 64)
    mask = mae.random_mask(3)
    with torch.no_grad():
        a, b = mae.encode(x, mask), mae.encode(_change_hidden(mae, x, mask), mask)
    torch.testing.assert_close(a, b)
    keep = 1 - mask.view(3, 1, 2, 2)
    assert (a * (1 - keep)).abs().max() == 0  # hidden positions are zero
    assert (a * keep).abs().max() > 0


def test_every_grn_sees_hidden_positions_as_zero(mae):
    """Sparse-convolution semantics for the Global Response Normalisation: its per-channel
    norms must sum over visible positions only. The layer before it has a bias, so without
    the input masking the hidden positions reach it non-zero (the check can fail)."""
    grns = [b.mlp.grn for s in mae.encoder.stages for b in s.blocks]
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])

    def grn_inputs():
        seen = []
        # registered after the model's own hooks, so each spy sees what the GRN computes on
        spy = [g.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for g in grns]
        with torch.no_grad():
            mae.encode(x, mask)
        for h in spy:
            h.remove()
        hidden = [torch.nn.functional.interpolate(mask.view(2, 1, 2, 2), size=t.shape[-2:]) for t in seen]
        return [float((t * h).abs().max()) for t, h in zip(seen, hidden)]

    assert len(grn_inputs()) == len(grns) and max(grn_inputs()) == 0
    for h in mae._hooks:  # keep only the stem / block output masking
        h.remove()
    mae._hooks = [mae.encoder.stem.register_forward_hook(mae._zero_output)] + [
        b.register_forward_hook(mae._zero_output) for s in mae.encoder.stages for b in s.blocks]
    assert min(grn_inputs()) > 0


def test_masks_hide_an_exact_share_and_replay_with_the_seed(mae):
    torch.manual_seed(5)
    m1 = mae.random_mask(8)
    torch.manual_seed(5)
    assert torch.equal(m1, mae.random_mask(8))
    assert (m1.sum(1) == 2).all()  # 0.5 of a 2 x 2 grid
    with pytest.raises(ValueError, match="divisible"):
        FCMAE(image_size=48)
    with pytest.raises(ValueError, match="hides none or all"):
        FCMAE(image_size=32, mask_ratio=0.6)


def test_loss_counts_hidden_patches_only_and_reconstruction_keeps_the_visible_ones(mae):
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(mae.unpatchify(mae.patchify(x)), x)
    mask = mae.random_mask(2)
    with torch.no_grad():
        pred = mae(x, mask)
    assert pred.shape == (2, 4, 32 * 32 * 3)
    other = torch.where(mask.bool().unsqueeze(-1), pred, pred + 3.0)  # visible predictions changed
    assert torch.isclose(mae.loss(x, pred, mask), mae.loss(x, other, mask))
    rec = mae.reconstruct(x, mask)
    keep = mae.unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, 32 * 32 * 3)).bool()
    assert torch.equal(rec[keep], x[keep])


def test_a_few_steps_learn_and_the_encoder_is_the_hybrid_branch(mae):
    from leukemia_core.models.hybrid import ConvNeXtV2SwinHybrid

    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64).cumsum(-1) / 8  # smooth images: predictable from context
    mae.train()
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        mask = mae.random_mask(4)
        loss = mae.loss(x, mae(x, mask), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    hybrid = ConvNeXtV2SwinHybrid(3, "atto", 64, branches=("cnn",))
    hybrid.cnn.load_state_dict(mae.encoder.state_dict())  # strict: the same network


def test_pretraining_on_a_tiny_pool_writes_a_checkpoint_the_one_loader_rebuilds(tmp_path):
    """The loop trains FCMAE on unlabelled images with a monitoring curve; the checkpoint
    (kind ``fcmae``) reloads with the same encoder and carries the preprocessing."""
    import pandas as pd
    from PIL import Image

    from leukemia_core.checkpoints import load_checkpoint
    from leukemia_core.ssl import FCMAEConfig, pretrain_fcmae

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(p)
        rows.append({"path": str(p), "relpath": p.name, "dataset": "toy" if i % 2 else "other"})
    cfg = FCMAEConfig(image_size=64, decoder_dim=32, epochs=2, batch_size=8, monitor_images=8, num_workers=0,
                      mask_ratio=0.5)
    model, result = pretrain_fcmae(pd.DataFrame(rows), cfg, out_dir=tmp_path / "run")
    assert len(result.history) == 2 and all("val_loss" in h for h in result.history)
    loaded, meta, prep = load_checkpoint(tmp_path / "run")
    assert meta["kind"] == "fcmae" and meta["pool_images"] == 16 and meta["monitor_images"] == 8
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[k], v)
    x, ok = prep(Image.open(rows[0]["path"]))
    assert ok and x.shape == (3, 64, 64)


def test_pretraining_run_results_carry_what_a_model_card_needs(tmp_path):
    """The run's results.json: the pool's datasets (for the licences) and hash, the history,
    the summed training time; resuming a finished run keeps the finishing session's wall time."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from leukemia_core.config import get_profile
    from leukemia_core.data.pretraining_pool import POOL_FILE
    from leukemia_core.experiments.r3gan_hybrid import write_pretraining_results
    from leukemia_core.reproducibility.reference import sha256
    from leukemia_core.ssl import FCMAEConfig

    pool = pd.DataFrame({"dataset": ["pbc", "matek", "pbc"], "relpath": ["a", "b", "c"]})
    history = [{"epoch": 0, "train_loss": 0.9, "val_loss": 0.8, "train_time_s": 10.0},
               {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "train_time_s": 12.0}]
    result = SimpleNamespace(history=history)
    path = write_pretraining_results(tmp_path, get_profile("smoke"), FCMAEConfig(), pool, result, 30.0)
    data = json.loads(path.read_text())
    assert data["datasets"] == ["matek", "pbc"] and data["data_sha256"] == sha256(POOL_FILE)
    assert data["train_time_s"] == 22.0 and data["wall_time_s"] == 30.0
    assert data["metrics"]["final_monitor_loss"] == 0.6 and data["kind"] == "fcmae_pretraining"
    again = json.loads(write_pretraining_results(tmp_path, get_profile("smoke"), FCMAEConfig(), pool, result,
                                                 1.0).read_text())
    assert again["wall_time_s"] == 30.0


@pytest.mark.slow
def test_fcmae_reference_publish_and_live_evaluation_on_the_mirror(data_root, tmp_path):
    """An FCMAE run (untrained weights, 64 px) published as the chapter's reference encoder
    and evaluated live on PBC's test images: the card's masked loss is what the live
    evaluation measures, the masks are the same every call, and the reconstructions come back
    as images; an unfinished run is reported, not published."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from leukemia_core.config import get_profile
    from leukemia_core.data.transforms import preprocess_dict
    from leukemia_core.engine.checkpoint import save_weights
    from leukemia_core.experiments import r3gan_hybrid as experiment
    from leukemia_core.models.fcmae import FCMAE
    from leukemia_core.reproducibility import reference
    from leukemia_core.ssl import FCMAEConfig

    cfg = FCMAEConfig(image_size=64, decoder_dim=32, epochs=1)
    run = tmp_path / "runs" / f"fcmae_{cfg.encoder}_s0"
    run.mkdir(parents=True)
    notes = []
    assert experiment.publish_fcmae_reference(tmp_path / "runs", data_root, tmp_path / "ref", log=notes.append) == []
    assert "not finished" in notes[0]
    torch.manual_seed(0)
    mae = FCMAE(cfg.encoder, 64, 0.6, 32)
    save_weights(run / "model.safetensors", mae, {"kind": "fcmae", "encoder": cfg.encoder, "image_size": 64,
                                                  "mask_ratio": 0.6, "decoder_dim": 32,
                                                  "preprocess": preprocess_dict(64, [0.8, 0.7, 0.7], [0.2, 0.2, 0.1])})
    history = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "train_time_s": 1.0}]
    experiment.write_pretraining_results(run, get_profile("smoke"), cfg, pd.DataFrame({"dataset": ["pbc"]}),
                                         SimpleNamespace(history=history), 2.0)
    root = tmp_path / "ref"
    [folder] = experiment.publish_fcmae_reference(tmp_path / "runs", data_root, root)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["dtype"] in ("int8", "float16", "float32") and card["metrics"]["n"] > 1000
    ev = experiment.evaluate_fcmae_reference(data_root, tmp_path / "results", root)
    assert ev["check"]["status"] == "verified"
    assert ev["metrics"]["test"]["masked_loss"] == pytest.approx(card["metrics"]["masked_loss"], abs=1e-6)
    written = json.loads((tmp_path / "results" / "reference" / "r3gan_hybrid_fcmae_convnextv2_atto.json").read_text())
    assert written["metrics"]["test"] == pytest.approx(ev["metrics"]["test"])
    imgs = ev["images"]
    assert imgs["labels"] == experiment.CLASSES and imgs["original"].shape == (5, 64, 64, 3)
    grey = (imgs["masked"] == 0.5).all(-1)  # hidden patches are grey, the rest is the image
    assert 0.4 <= grey.mean() <= 0.8  # mask ratio 0.6 of 4 patches of 32 px
    np.testing.assert_array_equal(imgs["masked"][~grey], imgs["original"][~grey])
    assert imgs["reconstruction"].shape == imgs["original"].shape
    assert reference.EXPECTED["08_r3gan_hybrid"] == (experiment.FCMAE_REFERENCE,)
    missing = reference.check("08_r3gan_hybrid", experiment.FCMAE_REFERENCE, tmp_path / "empty")
    assert "leukemia-core pretrain fcmae --profile reference" in missing["message"]
    capped = experiment.evaluate_fcmae_reference(data_root, tmp_path / "results", root, per_class=2)
    assert capped["metrics"]["test"]["n"] == 10
    assert (tmp_path / "results" / "smoke" / "reference" / "r3gan_hybrid_fcmae_convnextv2_atto.json").exists()
