"""Training and evaluation loops: the detector under a sparse-annotation regime,
COCO mAP with torchmetrics, and the attribute head on RoIAlign features."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchmetrics.detection import MeanAveragePrecision

from ..errors import CheckpointError
from .data import CLASSES, collate
from .model import WBCDetector
from .sparse import OUTSIDE_WEIGHT, PSEUDO_CONF, PSEUDO_IOU, location_weights, regime_targets


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


def train_detector(model: WBCDetector, dataset, cfg: DetTrainConfig, log=print) -> list[dict]:
    """AdamW with linear warm-up and cosine decay; returns per-epoch loss history."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.repeat_threshold is None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    else:  # same number of samples per epoch, drawn with repeat factors as weights
        sampler = WeightedRandomSampler(repeat_factors(dataset, cfg.repeat_threshold), len(dataset), generator=gen)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    params = [p for p in model.fcos.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              * 0.5 * (1 + math.cos(math.pi * s / total)))
    dev = next(model.parameters()).device
    history = []
    for epoch in range(cfg.epochs):
        start, losses, n_pseudo = time.perf_counter(), [], [0]
        use_pseudo = cfg.regime == "masked" and epoch >= cfg.pseudo_start
        outside = cfg.outside_weight if use_pseudo else 0.0
        model.train()
        for images, targets in loader:
            images = [im.to(dev) for im in images]
            targets = [{k: t[k].to(dev) for k in ("boxes", "labels", "patch")} for t in targets]
            loss_dict = model(list(images), targets, weights_fn=_weights_fn(cfg.regime, outside),
                              targets_fn=_pseudo_fn(cfg, n_pseudo) if use_pseudo else None)
            loss = sum(loss_dict.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "pseudo_boxes": n_pseudo[0],
                        "seconds": time.perf_counter() - start})
        log(f"[{cfg.regime}] epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['loss']:.3f} "
            f"pseudo {n_pseudo[0]} ({history[-1]['seconds']:.0f}s)")
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


def train_attribute_head(head, feats: torch.Tensor, targets: torch.Tensor, epochs: int = 30,
                         lr: float = 1e-3, batch_size: int = 128, seed: int = 0, val=None) -> list[dict]:
    """Cross-entropy summed over attributes; ``targets`` [n, n_attributes] value indices.

    ``val`` (features, targets): after every epoch the mean attribute accuracy on these
    (a validation split, never the test one) is recorded, and the head ends with the
    weights of its best epoch. Returns one row per epoch (loss, val accuracy, selected)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=lr, weight_decay=1e-3)
    dev = next(head.parameters()).device
    feats, targets = feats.to(dev), targets.to(dev)
    n, history, best = len(feats), [], (-1.0, None, 0)
    for epoch in range(1, epochs + 1):
        head.train()
        perm, total = torch.randperm(n, device=dev), 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            logits = head.classify(feats[idx])
            loss = sum(torch.nn.functional.cross_entropy(lg, targets[idx, j])
                       for j, lg in enumerate(logits.values()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "loss": total / n}
        if val is not None:
            row["val_accuracy"] = (attribute_predictions(head, val[0]) == val[1].cpu()).float().mean().item()
            if row["val_accuracy"] > best[0]:
                best = (row["val_accuracy"], copy.deepcopy(head.state_dict()), epoch)
        history.append(row)
    if val is not None:
        head.load_state_dict(best[1])
        for row in history:
            row["selected"] = row["epoch"] == best[2]
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
    from ..engine.checkpoint import save_weights

    save_weights(Path(path), model, {"kind": "detector", "config": dict(model.config),
                                     "attribute_values": dict(attribute_values or {})})


def load_detector(path) -> tuple[WBCDetector, dict]:
    """A detector saved by :func:`save_detector` (also the earlier layout, with the config
    as its own metadata key) and its attribute value names."""
    from ..engine.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    if meta["kind"] != "detector":
        raise CheckpointError(f"{path} is a {meta['kind']} checkpoint, not a detector written by save_detector")
    cfg = meta["config"]
    model = WBCDetector(attributes=cfg["attributes"], short_side=cfg["short_side"], fpn_channels=cfg["fpn_channels"],
                        head_convs=cfg["head_convs"], pretrained=False, score_thresh=cfg["score_thresh"],
                        detections_per_img=cfg["detections_per_img"], attr_hidden=cfg.get("attr_hidden", 256))
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the detector its metadata describes: {exc}") from exc
    return model.eval(), dict(meta.get("attribute_values") or {})
