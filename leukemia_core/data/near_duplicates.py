"""Near-duplicate images: the same cell or field saved twice with a small shift or a
re-encode, which exact content hashes miss.

A cascade over small thumbnails, cheap enough for every dataset of the book (PBC's
17,092 images in well under a minute on 2 cores):

1. **candidates**: Pearson correlation of 8x8 RGB thumbnails (box-filtered, so a shift
   of a few pixels barely moves them) at least ``coarse_corr``, over all pairs;
2. **screen**: correlation of 16x16 *high-pass* thumbnails (image minus its Gaussian blur:
   the detail that tells one cell from a similar-looking one), best over shifts of one
   pixel, at least ``screen_corr``;
3. **confirm**: the same at 32x32 over shifts of up to ``max_shift`` pixels (a re-cropped
   copy is a shifted copy), at least ``min_corr``.

The thresholds were set by looking at pairs of the mirror: copies of one cell in PBC and
BCCD crops, and of one smear field in Aria, against the most similar *different* cells of
PBC and Zheng. Fields separate well (copies score 0.78 and more in the last stage);
centred single cells less so (a few different cells score up to about 0.89, one true copy
0.81), so single-cell datasets use 0.85 (``SPLIT_SPECS``). The errors are not symmetric:
a missed copy leaks, while a false pair only keeps two different images on the same side
of the split, so the thresholds lean towards recall. Pairs are grouped into clusters
(connected components) and :func:`make_split <leukemia_core.data.splits.make_split>` keeps
every cluster on one side of a split, like exact copies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from leukemia_core.errors import DatasetError


@dataclass(frozen=True)
class NearDupConfig:
    coarse_corr: float = 0.9    # stage 1, 8x8 RGB
    screen_corr: float = 0.85   # stage 2, 16x16 high-pass, shifts of 1 px
    max_shift: int = 3          # stage 3 shifts, px of the 32x32 thumbnail (about 10%)
    min_corr: float = 0.85      # stage 3, 32x32 high-pass: confirms a copy

    def to_dict(self) -> dict:
        return asdict(self)


def _high_pass(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return x - gaussian_filter(x, (0, sigma, sigma, 0))


def fingerprints(paths) -> dict[str, np.ndarray]:
    """Thumbnails of every image: ``coarse`` (8x8 RGB), ``fine16`` and ``fine32``
    (high-pass 16x16 and 32x32 RGB), float32. A file that cannot be decoded is an error
    naming it (splits must cover every file)."""
    from PIL import Image

    n = len(paths)
    t8, t16, t32 = (np.zeros((n, s, s, 3), np.float32) for s in (8, 16, 32))
    for k, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.draft("RGB", (64, 64))  # JPEG: decode at reduced size
                im = im.convert("RGB")
                t8[k] = np.asarray(im.resize((8, 8), Image.BOX), np.float32)
                t16[k] = np.asarray(im.resize((16, 16), Image.BILINEAR), np.float32)
                t32[k] = np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{p}: cannot decode ({exc}); check the file with "
                               "`leukemia-core data check` and re-fetch it") from exc
    return {"coarse": t8, "fine16": _high_pass(t16, 1.0), "fine32": _high_pass(t32, 2.0)}


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def candidate_pairs(coarse: np.ndarray, min_corr: float, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` whose coarse thumbnails correlate at least ``min_corr``."""
    x = _standardise(coarse)
    out_i, out_j = [np.zeros(0, int)], [np.zeros(0, int)]
    for s in range(0, len(x), chunk):
        i, j = np.nonzero(x[s:s + chunk] @ x.T >= min_corr)
        i += s
        keep = i < j
        out_i.append(i[keep])
        out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


def aligned_correlation(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray, max_shift: int,
                        chunk: int = 8192) -> np.ndarray:
    """Pearson correlation of thumbnails ``i`` and ``j`` (centre crop of ``i`` against every
    crop of ``j`` shifted by up to ``max_shift`` px), the best over shifts."""
    s, m = thumbs.shape[1], max_shift
    best = np.full(len(i), -1.0, dtype=np.float32)
    for c in range(0, len(i), chunk):
        a = _standardise(thumbs[i[c:c + chunk], m:s - m, m:s - m])
        tj = thumbs[j[c:c + chunk]]
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                b = _standardise(tj[:, m + dy:s - m + dy, m + dx:s - m + dx])
                np.maximum(best[c:c + chunk], np.einsum("ij,ij->i", a, b), out=best[c:c + chunk])
    return best


def scored_pairs(fp: dict[str, np.ndarray], cfg: "NearDupConfig" = NearDupConfig()):
    """``(i, j, score)`` of the cascade's stage-3 pairs (every pair that passed stages 1
    and 2, with its 32x32 aligned score; confirmed copies are those >= ``cfg.min_corr``)."""
    i, j = candidate_pairs(fp["coarse"], cfg.coarse_corr)
    keep = aligned_correlation(fp["fine16"], i, j, 1) >= cfg.screen_corr
    i, j = i[keep], j[keep]
    return i, j, aligned_correlation(fp["fine32"], i, j, cfg.max_shift)


def near_duplicate_pairs(table: pd.DataFrame, cfg: NearDupConfig = NearDupConfig()) -> pd.DataFrame:
    """Confirmed near-duplicate pairs of ``table`` (columns ``path``, ``relpath``): one row
    per pair with ``a, b`` (relpaths, ``a < b``) and ``correlation`` (the stage-3 score).
    Exact byte copies are included (they are near duplicates too)."""
    t = table.sort_values("relpath").reset_index(drop=True)
    i, j, corr = scored_pairs(fingerprints(t["path"].tolist()), cfg)
    keep = corr >= cfg.min_corr
    rel = t["relpath"].to_numpy()
    pairs = pd.DataFrame({"a": rel[i[keep]], "b": rel[j[keep]], "correlation": np.round(corr[keep], 3)})
    return pairs.sort_values(["a", "b"]).reset_index(drop=True)


def clusters(relpaths, pairs: pd.DataFrame) -> pd.Series:
    """Cluster id (the smallest relpath of its cluster) per relpath: connected components
    of the ``pairs`` graph (the same union as the splits use); a relpath in no pair is its
    own cluster."""
    from leukemia_core.data.splits import duplicate_groups

    t = pd.DataFrame({"relpath": list(relpaths)})
    t["sha256"] = t["relpath"]  # no content hashes here: only the pairs join records
    group = duplicate_groups(t, None, pairs)
    return pd.Series(t.groupby(group)["relpath"].transform("min").to_numpy(), index=t["relpath"],
                     name="cluster")


def crossing_clusters(split: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs of ``pairs`` whose two images sit in different splits of ``split`` (columns
    ``relpath, split``): empty for a leak-free split."""
    s = split.set_index("relpath")["split"]
    both = pairs[pairs["a"].isin(s.index) & pairs["b"].isin(s.index)]
    return both[s[both["a"]].to_numpy() != s[both["b"]].to_numpy()]
