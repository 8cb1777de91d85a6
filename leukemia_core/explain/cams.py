"""Explanations: class activation maps (CAMs) and how faithful they are.

Every CAM comes from the grad-cam package (``pytorch_grad_cam``); this module only decides
*where* to look (:func:`cam_target`: one mapping from architecture to target layer and
reshape transform) and *how well* a map explains the model (:func:`faithfulness`: ROAD
scores against random maps). Chapters and the prediction explorer call it rather than
their own code.

Where the CAM looks, in order of precedence:

1. a model that defines ``cam_target_layers()`` (and optionally ``cam_reshape``, a callable
   turning the layer's output into ``(B, C, H, W)``) is taken at its word: new architectures
   (a ConvNeXtV2-Swin hybrid, a vision-language image tower) plug in this way;
2. rules registered with :func:`register_cam_target`, tried in order: timm ViTs (the
   input of the last block's attention, ``blocks[-1].norm1``, prefix tokens dropped and
   patch tokens laid out on their grid), timm Swin (``norm1`` of the last block of a
   stage, NHWC to NCHW), and any timm CNN with ``feature_info`` (ConvNeXt, EfficientNet,
   ResNet, ...: the output of a stage; for EfficientNet the final 1x1 conv head).

For the transformers these are the "attention-aware" variants the grad-cam package
documents: the same Grad-CAM / Grad-CAM++ / EigenCAM algorithms applied to the tokens that
enter self-attention, reshaped to the patch grid. For CNNs and Swin the stage is the last
one whose feature map is still at least ``min_cam_size`` cells wide at the model's input
size (the last stage of ConvNeXt is 2x2 at 64 px; a 2x2 map cannot localise a cell).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from leukemia_core.errors import LeukemiaError, UnknownNameError


def _methods() -> dict:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM

    return {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "EigenCAM": EigenCAM,
            "LayerCAM": LayerCAM}


#: The CAM methods offered everywhere (display name -> pytorch_grad_cam class).
METHODS = tuple(_methods())
#: The baselines of :func:`faithfulness`: random maps at the CAM's own resolution, and
#: grad-cam's RandomCAM (random weights over the same target-layer activations).
BASELINES = ("random map", "RandomCAM")


def method_class(name: str):
    """The grad-cam class of a method; case, spaces, ``-`` and ``_`` are ignored."""
    key = lambda s: s.lower().replace("-", "").replace("_", "").replace(" ", "")
    table = _methods()
    from pytorch_grad_cam import RandomCAM
    table["RandomCAM"] = RandomCAM
    found = {key(k): v for k, v in table.items()}.get(key(name))
    if found is None:
        raise UnknownNameError(f"unknown CAM method '{name}'; choose one of {list(table)}")
    return found


# --------------------------------------------------------------------------- target layers
@dataclass(frozen=True)
class CamTarget:
    """Where a CAM is computed: layers, the reshape of their output to NCHW, a description."""

    layers: list
    reshape: Callable | None = None
    where: str = ""


_RULES: list[tuple[str, Callable[[nn.Module], bool], Callable]] = []


def register_cam_target(name: str, applies: Callable[[nn.Module], bool]):
    """Decorator: register ``fn(model, image_size, min_cam_size) -> CamTarget`` for the
    models ``applies(model)`` accepts. Later registrations are tried first."""
    def wrap(fn):
        _RULES.insert(0, (name, applies, fn))
        return fn
    return wrap


def tokens_to_grid(tokens: torch.Tensor, prefix: int = 0, grid: tuple[int, int] | None = None):
    """ViT tokens ``(B, prefix + H*W, C)`` -> ``(B, C, H, W)``, dropping class/register tokens."""
    x = tokens[:, prefix:, :]
    h, w = grid or (int(math.isqrt(x.shape[1])),) * 2
    if h * w != x.shape[1]:
        raise LeukemiaError(f"cannot lay {x.shape[1]} patch tokens on a {h}x{w} grid")
    return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Swin's channels-last feature maps ``(B, H, W, C)`` -> ``(B, C, H, W)``."""
    return x.permute(0, 3, 1, 2)


