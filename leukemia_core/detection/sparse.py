"""Sparse annotation, simulated: one annotated patch per training image, and the
three training regimes compared in the chapter.

* ``full``: every box, every location counts (weight 1).
* ``naive``: only the boxes inside the patch; the rest of the image is treated as
  background (weight 1 everywhere), so unlabelled cells become negatives.
* ``masked`` (the paper's): locations inside the patch count with weight 1; outside,
  pseudo-labels from the current model (score >= 0.5, class-agnostic NMS at IoU 0.2)
  are the targets and every outside location counts with weight 0.1. Before
  ``pseudo_start`` (the model is still untrained) the outside weight is 0: a pure mask.

A box belongs to the patch when its centre lies inside it (an annotator labels every
cell whose centre is in the region).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torchvision.ops import nms

REGIMES = ("full", "naive", "masked")
PSEUDO_CONF = 0.5
PSEUDO_IOU = 0.2
OUTSIDE_WEIGHT = 0.1


def sample_patch(width: float, height: float, fraction: float, rng: np.random.Generator) -> list[float]:
    """A random patch with the image's aspect ratio covering ``fraction`` of its area."""
    if not 0 < fraction <= 1:
        raise ValueError(f"patch fraction must be in (0, 1], got {fraction}")
    pw, ph = width * math.sqrt(fraction), height * math.sqrt(fraction)
    x0, y0 = rng.uniform(0, width - pw), rng.uniform(0, height - ph)
    return [x0, y0, x0 + pw, y0 + ph]


def centres_inside(boxes: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Bool mask of the boxes ([N, 4] xyxy) whose centre lies in ``patch`` (xyxy)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= patch[0]) & (cx < patch[2]) & (cy >= patch[1]) & (cy < patch[3])


def sparsify(table: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """Copy of a box table keeping only the boxes inside one random patch per image.

    Adds ``patch`` (xyxy, original pixels) and ``n_boxes_full``; ``fraction=1`` keeps all.
    """
    rng = np.random.default_rng(seed)
    out = table.copy()
    patches, boxes, labels = [], [], []
    for r in table.itertuples():
        patch = sample_patch(r.width, r.height, fraction, rng)
        keep = centres_inside(torch.tensor(r.boxes).reshape(-1, 4), torch.tensor(patch)).tolist()
        patches.append(patch)
        boxes.append([b for b, k in zip(r.boxes, keep) if k])
        labels.append([lab for lab, k in zip(r.labels, keep) if k])
    out["patch"], out["n_boxes_full"] = patches, [len(b) for b in table["boxes"]]
    out["boxes"], out["labels"] = boxes, labels
    return out


def location_weights(anchors: list[torch.Tensor], patches: list[torch.Tensor],
                     outside_weight: float) -> torch.Tensor:
    """[N, HWA] weights: 1 for locations (anchor centres) inside the image's patch,
    ``outside_weight`` elsewhere."""
    out = []
    for a, p in zip(anchors, patches):
        w = torch.full((len(a),), float(outside_weight), device=a.device)
        w[centres_inside(a, p)] = 1.0
        out.append(w)
    return torch.stack(out)


def select_pseudo(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, patch: torch.Tensor,
                  conf: float = PSEUDO_CONF, iou: float = PSEUDO_IOU) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels for the area outside ``patch``: detections with score >= ``conf``,
    class-agnostic NMS at ``iou``, centre outside the patch."""
    keep = scores >= conf
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = nms(boxes, scores, iou)
    boxes, labels = boxes[keep], labels[keep]
    outside = ~centres_inside(boxes, patch)
    return boxes[outside], labels[outside]


def regime_targets(regime: str, targets: list[dict], detections: list[dict] | None,
                   conf: float = PSEUDO_CONF, iou: float = PSEUDO_IOU) -> list[dict]:
    """Training targets of one batch under ``regime`` (``detections``: the current
    model's outputs on the same images, needed by ``masked`` once pseudo-labels start)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime '{regime}'; choose one of {REGIMES}")
    if regime != "masked" or detections is None:
        return targets
    out = []
    for t, d in zip(targets, detections):
        pb, pl = select_pseudo(d["boxes"], d["scores"], d["labels"], t["patch"], conf, iou)
        out.append({**t, "boxes": torch.cat([t["boxes"], pb]), "labels": torch.cat([t["labels"], pl])})
    return out
