"""FCMAE pretraining with the one training loop: unlabelled images of the pretraining pool
(:mod:`leukemia_core.data.pretraining_pool`: training splits only, no copy of any image the
book evaluates on), random masks drawn from torch's RNG (so a resumed run draws the same
ones), the masked reconstruction loss of :class:`~leukemia_core.models.fcmae.FCMAE`, and a
fixed monitoring set (a seeded sample of the pool held out of training, scored with fixed
masks) for the curves. The last epoch's weights are kept, as in the paper.

What differs from the ConvNeXtV2 paper (beyond the model's sizes, see
:mod:`leukemia_core.models.fcmae`): the book's single-cell augmentation (flips, right-angle
rotations, mild colour jitter) instead of random resized crops, which would cut cells in
half at 128 px; tens of epochs on about 16,000 cells instead of 800-1600 on ImageNet, with
learning rate 1e-3 for batch 64 (the paper's linear scaling, 1.5e-4 x batch / 256, is meant
for its 20x longer schedule); AdamW's default betas.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.data.torch_dataset import ImageTableDataset
from leukemia_core.data.transforms import build_transform, preprocess_dict, static_transform
from leukemia_core.engine.loop import LoopConfig, LoopResult, LoopState, Task, train
from leukemia_core.models.fcmae import FCMAE


@dataclass
class FCMAEConfig:
    encoder: str = "convnextv2_atto"
    image_size: int = 128
    mask_ratio: float = 0.6
    decoder_dim: int = 256
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    seed: int = 0
    monitor_images: int = 512  # held out of training, for the reconstruction curve
    num_workers: int = 2
    progress: bool = False


class FCMAETask(Task):
    """One step: a fresh random mask per image, the masked reconstruction loss. Validation:
    the same loss on the monitoring images under masks fixed by ``seed``."""

    def __init__(self, monitor_loader=None, seed: int = 0):
        self.monitor_loader, self.seed = monitor_loader, seed

    def training_step(self, net, batch, state: LoopState) -> dict:
        x, _ = batch
        mae = state.model
        mask = mae.random_mask(x.shape[0], x.device)
        return {"loss": mae.loss(x, net(x, mask), mask), "n": len(x)}

    def validate(self, model, state: LoopState) -> dict | None:
        if self.monitor_loader is None:
            return None
        loss = masked_loss(model, self.monitor_loader, self.seed, state.device)["loss"]
        model.train()
        return {"loss": loss}


@torch.no_grad()
def masked_loss(model: FCMAE, loader, seed: int = 0, device=None) -> dict:
    """The pretraining objective on every image of ``loader`` under masks fixed by ``seed``
    (the same masks every call: a checkpoint's score, and the monitoring curve):
    ``{"loss": mean masked reconstruction loss, "n": images}``. Leaves ``model`` in eval mode."""
    model.eval()
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for x, _ in loader:
        x = x.to(device)
        mask = model.random_mask(x.shape[0], generator=g).to(x.device)
        total += float(model.loss(x, model(x, mask), mask)) * len(x)
        n += len(x)
    return {"loss": total / max(n, 1), "n": n}


def _dataset(rows: pd.DataFrame, size: int, train_: bool, mean, std) -> ImageTableDataset:
    t = rows.assign(label=rows["dataset"])
    return ImageTableDataset(t, sorted(t["label"].unique()), build_transform(size, train_, mean, std),
                             preload=static_transform(size))


def pretrain_fcmae(pool: pd.DataFrame, cfg: FCMAEConfig, out_dir=None, resume: bool = False,
                   pool_sha256: str | None = None) -> tuple[FCMAE, LoopResult]:
    """Pretrain on ``pool`` (rows with ``path`` and ``dataset``); writes the loop's files to
    ``out_dir`` (``model.safetensors``: kind ``fcmae``, with the preprocessing the
    fine-tuning must reuse). ``resume`` continues a killed run exactly."""
    from torch.utils.data import DataLoader

    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    monitor_rows = pool.iloc[np.sort(order[:cfg.monitor_images])]
    train_rows = pool.iloc[np.sort(order[cfg.monitor_images:])]
    plain = _dataset(train_rows, cfg.image_size, False, [0.0] * 3, [1.0] * 3)
    # the training images' per-channel statistics, accumulated image by image (no big array)
    s1, s2 = np.zeros(3), np.zeros(3)
    for im in plain.cache:
        px = im.reshape(-1, 3).astype(np.float64) / 255.0
        s1 += px.mean(0)
        s2 += (px ** 2).mean(0)
    mean = s1 / len(plain.cache)
    mean, std = mean.tolist(), np.sqrt(np.maximum(s2 / len(plain.cache) - mean ** 2, 1e-12)).tolist()
    train_ds = plain
    train_ds.transform = build_transform(cfg.image_size, True, mean, std)
    monitor = _dataset(monitor_rows, cfg.image_size, False, mean, std)
    torch.manual_seed(cfg.seed)
    model = FCMAE(cfg.encoder, cfg.image_size, cfg.mask_ratio, cfg.decoder_dim)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    task = FCMAETask(DataLoader(monitor, batch_size=cfg.batch_size * 2), cfg.seed)
    loop = LoopConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                      seed=cfg.seed, monitor=None, channels_last=False, progress=cfg.progress)
    meta = {"kind": "fcmae", "encoder": cfg.encoder, "image_size": cfg.image_size, "mask_ratio": cfg.mask_ratio,
            "decoder_dim": cfg.decoder_dim, "config": dataclasses.asdict(cfg),
            "preprocess": preprocess_dict(cfg.image_size, mean, std), "pool_images": len(train_rows),
            "monitor_images": len(monitor_rows), "pool_sha256": pool_sha256 or _rows_sha(pool)}
    result = train(model, loader, task, loop, out_dir=out_dir, resume=resume, meta=meta)
    return model.eval(), result


def _rows_sha(pool: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(pool["dataset"] + ":" + pool["relpath"])).encode()).hexdigest()


def load_fcmae(path) -> tuple[FCMAE, dict]:
    """Rebuild an ``fcmae`` checkpoint: ``(model in eval mode, meta)``; ``model.encoder`` is
    the ConvNeXtV2 a classifier's branch is fine-tuned from."""
    from leukemia_core.engine.checkpoint import checkpoint_file, load_weights, read_meta
    from leukemia_core.errors import CheckpointError

    path = checkpoint_file(Path(path))
    meta = read_meta(path)
    if meta.get("kind") != "fcmae":
        raise CheckpointError(f"{path} is not an FCMAE checkpoint (kind {meta.get('kind')!r}); pretrain one with "
                              "`leukemia-core run 08_r3gan_hybrid --profile reference`")
    model = FCMAE(meta["encoder"], meta["image_size"], meta["mask_ratio"], meta["decoder_dim"])
    load_weights(path, model)
    return model.eval(), meta
