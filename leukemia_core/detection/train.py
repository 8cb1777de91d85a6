"""Training and evaluation loops: the detector under a sparse-annotation regime,
COCO mAP with torchmetrics, and the attribute head on RoIAlign features."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchmetrics.detection import MeanAveragePrecision

from leukemia_core.detection.data import CLASSES, collate
from leukemia_core.detection.model import WBCDetector
from leukemia_core.detection.sparse import (
    OUTSIDE_WEIGHT,
    PSEUDO_CONF,
    PSEUDO_IOU,
    location_weights,
    regime_targets,
)
from leukemia_core.engine.checkpoint import read_state
from leukemia_core.engine.loop import Callback, LoopConfig, Task, train
from leukemia_core.errors import CheckpointError


@dataclass
class DetTrainConfig:
    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    regime: str = "full"
    outside_weight: float = OUTSIDE_WEIGHT
    pseudo_start: int = 1  # first epoch (0-based) that uses pseudo-labels (masked regime)
    pseudo_conf: float = PSEUDO_CONF
    pseudo_iou: float = PSEUDO_IOU
    repeat_threshold: float | None = None  # repeat-factor sampling of rare classes (None: plain shuffle)
    seed: int = 0


def _weights_fn(regime: str, outside_weight: float):
    if regime != "masked":
        return None

    def fn(anchors, targets, image_list, sizes):
        return location_weights(anchors, _scaled_patches(targets, image_list, sizes), outside_weight)
    return fn


def _scaled_patches(targets, image_list, sizes):
    """Each target's patch (original pixels) in the transformed image's pixels."""
    return [t["patch"] * t["patch"].new_tensor([w / ow, h / oh, w / ow, h / oh])
            for t, (h, w), (oh, ow) in zip(targets, image_list.image_sizes, sizes)]


def _pseudo_fn(cfg: DetTrainConfig, counter: list[int]):
    """Masked regime: add the model's own confident detections outside the patch
    (score >= ``pseudo_conf``, class-agnostic NMS at ``pseudo_iou``) to the targets."""
    def fn(detections, targets, image_list, sizes):
        patched = [{**t, "patch": p} for t, p in zip(targets, _scaled_patches(targets, image_list, sizes))]
        out = regime_targets("masked", patched, detections, cfg.pseudo_conf, cfg.pseudo_iou)
        counter[0] += sum(len(o["boxes"]) - len(t["boxes"]) for o, t in zip(out, targets))
        return [{**o, "patch": t["patch"]} for o, t in zip(out, targets)]
    return fn


def repeat_factors(dataset, threshold: float | None) -> torch.Tensor:
    """LVIS repeat-factor sampling (Gupta et al. 2019) over the *labelled* boxes: class
    ``c`` present in a fraction ``f_c`` of the images gets ``r_c = max(1, sqrt(t / f_c))``;
    an image repeats by the largest ``r_c`` of its classes. ``threshold=None``: all 1."""
    labels = [set(t["labels"].tolist()) for t in dataset.targets]
    if threshold is None:
        return torch.ones(len(labels))
    freq = {c: sum(c in s for s in labels) / max(1, len(labels)) for c in range(len(CLASSES))}
    r = {c: max(1.0, math.sqrt(threshold / f)) if f > 0 else 1.0 for c, f in freq.items()}
    return torch.tensor([max([r[c] for c in s], default=1.0) for s in labels])


class _PseudoSchedule(Callback):
    """Reseeds the loader's sampling generator from the epoch; counts the pseudo-label
    boxes an epoch adds (masked regime), saved with the training state."""

    def __init__(self, seed: int, gen: torch.Generator):
        self.seed, self.gen, self.count = seed, gen, 0

    def on_epoch_start(self, state):
        self.gen.manual_seed(self.seed * 10007 + state.epoch)
        self.count = 0

    def on_step_end(self, state, out):
        self.count += int(out.get("pseudo_boxes", 0))

    def on_epoch_end(self, state, record):
        record["pseudo_boxes"] = self.count

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, tensors):
        if tensors:
            self.gen.set_state(tensors["gen"])

    def extra_state(self):
        return {"count": self.count}

    def load_extra_state(self, extra):
        self.count = extra.get("count", self.count)


class DetectorTask(Task):
    """FCOS training with the regime's location weights and, from ``pseudo_start`` on in
    the masked regime, the model's own confident detections as extra targets."""

    def __init__(self, cfg: DetTrainConfig, gen: torch.Generator):
        self.cfg, self.callbacks = cfg, (_PseudoSchedule(cfg.seed, gen),)

    def param_groups(self, model, config):
        return [{"params": [p for p in model.fcos.parameters() if p.requires_grad],
                 "weight_decay": config.weight_decay}]

    def to_device(self, batch, device, config):
        images, targets = batch
        return ([im.to(device) for im in images],
                [{k: t[k].to(device) for k in ("boxes", "labels", "patch")} for t in targets])

    def training_step(self, net, batch, state):
        images, targets = batch
        cfg = self.cfg
        use_pseudo = cfg.regime == "masked" and state.epoch >= cfg.pseudo_start
        outside = cfg.outside_weight if use_pseudo else 0.0
        n_pseudo = [0]
        loss_dict = net(list(images), targets, weights_fn=_weights_fn(cfg.regime, outside),
                        targets_fn=_pseudo_fn(cfg, n_pseudo) if use_pseudo else None)
        return {"loss": sum(loss_dict.values()), "n": len(images), "pseudo_boxes": n_pseudo[0]}


