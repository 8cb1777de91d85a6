"""FCMAE: the fully convolutional masked autoencoder that pretrains ConvNeXtV2 (Woo et al.,
CVPR 2023), for the R3GAN/hybrid chapter's convolutional branch (issue 19).

An image is cut into a grid of square patches whose side is the encoder's total stride
(32 px for ConvNeXt), a random ``mask_ratio`` of them is hidden, and the encoder sees only
the visible ones. The paper runs the encoder with sparse convolutions; here it runs densely
with the equivalent masking (as the paper's own dense variant does): masked positions are
zero after the stem and after every block, and every Global Response Normalisation sees
them as zero, so no statistic and no visible output depends on a hidden pixel. A light
decoder (one ConvNeXtV2 block; learnable mask tokens at the hidden positions) predicts
every patch's pixels, and the loss is the mean squared error on the hidden patches only,
against per-patch normalised pixels (the paper's ``norm_pix_loss``).

What differs from the paper, and why: 128 px cells instead of 224 px ImageNet images, so a
4 x 4 patch grid instead of 7 x 7 (the patch stays the encoder's stride, which the
sparse/dense equivalence needs); a decoder of width ``decoder_dim`` (256 by default, the
paper's 512 for a ConvNeXtV2-Atto whose last stage has 320 channels would be the largest
part of the network on this CPU).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.convnext import ConvNeXtBlock


def _keep_at(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (B, 1, g, g) keep mask at ``x``'s spatial size (NCHW; nearest upsampling)."""
    size = x.shape[-2:]
    return keep if keep.shape[-2:] == size else F.interpolate(keep, size=size, mode="nearest")


class FCMAE(nn.Module):
    """A timm ConvNeXtV2 encoder (``encoder``: the weights a classifier is fine-tuned from),
    a one-block decoder and the masked reconstruction loss."""

    def __init__(self, encoder: str = "convnextv2_atto", image_size: int = 128, mask_ratio: float = 0.6,
                 decoder_dim: int = 256):
        super().__init__()
        self.encoder = timm.create_model(encoder, num_classes=0)
        self.encoder_name, self.image_size, self.mask_ratio = encoder, image_size, mask_ratio
        self.patch = 32  # stem 4 x three 2x downsamplings
        if image_size % self.patch:
            raise ValueError(f"FCMAE needs an image size divisible by the encoder's stride {self.patch}, "
                             f"got {image_size}")
        self.grid = image_size // self.patch
        if not 0 < round(mask_ratio * self.grid ** 2) < self.grid ** 2:
            raise ValueError(f"mask_ratio {mask_ratio} hides none or all of the {self.grid ** 2} patches")
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = ConvNeXtBlock(decoder_dim, use_grn=True, conv_mlp=True, ls_init_value=None)
        self.pred = nn.Conv2d(decoder_dim, self.patch ** 2 * 3, 1)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._keep: torch.Tensor | None = None
        self._hooks = [self.encoder.stem.register_forward_hook(self._zero_output)]
        for stage in self.encoder.stages:
            for block in stage.blocks:
                self._hooks.append(block.register_forward_hook(self._zero_output))
                grn = getattr(getattr(block, "mlp", None), "grn", None)
                if grn is not None:
                    self._hooks.append(grn.register_forward_pre_hook(self._zero_input))

    # --- the dense equivalent of sparse convolution: hidden positions stay zero
    def _zero_output(self, module, args, out):
        return out if self._keep is None else out * _keep_at(self._keep, out)

    def _zero_input(self, module, args):
        if self._keep is None:
            return None
        x = args[0]
        return (x * _keep_at(self._keep, x),)

    def random_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, g*g) with 1 on the hidden patches: exactly ``round(mask_ratio * g*g)`` per
        image, drawn with torch's global RNG (so a resumed run draws the same masks) or
        ``generator`` (fixed masks, e.g. for monitoring)."""
        n = self.grid ** 2
        hidden = round(self.mask_ratio * n)
        order = torch.rand(batch, n, device=None if generator is not None else device,
                           generator=generator).argsort(dim=1).to(device)
        mask = torch.zeros(batch, n, device=device)
        mask.scatter_(1, order[:, :hidden], 1.0)
        return mask

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, C, g, g) of the visible patches (hidden inputs zeroed too)."""
        keep = 1.0 - mask.view(-1, 1, self.grid, self.grid).to(x.dtype)
        self._keep = keep
        try:
            return self.encoder.forward_features(x * _keep_at(keep, x))
        finally:
            self._keep = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, g*g, patch*patch*3)."""
        z = self.proj(self.encode(x, mask))
        m = mask.view(-1, 1, self.grid, self.grid).to(z.dtype)
        z = z * (1 - m) + self.mask_token.to(z.dtype) * m
        out = self.pred(self.decoder(z))  # (B, p*p*3, g, g)
        return out.flatten(2).transpose(1, 2)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, g*g, patch*patch*3), patches in row-major order."""
        p, g = self.patch, self.grid
        x = x.reshape(x.shape[0], 3, g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(x.shape[0], g * g, p * p * 3)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, g = self.patch, self.grid
        x = patches.reshape(patches.shape[0], g, g, p, p, 3)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(patches.shape[0], 3, g * p, g * p)

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the hidden patches, each patch's target normalised by its
        own mean and variance."""
        target = self.patchify(x.float())
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images with the hidden patches replaced by the prediction, de-normalised with each
        hidden patch's own statistics (what the chapter shows)."""
        target = self.patchify(x)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = self(x, mask) * (var + 1e-6) ** 0.5 + mean
        patches = torch.where(mask.bool().unsqueeze(-1), pred, target)
        return self.unpatchify(patches)
