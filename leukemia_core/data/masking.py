"""Cell masking for background-only probes: remove every stained nucleus and the cell
around it, so that only the background (illumination, stain, red cells, framing)
is left for a classifier to use.

Nuclei are the darkest, least green pixels of a Romanowsky-stained smear; each
nucleus blob is replaced by a filled disc that covers it with a margin (a disc,
not the blob's outline, so the hole shows at most the cell's size, not its shape),
filled with the median colour of the unmasked pixels.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of nucleus-like pixels: Otsu threshold on ``G - (R + B) / 2``
    inverted (purple stains absorb green), cleaned by a morphological opening."""
    img = rgb.astype(np.float32)
    purple = (img[..., 0] + img[..., 2]) / 2 - img[..., 1]
    purple = cv2.normalize(purple, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, mask = cv2.threshold(cv2.GaussianBlur(purple, (5, 5), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = max(3, rgb.shape[0] // 60) | 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return mask > 0


def cell_discs(rgb: np.ndarray, margin: float = 1.6, min_area: float = 0.002) -> np.ndarray:
    """Boolean mask of discs covering each nucleus blob (radius = ``margin`` x the
    blob's enclosing radius); blobs smaller than ``min_area`` of the image are ignored."""
    nuc = nucleus_mask(rgb).astype(np.uint8)
    h, w = nuc.shape
    out = np.zeros((h, w), np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(nuc)
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area * h * w:
            continue
        pts = np.column_stack(np.nonzero(labels == i)[::-1]).astype(np.float32)
        (cx, cy), r = cv2.minEnclosingCircle(pts)
        cv2.circle(out, (int(cx), int(cy)), int(r * margin) + 1, 1, thickness=-1)
    return out > 0


class MaskCells:
    """PIL -> PIL transform: cells replaced by discs of the background's median colour."""

    def __init__(self, margin: float = 1.6):
        self.margin = margin

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image.convert("RGB")).copy()
        mask = cell_discs(rgb, self.margin)
        background = rgb[~mask] if (~mask).any() else rgb.reshape(-1, 3)
        rgb[mask] = np.median(background, axis=0).astype(np.uint8)
        return Image.fromarray(rgb)

    def __repr__(self) -> str:
        return f"MaskCells(margin={self.margin})"
