"""Losses for imbalanced classes and many domains (the domain-generalization chapter):
class-balanced weights, focal loss, supervised contrastive loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_balanced_weights(counts, beta: float = 0.99) -> torch.Tensor:
    """Cui et al. (2019): w_c proportional to (1 - beta) / (1 - beta^n_c), mean 1 over
    classes with samples (classes without samples get 0)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = torch.where(n > 0, (1 - beta) / (1 - beta ** n.clamp_min(1)), torch.zeros_like(n))
    return (w * (n > 0).sum() / w.sum()).float()


def focal_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Class-weighted focal loss (Lin et al. 2017), averaged over the batch."""
    logp = F.log_softmax(logits.float(), 1).gather(1, y[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        loss = loss * weight.to(loss)[y]
    return loss.mean()


def supcon_loss(z: torch.Tensor, y: torch.Tensor, domains: torch.Tensor | None = None,
                temperature: float = 0.1, cross_domain: bool = False) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, one view per sample): for each
    anchor, the mean log-probability of its positives (same class; with ``cross_domain``
    only those from another domain) among all other samples of the batch."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & ~eye
    if cross_domain and domains is not None:
        pos &= domains[:, None] != domains[None, :]
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, -torch.inf), 1, keepdim=True)
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not valid.any():
        return z.sum() * 0
    return (-(log_prob * pos).sum(1)[valid] / n_pos[valid]).mean()
