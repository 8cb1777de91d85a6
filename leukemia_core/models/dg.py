"""The domain-generalization chapter's network: EfficientNet-Lite0 (BatchNorm or GroupNorm)
with a projection head for the contrastive term."""
from __future__ import annotations

import torch.nn as nn

from leukemia_core.models import create_model


def bn_to_gn(module: nn.Module, groups: int = 8) -> nn.Module:
    """Replace every timm ``BatchNormAct2d`` by a ``GroupNormAct`` with the same
    activation and eps. The ImageNet convolutions are kept; the affine parameters start
    at (1, 0): BN's were fitted to BN's running statistics, and copied into GroupNorm
    they make the features nearly constant across inputs (checked: the features' std
    across a batch drops to ~1e-4)."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            gn = GroupNormAct(child.num_features, groups, eps=child.eps, apply_act=False)
            gn.act, gn.drop = child.act, child.drop
            setattr(module, name, gn)
        else:
            bn_to_gn(child, groups)
    return module


def build_backbone(norm: str = "bn", num_classes: int = 5, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet); ``norm='gn'`` swaps BatchNorm for GroupNorm(8)."""
    net = create_model("efficientnet_lite0", num_classes=num_classes, pretrained=pretrained)
    return bn_to_gn(net) if norm == "gn" else net


class DGNet(nn.Module):
    """A timm classifier plus a projection head for the contrastive term."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        nf = backbone.num_features
        self.proj = nn.Sequential(nn.Linear(nf, 256), nn.ReLU(inplace=True), nn.Linear(256, proj_dim))

    def forward(self, x, with_embedding: bool = False):
        f = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        logits = self.backbone.get_classifier()(f)
        return (logits, self.proj(f)) if with_embedding else logits