def _image_size(model: nn.Module, image_size: int | None) -> int | None:
    if image_size:
        return int(image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", [None])[-1]
    return int(size[-1] if isinstance(size, (tuple, list)) else size) if size else None


def _pick_stage(model: nn.Module, image_size: int | None, min_cam_size: int) -> dict:
    """The deepest ``feature_info`` stage whose map is >= ``min_cam_size`` cells at ``image_size``."""
    stages = list(model.feature_info)
    size = _image_size(model, image_size)
    if size:
        wide = [s for s in stages if size // s["reduction"] >= min_cam_size]
        return (wide or stages[:1])[-1]
    return stages[-1]


def _is(model, module: str, cls: str) -> bool:
    import importlib

    try:
        return isinstance(model, getattr(importlib.import_module(f"timm.models.{module}"), cls))
    except (ImportError, AttributeError):
        return False


@register_cam_target("timm CNN (feature_info)", lambda m: isinstance(getattr(m, "feature_info", None), list)
                     and hasattr(m, "forward_features"))
def _cnn_target(model, image_size, min_cam_size):
    stage = _pick_stage(model, image_size, min_cam_size)
    name = stage["module"]
    if name == model.feature_info[-1]["module"] and hasattr(model, "conv_head") and hasattr(model, "bn2"):
        name = "bn2"  # EfficientNet family: the 1x1 head conv (with its activation) feeds the classifier
    return CamTarget([model.get_submodule(name)], None, f"{name} (stride {stage['reduction']})")


@register_cam_target("timm Swin", lambda m: _is(m, "swin_transformer", "SwinTransformer")
                     or _is(m, "swin_transformer_v2", "SwinTransformerV2"))
def _swin_target(model, image_size, min_cam_size):
    stage = _pick_stage(model, image_size, min_cam_size)
    name = f"{stage['module']}.blocks.{len(model.get_submodule(stage['module']).blocks) - 1}.norm1"
    return CamTarget([model.get_submodule(name)], nhwc_to_nchw, f"{name} (stride {stage['reduction']}, NHWC)")


@register_cam_target("timm ViT", lambda m: _is(m, "vision_transformer", "VisionTransformer"))
def _vit_target(model, image_size, min_cam_size):
    grid = getattr(model.patch_embed, "grid_size", None)
    if getattr(model.patch_embed, "dynamic_img_size", False):
        grid = None  # infer a square grid from the token count

    def reshape(x, prefix=model.num_prefix_tokens, grid=tuple(grid) if grid else None):
        return tokens_to_grid(x, prefix, grid)

    name = f"blocks.{len(model.blocks) - 1}.norm1"
    return CamTarget([model.get_submodule(name)], reshape,
                     f"{name} (patch tokens on a {grid[0]}x{grid[1]} grid)" if grid else name)


def cam_target(model: nn.Module, image_size: int | None = None, min_cam_size: int = 4) -> CamTarget:
    """Target layers and reshape transform for ``model`` (see the module docstring)."""
    hook = getattr(model, "cam_target_layers", None)
    if callable(hook):
        layers = list(hook())
        if not layers:
            raise LeukemiaError(f"{type(model).__name__}.cam_target_layers() returned no layer")
        return CamTarget(layers, getattr(model, "cam_reshape", None), f"{type(model).__name__}.cam_target_layers()")
    for _, applies, build in _RULES:
        if applies(model):
            return build(model, image_size, min_cam_size)
    raise UnknownNameError(
        f"no CAM target layer is known for {type(model).__name__}: give the model a "
        "cam_target_layers() method (and cam_reshape if its output is not NCHW), or register "
        "a rule with leukemia_core.explain.cams.register_cam_target")


# --------------------------------------------------------------------------- CAMs
def _check_input(model: nn.Module, images: torch.Tensor, targets) -> list | None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise LeukemiaError(f"CAMs need a float tensor of shape (batch, 3, H, W); got {shape}. "
                            "Use pipeline.eval_transform(meta) on each image and torch.stack them")
    if targets is None:
        return None
    targets = list(targets)
    if len(targets) != len(images):
        raise LeukemiaError(f"{len(targets)} target classes for {len(images)} images")
    n = getattr(model, "num_classes", None)
    bad = [t for t in targets if not callable(t) and (int(t) < 0 or (n and int(t) >= n))]
    if bad:
        raise UnknownNameError(f"target class index(es) {bad} out of range for a model with {n} outputs")
    return [t if callable(t) else int(t) for t in targets]


def _as_targets(targets, wrap) -> list:
    """grad-cam targets: class indices wrapped by ``wrap``, callables (e.g. a similarity to
    a sentence embedding for a vision-language image tower) used as they are."""
    return [t if callable(t) else wrap(t) for t in targets]


def compute_cams(model: nn.Module, images: torch.Tensor, method: str = "Grad-CAM",
                 targets: list[int] | None = None, target: CamTarget | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """CAMs ``(B, H, W)`` in [0, 1] at the input's resolution with the grad-cam ``method``
    for ``targets``: class indices, or any grad-cam target callables (e.g. the cosine
    similarity of an image embedding to a sentence); ``None``: the predicted class."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = method_class(method)
    targets = _check_input(model, images, targets)
    target = target or cam_target(model, images.shape[-1])
    out = []
    # BLAS threads only spin on matrices this small (EigenCAM's SVDs: 10x faster on one thread)
    with threadpool_limits(1), cls(model=model, target_layers=target.layers,
                                   reshape_transform=target.reshape) as cam:
        for i in range(0, len(images), batch_size):
            t = None if targets is None else _as_targets(targets[i:i + batch_size], ClassifierOutputTarget)
            out.append(cam(input_tensor=images[i:i + batch_size], targets=t))
    return np.concatenate(out).astype(np.float32)


def feature_grid(model: nn.Module, target: CamTarget, image: torch.Tensor) -> tuple[int, int]:
    """The (H, W) of the target layer's map for one input (after the reshape)."""
    seen = []
    handle = target.layers[0].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(image[:1])
    finally:
        handle.remove()
    out = target.reshape(seen[0]) if target.reshape else seen[0]
    return tuple(out.shape[-2:])


def random_maps(n: int, grid: tuple[int, int], size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` uniform-noise maps drawn on ``grid`` and resized bilinearly to ``size`` (H, W),
    in [0, 1]: a baseline with the same coarseness as a CAM but no information."""
    import cv2

    rng = np.random.default_rng(seed)
    maps = [cv2.resize(rng.random(grid, dtype=np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)
            for _ in range(n)]
    maps = np.stack(maps)
    lo, hi = maps.min((1, 2), keepdims=True), maps.max((1, 2), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-7)


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """A uint8 RGB image with ``cam`` (any size, [0, 1]) drawn over it as a jet heatmap."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = np.asarray(image)
    cam = cv2.resize(np.asarray(cam, np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(image.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=image_weight)


# --------------------------------------------------------------------------- faithfulness
def road_scores(model: nn.Module, images: torch.Tensor, cams: np.ndarray, targets: list,
                percentiles=(25, 50, 75), seed: int = 0) -> pd.DataFrame:
    """Per-image ROAD (Rong et al. 2022) with grad-cam's imputer: the change in the target
    class's softmax probability (or a callable target's score) when the most (MoRF) or
    least (LeRF) relevant pixels are imputed, averaged over ``percentiles``;
    ``ROAD = (LeRF - MoRF) / 2``, higher is better."""
    from pytorch_grad_cam.metrics.road import (ROADLeastRelevantFirstAverage,
                                               ROADMostRelevantFirstAverage)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model.eval()
    t = _as_targets(targets, ClassifierOutputSoftmaxTarget)
    torch.manual_seed(seed)  # the imputer adds a little Gaussian noise
    with threadpool_limits(1), warnings.catch_warnings():
        # grad-cam's imputer calls np.argwhere on a torch tensor (NumPy 2 deprecation, harmless)
        warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
        morf = ROADMostRelevantFirstAverage(list(percentiles))(images, cams, t, model)
        lerf = ROADLeastRelevantFirstAverage(list(percentiles))(images, cams, t, model)
    return pd.DataFrame({"MoRF": morf, "LeRF": lerf, "ROAD": (lerf - morf) / 2})


def faithfulness(model: nn.Module, images: torch.Tensor, methods=METHODS, baselines=BASELINES,
                 targets: list[int] | None = None, percentiles=(25, 50, 75), seed: int = 0,
                 target: CamTarget | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROAD of each CAM method and baseline on ``images`` (for the predicted class unless
    ``targets`` are given). Returns ``(table, per_image)``: the table has one row per
    method, with mean MoRF / LeRF / ROAD, and, against the random-map baseline, the mean
    paired gain, the share of images where the method wins, and a Wilcoxon p-value."""
    from scipy.stats import wilcoxon

    targets = _check_input(model, images, targets)
    if targets is None:
        with torch.no_grad():
            targets = model(images).argmax(1).tolist()
    target = target or cam_target(model, images.shape[-1])
    rows = []
    for name in list(methods) + list(baselines):
        if name == "random map":
            cams = random_maps(len(images), feature_grid(model, target, images), tuple(images.shape[-2:]), seed)
        else:
            torch.manual_seed(seed)  # RandomCAM draws its weights from numpy: seed that too
            np.random.seed(seed)
            cams = compute_cams(model, images, name, targets, target)
        part = road_scores(model, images, cams, targets, percentiles, seed)
        rows.append(part.assign(method=name, image=range(len(images))))
    per_image = pd.concat(rows, ignore_index=True)
    wide = per_image.pivot(index="image", columns="method", values="ROAD")
    table = per_image.groupby("method", sort=False)[["MoRF", "LeRF", "ROAD"]].mean()
    if "random map" in wide:
        gain = wide.sub(wide["random map"], axis=0)
        itself = table.index == "random map"
        table["gain over random"] = gain.mean().reindex(table.index).mask(itself)
        table["wins vs random"] = (gain > 0).mean().reindex(table.index).mask(itself)
        table["p (Wilcoxon)"] = [np.nan if m == "random map" or not gain[m].any()
                                 else wilcoxon(gain[m]).pvalue for m in table.index]
    table.attrs.update(percentiles=list(percentiles), images=len(images), where=target.where)
    return table, per_image


# --------------------------------------------------------------------------- galleries
def cam_gallery(model: nn.Module, meta: dict, paths, labels=None, methods=METHODS, size: float = 1.5):
    """A matplotlib figure: one row per image (original, then one CAM per method) for the
    predicted class; titles give true -> predicted (probability)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from leukemia_core.data.torch_dataset import read_image
    from leukemia_core.pipeline import eval_transform

    tf = eval_transform(meta)
    images = [read_image(p) for p in paths]
    x = torch.stack([tf(im) for im in images])
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)
    pred = probs.argmax(1).tolist()
    cams = {m: compute_cams(model, x, m, pred) for m in methods}
    side = x.shape[-1] * 2
    fig, axes = plt.subplots(len(images), len(methods) + 1, squeeze=False,
                             figsize=((len(methods) + 1) * size, len(images) * (size + 0.2)))
    for r, im in enumerate(images):
        thumb = np.asarray(im.resize((side, side), Image.BILINEAR))
        title = f"{labels[r]} → " if labels is not None else ""
        panels = [(thumb, f"{title}{meta['classes'][pred[r]]} ({probs[r, pred[r]]:.2f})")]
        panels += [(overlay(thumb, cams[m][r]), m if r == 0 else "") for m in methods]
        for ax, (img, t) in zip(axes[r], panels):
            ax.imshow(img)
            ax.set_title(t, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return fig
