"""The hierarchy chapter's network: one backbone, one linear head per taxonomy level."""
from __future__ import annotations

import torch
import torch.nn as nn


class MultiLevelNet(nn.Module):
    """A backbone (any :func:`~leukemia_core.models.create_model` name) shared by one
    linear head per level in ``levels`` (0-based depths)."""

    def __init__(self, backbone: str, level_sizes: list[int], levels: list[int] | None = None,
                 pretrained: bool = False, drop_rate: float = 0.0, **backbone_kwargs):
        super().__init__()
        from leukemia_core.models import create_model  # the registry, once this module is imported

        self.levels = list(range(len(level_sizes))) if levels is None else list(levels)
        self.backbone = create_model(backbone, num_classes=0, pretrained=pretrained, **backbone_kwargs)
        self.drop = nn.Dropout(drop_rate)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, level_sizes[d]) for d in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.drop(self.backbone(x))
        return torch.cat([head(z) for head in self.heads], dim=1)
