"""Similarity Grad-CAM: where in the image the match with a sentence comes from.

The Grad-CAM target is the cosine similarity between the image embedding and one fixed
text embedding (instead of a class logit); gradients of that similarity weight the
feature maps of the image tower's ``cam_target_layers()``, via :mod:`leukemia_core.explain.cams`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from leukemia_core.vl.model import ImageEmbedder, VisionLanguageModel


class SimilarityTarget:
    """Grad-CAM target: cosine similarity of one image's embedding with ``text_emb``."""

    def __init__(self, text_emb: torch.Tensor):
        self.text_emb = text_emb.detach().flatten()

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(model_output.flatten(), self.text_emb.to(model_output.device), dim=0)


def similarity_cam(model: VisionLanguageModel, images: torch.Tensor, text_emb: torch.Tensor,
                   method: str = "Grad-CAM") -> np.ndarray:
    """Heat maps [N, H, W] in [0, 1] for ``images`` [N, 3, H, W] against ``text_emb``
    ([D]: one sentence for all images, or [N, D]: one per image), computed by the book's
    explanation module on the image tower's ``cam_target_layers()``."""
    from leukemia_core.explain.cams import compute_cams

    embedder = ImageEmbedder(model).eval()
    if text_emb.ndim == 1:
        text_emb = text_emb.expand(len(images), -1)
    model.image_tower.to(memory_format=torch.contiguous_format)
    return compute_cams(embedder, images.contiguous(), method, [SimilarityTarget(t) for t in text_emb])
