"""``fit()`` and ``evaluate()`` for any classifier ``nn.Module`` (timm or not).

AdamW, cosine schedule with linear warm-up (per step), early stopping on a
validation metric, mixed precision on CUDA and the same code on CPU, safetensors
checkpoints with exact resume (each epoch reseeds every RNG from ``seed``+epoch).
Data-parallel across processes when ``torch.distributed`` is initialised (see
:mod:`leukemia_core.engine.distributed`); a single process runs exactly as before.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leukemia_core.engine import distributed as ddp
from leukemia_core.engine.loop import LoopConfig, LoopResult, Task, train
from leukemia_core.engine.metrics import classification_metrics


@dataclass
class FitConfig(LoopConfig):
    """The loop's settings (:class:`~leukemia_core.engine.loop.LoopConfig`: epochs, AdamW,
    warm-up + cosine, selection, checkpoints) plus the classification loss's."""
    monitor: str = "macro_f1"  # validation metric for model selection / early stopping
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None  # class-weighted cross-entropy


#: What :func:`fit` returns: the loop's result (history, best epoch and score, ...).
FitResult = LoopResult


def default_device() -> torch.device:
    if torch.cuda.is_available() and ddp.is_distributed():
        return torch.device("cuda", ddp.local_rank())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def to_device(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def predict_logits(model, loader, device=None, amp: bool = True, progress: bool = False,
                   channels_last: bool = True):
    """Logits and targets over a loader, in loader order."""
    device = device or next(model.parameters()).device
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    logits, targets = [], []
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with autocast(device, amp):
            logits.append(model(to_device(x, device, channels_last)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(targets)


def evaluate(model, loader, classes: list[str], device=None, amp: bool = True) -> dict:
    """Metrics of ``model`` on ``loader`` plus ``probs`` and ``targets`` tensors."""
    logits, targets = predict_logits(model, loader, device, amp)
    out = classification_metrics(logits, targets, classes)
    out["loss"] = F.cross_entropy(logits, targets).item()
    out["probs"], out["targets"] = logits.softmax(1), targets
    return out


class ClassificationTask:
    """What :func:`fit` optimises and monitors: cross-entropy over ``classes``.

    Other tasks (e.g. :class:`leukemia_core.hierarchy.HierarchicalTask`) provide the
    same three methods for models whose outputs are not one softmax.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.weight, self.label_smoothing = weight, label_smoothing

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=self.weight, label_smoothing=self.label_smoothing)

    def n_correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == y).sum()

    def evaluate(self, model, loader, classes: list[str], device, amp: bool) -> dict:
        return evaluate(model, loader, classes, device, amp)


class _FitTask(Task):
    """A classification-style task (``loss``, ``n_correct``, ``evaluate``) as a loop task."""

    def __init__(self, task, val_loader, classes: list[str], amp: bool):
        self.task, self.val_loader, self.classes, self.amp = task, val_loader, classes, amp
        self.callbacks = tuple(getattr(task, "callbacks", ()))

    def param_groups(self, model, config):
        return self.task.param_groups(model, config) if hasattr(self.task, "param_groups") \
            else super().param_groups(model, config)

    def training_step(self, net, batch, state):
        x, y = batch
        logits = net(x)
        return {"loss": self.task.loss(logits, y), "n": len(y),
                "accuracy": self.task.n_correct(logits.detach(), y) / len(y)}

    def validate(self, model, state):
        if self.val_loader is None:
            return None
        val = self.task.evaluate(model, self.val_loader, self.classes, state.device, self.amp)
        return {k: val[k] for k in ("loss", "accuracy", "macro_f1", "balanced_accuracy") if k in val}


def fit(model, train_loader, val_loader, classes: list[str], config: FitConfig,
        out_dir: str | Path | None = None, resume: bool = False, device=None,
        meta: dict | None = None, stop_after_epoch: int | None = None,
        task=None) -> FitResult:
    """Train a classifier with the one loop (:func:`leukemia_core.engine.loop.train`);
    keeps the best weights by ``config.monitor`` on ``val_loader``.

    With ``out_dir``, writes ``model.safetensors`` (best), ``last.safetensors`` and
    ``train_state.safetensors`` every epoch and every ``checkpoint_every_s`` seconds;
    ``resume=True`` continues from them, exactly. ``stop_after_epoch`` simulates an
    interruption after that epoch (for tests). On return the model holds the best weights
    (the last ones when there is no validation). ``task`` replaces the cross-entropy over
    ``classes`` (e.g. :class:`leukemia_core.hierarchy.HierarchicalTask`). Distributed
    runs as the loop describes.
    """
    weight = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else None
    inner = task or ClassificationTask(weight, config.label_smoothing)
    if weight is not None and task is None:
        inner.weight = weight.to(torch.device(device) if device else default_device())
    loop_config = LoopConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LoopConfig)})
    meta = {**(meta or {}), "classes": list(classes), "fit_config": dataclasses.asdict(config)}
    stop = None if stop_after_epoch is None else (stop_after_epoch + 1) * len(train_loader)
    r = train(model, train_loader, _FitTask(inner, val_loader, list(classes), config.amp), loop_config,
              out_dir=out_dir, resume=resume, device=device, meta=meta, stop_after_steps=stop)
    return r
