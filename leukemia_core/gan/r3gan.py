"""R3GAN (Huang et al., NeurIPS 2024, "The GAN is dead; long live the GAN!"), class-conditional.

What makes it R3GAN, and is implemented here:

- the **relativistic pairing loss** (RpGAN): each real image is paired with a fake one and
  the discriminator scores their *difference*, ``softplus(-(D(real) - D(fake)))``;
- **zero-centred gradient penalties** on real data (R1) and on fake data (R2),
  ``gamma/2 * E ||grad_x D(x)||^2``, which together make the objective converge locally;
- a **modern residual ConvNet** without the StyleGAN tricks: inverted-bottleneck residual
  blocks (1x1 -> grouped 3x3 -> 1x1), leaky ReLU, no normalisation layers, fix-up
  initialisation (each residual branch's last convolution starts at zero), bilinear
  resampling between stages.

Class conditioning: the generator concatenates a learned class embedding to ``z``; the
discriminator uses projection (``score = w.h + <embed(y), h>``, Miyato & Koyama 2018).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leukemia_core.errors import LeukemiaError


class ResidualBlock(nn.Module):
    """Inverted bottleneck: 1x1 expand, grouped 3x3, 1x1 project; fix-up: last conv zeroed."""

    def __init__(self, width: int, expansion: int = 2, group_size: int = 16):
        super().__init__()
        hidden = width * expansion
        self.expand = nn.Conv2d(width, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1, groups=max(1, hidden // group_size))
        self.project = nn.Conv2d(hidden, width, 1, bias=False)
        nn.init.zeros_(self.project.weight)

    def forward(self, x):
        h = F.leaky_relu(self.expand(x), 0.2)
        h = F.leaky_relu(self.spatial(h), 0.2)
        return x + self.project(h)


class Stage(nn.Module):
    """A resolution change (bilinear + 1x1 conv) followed by residual blocks."""

    def __init__(self, c_in: int, c_out: int, blocks: int, scale: float):
        super().__init__()
        self.scale = scale
        self.transition = nn.Conv2d(c_in, c_out, 1)
        self.blocks = nn.Sequential(*[ResidualBlock(c_out) for _ in range(blocks)])

    def forward(self, x):
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.blocks(self.transition(x))


def _widths(image_size: int, base: int, max_width: int) -> list[int]:
    steps = image_size.bit_length() - 3  # 4 px -> image_size in doublings
    if image_size < 8 or 4 * 2 ** steps != image_size:
        raise LeukemiaError(f"R3GAN image size must be a power of two >= 8, got {image_size}")
    return [min(max_width, base * 2 ** i) for i in range(steps, -1, -1)]  # 4 px stage first


class Generator(nn.Module):
    """``z`` (+ class embedding) -> 4x4 features -> doubling stages -> RGB in [-1, 1]."""

    def __init__(self, num_classes: int, image_size: int = 64, z_dim: int = 64, base: int = 32,
                 max_width: int = 256, blocks: int = 1, embed_dim: int = 32):
        super().__init__()
        widths = _widths(image_size, base, max_width)
        self.z_dim, self.num_classes, self.image_size = z_dim, num_classes, image_size
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.stem = nn.Linear(z_dim + embed_dim, widths[0] * 16)
        self.stages = nn.ModuleList([Stage(widths[0], widths[0], blocks, 1)] +
                                    [Stage(a, b, blocks, 2) for a, b in zip(widths, widths[1:])])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 1)
        self.width0 = widths[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([z, self.embed(y)], 1)).view(len(z), self.width0, 4, 4)
        for stage in self.stages:
            h = stage(F.leaky_relu(h, 0.2))
        return torch.tanh(self.to_rgb(h))


class Discriminator(nn.Module):
    """RGB -> halving stages -> 4x4 features -> linear score + class projection."""

    def __init__(self, num_classes: int, image_size: int = 64, base: int = 32, max_width: int = 256,
                 blocks: int = 1):
        super().__init__()
        widths = _widths(image_size, base, max_width)[::-1]  # full resolution first
        self.from_rgb = nn.Conv2d(3, widths[0], 1)
        self.stages = nn.ModuleList([Stage(widths[0], widths[0], blocks, 1)] +
                                    [Stage(a, b, blocks, 0.5) for a, b in zip(widths, widths[1:])])
        feat = widths[-1] * 16
        self.score = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat)
        nn.init.normal_(self.embed.weight, std=feat ** -0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.from_rgb(x)
        for stage in self.stages:
            h = stage(h)
        h = F.leaky_relu(h, 0.2).flatten(1)
        return self.score(h).squeeze(1) + (self.embed(y) * h).sum(1)


def rpgan_losses(d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relativistic pairing losses ``(discriminator, generator)`` for paired scores."""
    diff = d_real - d_fake
    return F.softplus(-diff).mean(), F.softplus(diff).mean()


def zero_centred_penalty(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` (R1 on real inputs, R2 on fake ones); differentiable."""
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


@dataclass
class R3GANConfig:
    gamma: float = 0.05  # R1 = R2 weight: loss + gamma/2 * (R1 + R2)
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.99)


class R3GANTrainer:
    """One alternating D/G step per batch with the RpGAN + R1 + R2 objective."""

    def __init__(self, generator: Generator, discriminator: Discriminator, config: R3GANConfig | None = None):
        self.g, self.d, self.cfg = generator, discriminator, config or R3GANConfig()
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.g.z_dim, device=next(self.g.parameters()).device)

    def step(self, real: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """``real`` in [-1, 1], ``y`` class indices; returns the step's losses."""
        # discriminator: relativistic pairing + gamma/2 (R1 + R2)
        fake = self.g(self._noise(len(real)), y).detach().requires_grad_(True)
        real = real.detach().requires_grad_(True)
        d_real, d_fake = self.d(real, y), self.d(fake, y)
        loss_d, _ = rpgan_losses(d_real, d_fake)
        r1, r2 = zero_centred_penalty(d_real, real), zero_centred_penalty(d_fake, fake)
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d + self.cfg.gamma / 2 * (r1 + r2)).backward()
        self.opt_d.step()
        # generator: the same pairing, roles swapped
        fake = self.g(self._noise(len(real)), y)
        _, loss_g = rpgan_losses(self.d(real.detach(), y), self.d(fake, y))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {k: v.detach().item() for k, v in
                {"loss_d": loss_d, "loss_g": loss_g, "r1": r1, "r2": r2}.items()}
