"""Model registry in the style of timm: ``create_model(name, num_classes, pretrained)``.

Names registered here take precedence; any other name is passed to timm. Only the
registered models have offline pretrained weights (nothing is fetched from a hub).
"""
from __future__ import annotations

from typing import Callable

import timm
import torch.nn as nn

from leukemia_core.errors import UnknownNameError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(num_classes, pretrained, **kwargs) -> nn.Module``."""
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


@register_model("efficientnet_lite0")
def _efficientnet_lite0(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0``; ``pretrained`` loads the offline ImageNet weights."""
    if pretrained:
        from leukemia_core.models.efficientnet_lite0 import efficientnet_lite0_imagenet
        return efficientnet_lite0_imagenet(num_classes=num_classes, **kwargs)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes, **kwargs)


def size_kwargs(name: str, image_size: int) -> dict:
    """Constructor arguments that depend on the input size: ViT and Swin need the image
    size (ViT a smaller patch below 96 px, Swin a window dividing its grids), the
    hybrids the size for their Swin branch; other models take none."""
    if name.startswith("vit_"):
        return {"img_size": image_size, "patch_size": 8 if image_size <= 96 else 16}
    if name.startswith("swin_branch_") or name.startswith("convnextv2_swin_hybrid_"):
        return {"image_size": image_size}
    if name.startswith("swin"):
        return {"img_size": image_size, "window_size": max(2, image_size // 32)}
    return {}


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a classifier. ``pretrained=True`` works only for models with offline weights."""
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, pretrained=pretrained, **kwargs)
    if not timm.is_model(name):
        raise UnknownNameError(f"unknown model '{name}': neither registered here ({list_models()}) "
                               "nor a timm model name")
    if pretrained:
        raise UnknownNameError(f"no offline pretrained weights for '{name}'; models with offline "
                               f"weights: {list_models()} (use pretrained=False to train from scratch)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _hybrid(variant: str, branches: tuple[str, ...]):
    def build(num_classes: int, pretrained: bool = False, image_size: int = 64, **kwargs) -> nn.Module:
        if pretrained:
            raise UnknownNameError("no offline pretrained weights exist for the ConvNeXtV2 or Swin "
                                   "branches; train the hybrid with pretrained=False")
        from leukemia_core.models.hybrid import ConvNeXtV2SwinHybrid
        return ConvNeXtV2SwinHybrid(num_classes, variant, image_size, branches, **kwargs)
    return build


for _variant in ("atto", "tiny"):
    register_model(f"convnextv2_swin_hybrid_{_variant}")(_hybrid(_variant, ("cnn", "swin")))
    # the single-branch ablations, same head
    register_model(f"convnextv2_branch_{_variant}")(_hybrid(_variant, ("cnn",)))
    register_model(f"swin_branch_{_variant}")(_hybrid(_variant, ("swin",)))
