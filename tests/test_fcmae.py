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
