"""Symmetric InfoNCE (CLIP) with several positives per row and column.

With class sentences, many images of a batch share one description (and two
paraphrases of one class mean the same): plain CLIP would treat the other images of
the class as negatives of each sentence. Here a boolean ``positives`` matrix says which
(image, text) pairs match; the image->text target of image ``i`` is uniform over the
texts that match it, and the text->image target of text ``j`` uniform over the images
that match it (soft targets, as in UniCL, Yang et al. 2022). With ``positives`` the
identity this is exactly CLIP's loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positives_from_keys(image_keys, text_keys) -> torch.Tensor:
    """``positives[i, j]``: image ``i``'s key equals text ``j``'s key (class, or attribute tuple)."""
    a = torch.as_tensor(image_keys)
    b = torch.as_tensor(text_keys)
    return a[:, None] == b[None, :]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(target * log_softmax(logits))``; rows of ``target`` sum to 1."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def multi_positive_info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                            positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE between unit embeddings ``image_emb`` [B, D] and ``text_emb`` [T, D].

    ``scale`` is the inverse temperature (``logit_scale.exp()``). ``positives`` [B, T]
    (default: identity, B == T) must give every image and every text at least one match.
    Returns ``loss`` (mean of the two directions), ``image_to_text`` and ``text_to_image``.
    """
    logits = scale * image_emb @ text_emb.t()
    if positives is None:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError("without a positives matrix the batch needs as many texts as images")
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    pos = positives.to(device=logits.device, dtype=logits.dtype)
    if (pos.sum(1) == 0).any() or (pos.sum(0) == 0).any():
        raise ValueError("every image and every text needs at least one positive")
    i2t = soft_cross_entropy(logits, pos / pos.sum(1, keepdim=True))
    t2i = soft_cross_entropy(logits.t(), (pos / pos.sum(0, keepdim=True)).t())
    return {"loss": (i2t + t2i) / 2, "image_to_text": i2t, "text_to_image": t2i}
