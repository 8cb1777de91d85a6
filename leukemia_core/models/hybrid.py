"""ConvNeXtV2–Swin hybrid: two timm branches in parallel, fused by concatenation + MLP.

The method of the R3GAN/CLAHE hybrid paper: a convolutional branch (ConvNeXtV2, local
texture: chromatin, granules) and a shifted-window transformer branch (Swin, the layout
of nucleus and cytoplasm) see the same image; their pooled features are concatenated
and a small MLP classifies. Concatenation + MLP is chosen over cross-attention because
both branches end in one pooled vector per image at the sizes this book trains (a Swin
at 64 px ends on a 2x2 token grid), so there is no token sequence worth attending
over, and because it is what the paper describes.

Swin needs the input size and a window that divides every stage's grid; ``swin_kwargs``
sets both. Both branches train from scratch (no offline weights exist for either).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from leukemia_core.errors import LeukemiaError

#: Branch sizes per variant: (ConvNeXtV2 name, Swin overrides). ``atto`` is the CPU-sized
#: pair for the ci profile; ``tiny`` is the paper-scale pair for full runs.
VARIANTS = {
    "atto": ("convnextv2_atto", dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))),
    "tiny": ("convnextv2_tiny", dict()),  # swin_tiny: embed 96, depths (2, 2, 6, 2)
}
SWIN_BASE = "swin_tiny_patch4_window7_224"


def swin_kwargs(image_size: int) -> dict:
    """``img_size`` and the largest window (at most 7) dividing every stage's token grid."""
    if image_size % 32:
        raise LeukemiaError(f"the Swin branch needs an image size divisible by 32 (patch 4, three "
                            f"2x merges), got {image_size}: resize to {max(32, image_size // 32 * 32)}")
    last_grid = image_size // 32
    window = max(w for w in range(1, 8) if last_grid % w == 0 and (image_size // 4) % w == 0)
    return {"img_size": image_size, "window_size": window}


class ConvNeXtV2SwinHybrid(nn.Module):
    """Parallel ConvNeXtV2 and Swin branches, pooled features concatenated, MLP head.

    ``branches`` selects ``("cnn", "swin")`` (the hybrid) or one of them alone, so the
    single-branch ablations are the same module with the same head.
    """

    def __init__(self, num_classes: int, variant: str = "atto", image_size: int = 64,
                 branches: tuple[str, ...] = ("cnn", "swin"), hidden: int = 256, drop_rate: float = 0.2):
        super().__init__()
        if variant not in VARIANTS:
            raise LeukemiaError(f"unknown hybrid variant '{variant}'; choose one of {sorted(VARIANTS)}")
        if not branches or set(branches) - {"cnn", "swin"}:
            raise LeukemiaError(f"branches must be a non-empty subset of ('cnn', 'swin'), got {branches}")
        cnn_name, swin_over = VARIANTS[variant]
        self.branches = tuple(branches)
        self.cnn = timm.create_model(cnn_name, num_classes=0) if "cnn" in branches else None
        self.swin = (timm.create_model(SWIN_BASE, num_classes=0, **swin_over, **swin_kwargs(image_size))
                     if "swin" in branches else None)
        width = sum(b.num_features for b in (self.cnn, self.swin) if b is not None)
        self.num_features = width
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                  nn.Dropout(drop_rate), nn.Linear(hidden, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in (self.cnn, self.swin) if b is not None], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def cam_target_layers(self) -> list[nn.Module]:
        """Grad-CAM on the convolutional branch's last stage (NCHW), else Swin's last stage."""
        if self.cnn is not None:
            return [self.cnn.stages[-1]]
        return [self.swin.layers[-1]]

    def cam_reshape(self, t: torch.Tensor) -> torch.Tensor:
        # ConvNeXt stages are NCHW already; timm Swin stages are NHWC
        return t if self.cnn is not None else t.permute(0, 3, 1, 2)
