"""Classification metrics via torchmetrics."""
from __future__ import annotations

import torch
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision,
                                         MulticlassRecall)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    k = len(classes)
    preds = logits.argmax(1) if logits.ndim == 2 else logits
    kw = dict(num_classes=k)
    per = {name: cls(average=None, **kw)(preds, targets).tolist() for name, cls in
           (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score))}
    return {
        "accuracy": MulticlassAccuracy(average="micro", **kw)(preds, targets).item(),
        "balanced_accuracy": MulticlassAccuracy(average="macro", **kw)(preds, targets).item(),
        "macro_f1": MulticlassF1Score(average="macro", **kw)(preds, targets).item(),
        "per_class": {c: {m: per[m][i] for m in per} | {"support": int((targets == i).sum())}
                      for i, c in enumerate(classes)},
        "confusion_matrix": MulticlassConfusionMatrix(**kw)(preds, targets).tolist(),
        "n": int(targets.numel()),
    }
