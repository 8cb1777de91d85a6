"""Model registry in the style of timm: ``create_model(name, num_classes, pretrained)``.

Names registered here take precedence; any other name is passed to timm. Only the
registered models have offline pretrained weights (nothing is fetched from a hub).
"""
from __future__ import annotations

from typing import Callable

import timm
import torch.nn as nn

from ..errors import UnknownNameError

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
        from .efficientnet_lite0 import efficientnet_lite0_imagenet
        return efficientnet_lite0_imagenet(num_classes=num_classes, **kwargs)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes, **kwargs)


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
