"""Synthetic images with provenance, and the guard that keeps them out of evaluation.

Every generated image carries the generator checkpoint's SHA-256, the sampling seed,
its class and its index in that draw, so any synthetic image can be traced and
regenerated. :func:`assert_real_only` is called on every validation and test table.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukemia_core.errors import LeukemiaError

SYNTHETIC_PREFIX = "synthetic://"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def generate(generator: torch.nn.Module, class_index: int, class_name: str, n: int, seed: int,
             checkpoint_sha256: str, batch: int = 64) -> tuple[np.ndarray, pd.DataFrame]:
    """``n`` images of one class as uint8 HWC, and one provenance row per image.

    The draw is reproducible: the same generator weights, seed and ``n`` give the same
    images. ``relpath`` is a ``synthetic://`` URI, never a file of a real data set.
    """
    if n < 0:
        raise LeukemiaError(f"cannot generate a negative number of images ({n})")
    gen = torch.Generator().manual_seed(seed)
    generator.eval()
    device = next(generator.parameters()).device
    out = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        z = torch.randn(k, generator.z_dim, generator=gen).to(device)
        y = torch.full((k,), class_index, dtype=torch.long, device=device)
        img = (generator(z, y).clamp(-1, 1) + 1) * 127.5
        out.append(img.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    images = np.concatenate(out) if out else np.zeros((0, generator.image_size, generator.image_size, 3), np.uint8)
    records = pd.DataFrame({
        "relpath": [f"{SYNTHETIC_PREFIX}{checkpoint_sha256[:12]}/{class_name}/{seed}/{i}" for i in range(n)],
        "label": class_name, "synthetic": True, "generator_sha256": checkpoint_sha256,
        "seed": seed, "index": np.arange(n)})
    return images, records


def is_synthetic(table: pd.DataFrame) -> pd.Series:
    """Rows that are generated: a true ``synthetic`` flag or a ``synthetic://`` path."""
    flags = pd.Series(False, index=table.index)
    if "synthetic" in table:
        flags |= table["synthetic"].astype("boolean").fillna(False).astype(bool)
    if "relpath" in table:
        flags |= table["relpath"].astype(str).str.startswith(SYNTHETIC_PREFIX)
    return flags


def assert_real_only(table: pd.DataFrame, where: str) -> None:
    """Raise if any synthetic image is in ``table`` (a validation or test split)."""
    bad = table[is_synthetic(table)]
    if len(bad):
        raise LeukemiaError(f"{len(bad)} synthetic image(s) in {where}, e.g. {bad['relpath'].iloc[0]}: "
                            "generated images may only be added to the training split")