def train_detector(model: WBCDetector, dataset, cfg: DetTrainConfig, log=print, out_dir=None,
                   resume: bool = False, stop_after_steps: int | None = None) -> list[dict]:
    """The one loop (AdamW, warm-up and cosine decay, resumable with ``out_dir``); returns
    per-epoch rows: ``epoch`` (1-based), mean ``loss``, ``pseudo_boxes`` added, ``seconds``."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.repeat_threshold is None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    else:  # same number of samples per epoch, drawn with repeat factors as weights
        sampler = WeightedRandomSampler(repeat_factors(dataset, cfg.repeat_threshold), len(dataset), generator=gen)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    steps = max(1, len(loader))
    config = LoopConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_epochs=cfg.warmup_steps / steps, warmup_lr_ratio=1 / max(1, cfg.warmup_steps),
                        min_lr_ratio=0.0, seed=cfg.seed, grad_clip=10.0, monitor=None,
                        progress=False)
    r = train(model, loader, DetectorTask(cfg, gen), config, out_dir=out_dir, resume=resume,
              device=next(model.parameters()).device, stop_after_steps=stop_after_steps)
    history = [{"epoch": h["epoch"] + 1, "loss": h["train_loss"], "pseudo_boxes": h["pseudo_boxes"],
                "seconds": h["train_time_s"]} for h in r.history]
    for h in history:
        log(f"[{cfg.regime}] epoch {h['epoch']}/{cfg.epochs} loss {h['loss']:.3f} "
            f"pseudo {h['pseudo_boxes']} ({h['seconds']:.0f}s)")
    model.eval()
    return history


@torch.no_grad()
def predict(model: WBCDetector, dataset, batch_size: int = 8) -> list[dict]:
    """Detections (original-image pixels of the dataset's resized image) per item."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        for d in model([im.to(dev) for im in images]):
            out.append({k: ({a: x.cpu() for a, x in v.items()} if isinstance(v, dict) else v.cpu())
                        for k, v in d.items()})
    return out


def detection_metrics(preds: list[dict], targets: list[dict]) -> dict:
    """mAP@0.5, mAP@[0.5:0.95] and per-class AP at both, via torchmetrics (COCO backend)."""
    out = {}
    for key, thr in (("map_50", [0.5]), ("map", None)):
        m = MeanAveragePrecision(iou_thresholds=thr, class_metrics=True)
        m.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
                 [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        r = m.compute()
        out[key] = float(r["map"])
        present = r["classes"].reshape(-1).tolist()
        per = r["map_per_class"].reshape(-1).tolist()
        for c, name in enumerate(CLASSES):
            out[f"AP{'50' if thr else ''}_{name}"] = float(per[present.index(c)]) if c in present else None
    out["n_images"] = len(targets)
    return out


def evaluate_detector(model: WBCDetector, dataset, batch_size: int = 8, groups=None) -> dict:
    """Metrics on the whole dataset and, when ``groups`` (one key per item) is given, per group."""
    preds = predict(model, dataset, batch_size)
    targets = [dataset[i][1] for i in range(len(dataset))]
    out = {"all": detection_metrics(preds, targets)}
    if groups is not None:
        groups = list(groups)
        for g in sorted(set(groups)):
            idx = [i for i, k in enumerate(groups) if k == g]
            out[g] = detection_metrics([preds[i] for i in idx], [targets[i] for i in idx])
    return out, preds


# ----------------------------------------------------------------------------- attributes
@torch.no_grad()
def roi_features(model: WBCDetector, images: list[torch.Tensor], boxes: list[torch.Tensor],
                 batch_size: int = 32) -> torch.Tensor:
    """RoIAlign features ([n_boxes, C, 7, 7]) of given boxes (image pixels), frozen detector."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        ims = [im.to(dev) for im in images[i:i + batch_size]]
        image_list, feats, _ = model.features(ims)
        scaled = []
        for b, im, (h, w) in zip(boxes[i:i + batch_size], ims, image_list.image_sizes):
            sy, sx = h / im.shape[-2], w / im.shape[-1]
            scaled.append(b.to(dev) * torch.tensor([sx, sy, sx, sy], device=dev))
        out.append(model.attr_head.pooled(feats, scaled, image_list.image_sizes).cpu())
    return torch.cat(out)


class _Permutation:
    """One epoch of index batches over ``n`` items, a permutation drawn from the global
    RNG (which the loop seeds from the epoch)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n)
        return iter(perm.split(self.batch_size))


class AttributeTask(Task):
    """The attribute head on frozen RoIAlign features: cross-entropy summed over
    attributes; validation = mean attribute accuracy on a validation split."""

    def __init__(self, feats: torch.Tensor, targets: torch.Tensor, val=None):
        self.feats, self.targets, self.val = feats, targets, val

    def param_groups(self, head, config):
        return [{"params": list(head.mlp.parameters()), "weight_decay": config.weight_decay}]

    def to_device(self, idx, device, config):
        return idx.to(device)

    def training_step(self, head, idx, state):
        logits = head.classify(self.feats[idx])
        loss = sum(torch.nn.functional.cross_entropy(lg, self.targets[idx, j]) for j, lg in enumerate(logits.values()))
        return {"loss": loss, "n": len(idx)}

    def validate(self, head, state):
        if self.val is None:
            return None
        acc = (attribute_predictions(head, self.val[0]) == self.val[1].cpu()).float().mean().item()
        head.train()
        return {"accuracy": acc}


def train_attribute_head(head, feats: torch.Tensor, targets: torch.Tensor, epochs: int = 30,
                         lr: float = 1e-3, batch_size: int = 128, seed: int = 0, val=None,
                         out_dir=None, resume: bool = False) -> list[dict]:
    """Cross-entropy summed over attributes; ``targets`` [n, n_attributes] value indices;
    the one loop (constant learning rate, resumable with ``out_dir``).

    ``val`` (features, targets): after every epoch the mean attribute accuracy on these
    (a validation split, never the test one) is recorded, and the head ends with the
    weights of its best epoch. Returns one row per epoch (loss, val accuracy, selected)."""
    torch.manual_seed(seed)
    dev = next(head.parameters()).device
    task = AttributeTask(feats.to(dev), targets.to(dev), val)
    config = LoopConfig(epochs=epochs, lr=lr, weight_decay=1e-3, warmup_epochs=0.0, warmup_lr_ratio=1.0,
                        min_lr_ratio=1.0, seed=seed, amp=False, channels_last=False,
                        monitor="accuracy" if val is not None else None, progress=False)
    r = train(head, _Permutation(len(feats), batch_size), task, config, out_dir=out_dir, resume=resume,
              device=dev)
    history = [{"epoch": h["epoch"] + 1, "loss": h["train_loss"],
                **({"val_accuracy": h["val_accuracy"], "selected": h["epoch"] == r.best_epoch}
                   if val is not None else {})} for h in r.history]
    head.eval()
    return history


@torch.no_grad()
def attribute_predictions(head, feats: torch.Tensor) -> torch.Tensor:
    head.eval()
    feats = feats.to(next(head.parameters()).device)
    return torch.stack([lg.argmax(1) for lg in head.classify(feats).values()], dim=1).cpu()


def attribute_metrics(pred: np.ndarray, true: np.ndarray, train_true: np.ndarray, names: list[str]) -> dict:
    """Per attribute: accuracy and macro-F1, and the same for the majority-class floor
    (always predicting the training set's most frequent value)."""
    out = {}
    for j, name in enumerate(names):
        major = np.bincount(train_true[:, j]).argmax()
        floor = np.full_like(true[:, j], major)
        out[name] = {"accuracy": accuracy_score(true[:, j], pred[:, j]),
                     "macro_f1": f1_score(true[:, j], pred[:, j], average="macro", zero_division=0),
                     "majority_accuracy": accuracy_score(true[:, j], floor),
                     "majority_macro_f1": f1_score(true[:, j], floor, average="macro", zero_division=0)}
    return out


# ----------------------------------------------------------------------------- checkpoints
def save_detector(model: WBCDetector, path, attribute_values: dict | None = None) -> None:
    """Weights as safetensors in the one checkpoint format (kind ``detector``): the model's
    config and the attribute value names in its metadata."""
    from leukemia_core.engine.checkpoint import save_weights

    save_weights(Path(path), model, {"kind": "detector", "config": dict(model.config),
                                     "attribute_values": dict(attribute_values or {})})


def load_detector(path) -> tuple[WBCDetector, dict]:
    """A detector saved by :func:`save_detector` (also the earlier layout, with the config
    as its own metadata key) and its attribute value names."""
    from leukemia_core.engine.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    if meta["kind"] != "detector":
        raise CheckpointError(f"{path} is a {meta['kind']} checkpoint, not a detector written by save_detector")
    cfg = meta["config"]
    model = WBCDetector(attributes=cfg["attributes"], short_side=cfg["short_side"], fpn_channels=cfg["fpn_channels"],
                        head_convs=cfg["head_convs"], pretrained=False, score_thresh=cfg["score_thresh"],
                        detections_per_img=cfg["detections_per_img"], attr_hidden=cfg.get("attr_hidden", 256))
    try:
        model.load_state_dict(read_state(path))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the detector its metadata describes: {exc}") from exc
    return model.eval(), dict(meta.get("attribute_values") or {})
