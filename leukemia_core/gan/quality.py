"""Sample quality of a generator, in the features of a stated classifier.

No Inception weights exist offline, so KID and FID are computed by torchmetrics with a
custom feature extractor: :class:`ClassifierFeatures` wraps any timm-style classifier
(pooled pre-logit features). The numbers are comparable only between runs that use the
same extractor, which every result therefore names. Also here: k-NN precision/recall of
samples (Kynkäänniemi et al. 2019), train-on-synthetic / test-on-real accuracy, and the
nearest real training image of each sample (memorisation).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from leukemia_core.errors import LeukemiaError


class ClassifierFeatures(nn.Module):
    """Float images in [0, 1] (any size) -> the classifier's pooled pre-logit features.

    Images are resized to the classifier's ``image_size`` and normalised with its
    ``mean``/``std``, as in its evaluation transform.
    """

    def __init__(self, classifier: nn.Module, image_size: int, mean, std, name: str):
        super().__init__()
        self.classifier, self.image_size, self.name = classifier.eval(), image_size, name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.num_features = int(classifier.num_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        h = self.classifier.forward_features((x - self.mean) / self.std)
        if hasattr(self.classifier, "forward_head"):
            h = self.classifier.forward_head(h, pre_logits=True)
        return h.flatten(1)


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def embed(extractor: ClassifierFeatures, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Features of uint8 NHWC images."""
    x = uint8_to_float(images)
    return torch.cat([extractor(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else \
        torch.zeros(0, extractor.num_features)


def kid_fid(extractor: ClassifierFeatures, real: np.ndarray, fake: np.ndarray,
            subsets: int = 50, seed: int = 0) -> dict:
    """KID (mean, std over subsets) and FID between two sets of uint8 images, in the
    extractor's features (torchmetrics). KID's subset size is the smaller set's size,
    at most 1000; FID is biased for small sets and shown for reference."""
    n = min(len(real), len(fake))
    if n < 2:
        raise LeukemiaError(f"KID/FID need at least 2 images per set, got {len(real)} real, {len(fake)} fake")
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=min(n, 1000), normalize=True)
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    for metric in (kid, fid):
        metric.update(uint8_to_float(real), real=True)
        metric.update(uint8_to_float(fake), real=False)
    kid_mean, kid_std = kid.compute()
    return {"kid": float(kid_mean), "kid_std": float(kid_std), "fid": float(fid.compute()),
            "n_real": len(real), "n_fake": len(fake), "features": extractor.name}


def _kth_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision / recall (Kynkäänniemi et al. 2019): precision is the share of
    samples inside the real manifold (union of k-NN balls of real features), recall the
    share of real points inside the sample manifold."""
    if min(len(real), len(fake)) <= k:
        raise LeukemiaError(f"k-NN precision/recall with k={k} needs more than {k} points per set")
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(1).float().mean().item()
    recall = (d.T <= r_fake[None, :]).any(1).float().mean().item()
    return {"precision": precision, "recall": recall, "k": k}


def train_on_test_on(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y, seed: int = 0) -> float:
    """Accuracy on ``test`` of a logistic regression fit on ``train`` features (scikit-learn):
    train-on-synthetic / test-on-real when ``train`` is generated."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
    clf.fit(train_x.numpy(), np.asarray(train_y))
    return float((clf.predict(test_x.numpy()) == np.asarray(test_y)).mean())


def nearest_real(fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the index of its nearest real feature vector and the distance."""
    d = torch.cdist(fake, real)
    dist, idx = d.min(1)
    return idx, dist
