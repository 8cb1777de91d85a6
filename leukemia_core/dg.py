"""Domain-generalisation methods for single-cell classification across hospitals.

- **Scale normalisation**: a nucleus mask from Otsu's threshold on a nucleus-sensitive
  channel; the image is cropped around the nucleus so that it spans a fixed share of the
  output (:func:`scale_normalize`).
- **Stain normalisation** (Reinhard colour transfer to fixed LAB statistics,
  :func:`reinhard`) and **stain augmentation** in HED space (Ruifrok & Johnston's
  matrix, as in scikit-image, which is not installed here) plus colour jitter
  (:func:`hed_jitter`, :func:`augment`).
- **Class-balanced sampling** over (domain, class) cells and a **class-balanced focal
  loss** (effective-number weights of Cui et al. 2019).
- **Supervised contrastive loss** across domains (Khosla et al. 2020; SADA uses it to
  align domains): same-class embeddings attract whatever their hospital.
- **SWA** (``torch.optim.swa_utils``) and **test-time BatchNorm adaptation**; with
  ``Recipe.domain_bn`` also *domain-wise BatchNorm in training* (each domain's share of a
  batch normalised with its own statistics, and validation with each domain's own), so
  that training matches the test-time adaptation (AdaBN, Li et al. 2016).

:func:`train_dg` runs one recipe on in-memory uint8 image arrays; the engine's ``fit``
is not used because the contrastive term needs embeddings and domain ids per batch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import cv2
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from leukemia_core.engine.checkpoint import load_weights, read_meta, save_weights
from leukemia_core.losses.imbalance import class_balanced_weights, focal_loss, supcon_loss
from leukemia_core.models.dg import DGNet, build_backbone
from leukemia_core.engine.loop import Callback, EpochGenerators, LoopConfig, Task
from leukemia_core.engine.loop import train as train_loop
from leukemia_core.models.pretrained import PRETRAINED_CFGS

MEAN, STD = PRETRAINED_CFGS["efficientnet_lite0"].mean, PRETRAINED_CFGS["efficientnet_lite0"].std

# --------------------------------------------------------------------------- stain space
#: Ruifrok & Johnston (2001) haematoxylin / eosin / DAB optical densities (rows), as in
#: ``skimage.color.rgb_from_hed``.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_EPS = math.log(1e-6)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain concentrations (skimage ``rgb2hed``)."""
    od = torch.log(x.clamp_min(1e-6)) / _LOG_EPS
    return torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x)).clamp_min(0)


def hed_to_rgb(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (skimage ``hed2rgb``), clipped to [0, 1]."""
    log_rgb = torch.einsum("bchw,cd->bdhw", s * _LOG_EPS, RGB_FROM_HED.to(s))
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(x: torch.Tensor, sigma: float = 0.2, bias: float = 0.02,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Tellez et al. (2018) stain augmentation: per image and stain, s -> s*a + b with
    a ~ U(1-sigma, 1+sigma), b ~ U(-bias, bias). Input and output RGB in [0, 1]."""
    b = x.shape[0]
    a = 1 + sigma * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    c = bias * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    return hed_to_rgb(rgb_to_hed(x) * a.to(x) + c.to(x))


_JITTER = v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.08)


def augment(x: torch.Tensor, stain: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of [0, 1] images: random flips and right-angle turns; with ``stain``, HED
    jitter and colour jitter (brightness, contrast, saturation, hue) per image."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-2), x)
    turn = torch.rand(b, generator=generator) < 0.5
    x = torch.where(turn[:, None, None, None], x.transpose(-1, -2), x)
    if stain:
        x = hed_jitter(x, generator=generator)
        x = torch.stack([_JITTER(im) for im in x])
    return x


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float normalised for the pretrained backbone."""
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - m) / s


# --------------------------------------------------------------------------- scale
def nucleus_channel(rgb: np.ndarray) -> np.ndarray:
    """Blue minus green: nuclei (azure / haematoxylin) are high in every stain here;
    background, red cells and most cytoplasm are low. (Chosen over (R+B)/2 - G and
    255 - G by nucleus IoU on the Zheng masks, where cytoplasm is stained deeply.)"""
    f = rgb.astype(np.float32)
    return f[..., 2] - f[..., 1]


def nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean nucleus mask of the cell nearest the centre: Otsu on the nucleus channel,
    a small opening, and the connected group (lobes merged by dilation) closest to the
    centre, weighted by size."""
    h, w = rgb.shape[:2]
    c = cv2.GaussianBlur(nucleus_channel(rgb), (0, 0), max(1.0, min(h, w) / 100))
    c8 = cv2.normalize(c, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, m = cv2.threshold(c8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    r = max(1, int(round(min(h, w) * 0.06)))
    grouped = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    n, labels, stats, cents = cv2.connectedComponentsWithStats(grouped)
    if n <= 1:
        return np.zeros((h, w), bool)
    d = np.hypot(cents[1:, 0] - w / 2, cents[1:, 1] - h / 2) / max(h, w)
    score = stats[1:, cv2.CC_STAT_AREA] / (h * w) - d  # big and central
    best = 1 + int(np.argmax(score))
    return (labels == best) & (m > 0)


@dataclass(frozen=True)
class ScaleNorm:
    """Crop a square around the nucleus so that its larger extent spans ``fill`` of the side."""
    fill: float = 0.65
    min_area: float = 0.005  # nucleus share of the image below which we fall back to resizing

    def __call__(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
        """(``size`` x ``size`` uint8 image, whether a nucleus was found)."""
        m = nucleus_mask(rgb)
        if m.mean() < self.min_area:
            return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA), False
        ys, xs = np.nonzero(m)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        half = extent / self.fill / 2
        y0, x0 = int(round(cy - half)), int(round(cx - half))
        side = max(1, int(round(2 * half)))
        h, w = rgb.shape[:2]
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        fill = [int(v) for v in np.median(border, 0)]
        pad = max(0, -y0, -x0, y0 + side - h, x0 + side - w)
        padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=fill)
        crop = padded[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=interp)), True


#: Target LAB statistics (OpenCV 8-bit LAB) for :func:`reinhard`: a light, slightly pink
#: background with a purple foreground, close to the PBC images.
LAB_TARGET = ((185.0, 30.0), (138.0, 8.0), (118.0, 10.0))


def reinhard(rgb: np.ndarray, target=LAB_TARGET) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer to fixed statistics: each LAB channel of the
    image is standardised and given the target mean and std. Deterministic, per image."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    for c, (m, s) in enumerate(target):
        ch = lab[..., c]
        lab[..., c] = (ch - ch.mean()) / max(float(ch.std()), 1e-3) * s + m
    return cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def preprocess(rgb: np.ndarray, size: int, scale_norm: ScaleNorm | None,
               stain_norm: bool = False) -> tuple[np.ndarray, bool]:
    """The deterministic image step of training and prediction: scale normalisation
    (when given) or a plain resize of the whole crop to ``size`` x ``size``; then,
    with ``stain_norm``, Reinhard colour normalisation."""
    if scale_norm is not None:
        out, ok = scale_norm(rgb, size)
    else:
        out, ok = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA), True
    return (reinhard(out) if stain_norm else out), ok


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------- training
@dataclass
class Recipe:
    """One method: which pieces are on. ``scale_norm`` picks the image cache."""
    name: str
    norm: str = "bn"  # bn | gn
    sampler: str = "shuffle"  # shuffle | balanced (equal share per domain x class cell)
    loss: str = "ce"  # ce | cb_focal
    cb_beta: float = 0.99
    focal_gamma: float = 2.0
    stain: bool = False
    scale_norm: bool = False
    stain_norm: bool = False  # Reinhard colour normalisation (with scale_norm: the image cache)
    supcon: float = 0.0  # weight of the contrastive term
    supcon_temperature: float = 0.1
    swa: bool = False  # also keep the SWA average of the epochs' weights
    domain_bn: bool = False  # BatchNorm statistics per domain: in training, validation and test

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Arrays:
    """Images (uint8, N x 3 x S x S), class ids and domain ids."""
    x: torch.Tensor
    y: torch.Tensor
    d: torch.Tensor

    def __len__(self):
        return len(self.y)


@dataclass
class TrainResult:
    model: DGNet  # the best epoch on the training domains' validation images
    swa_model: DGNet | None = None
    history: list = field(default_factory=list)
    best_epoch: int = -1
    train_time_s: float = 0.0


def sample_weights(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample weights giving each (domain, class) cell the same total weight."""
    key = d * 1000 + y
    _, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
    return 1.0 / counts[inv].double()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch(x_uint8: torch.Tensor, device) -> torch.Tensor:
    return normalize(x_uint8).to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_probs(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Softmax outputs (on the CPU) for uint8 images, on the model's device."""
    model.eval()
    dev = _device(model)
    out = [model(_batch(x_uint8[i:i + batch_size], dev)).float().softmax(1).cpu()
           for i in range(0, len(x_uint8), batch_size)]
    return torch.cat(out)


def macro_f1(y: torch.Tensor, pred: torch.Tensor, labels: list[int]) -> float:
    """Macro-F1 over ``labels`` that occur in ``y`` (the held-out domain's classes)."""
    present = [c for c in labels if (y == c).any()]
    return float(f1_score(y.numpy(), pred.numpy(), labels=present, average="macro", zero_division=0))


@torch.no_grad()
def _reestimate_bn(model: nn.Module, batches) -> nn.Module:
    """``model`` (in place) with BatchNorm statistics the cumulative average over ``batches``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the target batches
    model.train()
    for x in batches:
        model(x)
    return model.eval()


def recompute_bn(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """``model`` (in place) with BatchNorm statistics re-estimated on ``x_uint8``."""
    dev = _device(model)
    return _reestimate_bn(model, (_batch(x_uint8[i:i + batch_size], dev)
                                  for i in range(0, len(x_uint8), batch_size)))


def recompute_bn_float(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """:func:`recompute_bn` for already normalised float inputs; returns a copy."""
    return _reestimate_bn(copy.deepcopy(model), (x[i:i + batch_size] for i in range(0, len(x), batch_size)))


def adapt_bn(model: nn.Module, x_uint8: torch.Tensor) -> nn.Module:
    """Test-time BN adaptation: a copy of ``model`` whose BatchNorm statistics are those
    of ``x_uint8`` (the unlabelled target images), everything else unchanged."""
    return recompute_bn(copy.deepcopy(model), x_uint8)


def predict_per_domain(model: nn.Module, data: Arrays) -> torch.Tensor:
    """Class predictions with BatchNorm statistics re-estimated on each domain's images."""
    pred = torch.empty(len(data), dtype=torch.long)
    for dom in data.d.unique():
        sel = data.d == dom
        pred[sel] = predict_probs(adapt_bn(model, data.x[sel]), data.x[sel]).argmax(1)
    return pred


class _EpochBatches:
    """One epoch of index batches: class- and domain-balanced draws with replacement
    (``probs``) or a permutation, from a generator the loop reseeds every epoch."""

    def __init__(self, n: int, batch_size: int, probs: torch.Tensor | None, gen: torch.Generator):
        self.n, self.batch_size, self.probs, self.gen = n, batch_size, probs, gen
        self.steps = max(1, n // batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        k = self.steps * self.batch_size
        idx = (torch.multinomial(self.probs, k, replacement=True, generator=self.gen)
               if self.probs is not None else torch.randperm(self.n, generator=self.gen)[:k])
        return iter(idx.view(self.steps, -1))


class _SWA(Callback):
    """Stochastic weight averaging of every epoch's weights from the second on; BatchNorm
    statistics of the average recomputed on the training images at the end."""

    def __init__(self, model: nn.Module, epochs: int, train_x: torch.Tensor):
        self.swa, self.epochs, self.train_x, self.model = AveragedModel(model), epochs, train_x, None

    def on_epoch_end(self, state, record):
        if state.epoch >= 1 or self.epochs == 1:
            self.swa.update_parameters(state.model)

    def on_fit_end(self, state):
        self.model = recompute_bn(self.swa.module, self.train_x)

    def state_dict(self):
        return {k: v for k, v in self.swa.state_dict().items()}

    def load_state_dict(self, tensors):
        if tensors:
            self.swa.load_state_dict(tensors)


class DGTask(Task):
    """One recipe's training step and its validation (macro-F1 over ``eval_labels`` on the
    training domains' validation images), as a task of the one loop."""

    def __init__(self, recipe: Recipe, train: Arrays, val: Arrays, num_classes: int, eval_labels: list[int],
                 callbacks: tuple):
        self.recipe, self.train, self.val, self.eval_labels = recipe, train, val, eval_labels
        counts = torch.bincount(train.y, minlength=num_classes)
        self.weight = class_balanced_weights(counts, recipe.cb_beta) if recipe.loss == "cb_focal" else None
        self.callbacks = callbacks

    def to_device(self, batch, device, config):
        return batch  # indices; the step builds the images

    def training_step(self, net, b, state):
        recipe, train, device = self.recipe, self.train, state.device
        x = augment(train.x[b].float() / 255, recipe.stain, self.callbacks[0]["augment"])
        x = ((x - 0.5) / 0.5).to(device).contiguous(memory_format=torch.channels_last)
        y, d = train.y[b].to(device), train.d[b].to(device)
        if recipe.domain_bn:  # each domain's share of the batch normalised on its own
            order = torch.argsort(d, stable=True)
            sizes = torch.unique_consecutive(d[order], return_counts=True)[1].tolist()
            outs = [net(chunk, with_embedding=True) for chunk in x[order].split(sizes)]
            logits, z = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            y, d = y[order], d[order]
        else:
            logits, z = net(x, with_embedding=True)
        weight = self.weight.to(device) if self.weight is not None else None
        loss = (focal_loss(logits, y, weight, recipe.focal_gamma) if recipe.loss == "cb_focal"
                else F.cross_entropy(logits.float(), y))
        if recipe.supcon:
            loss = loss + recipe.supcon * supcon_loss(z, y, d, recipe.supcon_temperature)
        return {"loss": loss, "n": len(b)}

    def validate(self, model, state):
        pred = predict_per_domain(model, self.val) if self.recipe.domain_bn \
            else predict_probs(model, self.val.x).argmax(1)
        model.train()
        return {"macro_f1": macro_f1(self.val.y, pred, self.eval_labels)}


def train_dg(recipe: Recipe, train: Arrays, val: Arrays, num_classes: int, eval_labels: list[int],
             epochs: int, lr: float = 2e-3, batch_size: int = 48, seed: int = 0,
             weight_decay: float = 0.01, warmup_frac: float = 0.1, out_dir=None, resume: bool = False,
             stop_after_steps: int | None = None) -> TrainResult:
    """Fine-tune EfficientNet-Lite0 with one recipe on the one loop; model selection by
    macro-F1 over ``eval_labels`` on ``val`` (training domains only). With ``recipe.swa``
    the result also holds the SWA average of every epoch's weights from the second epoch
    on, with BatchNorm statistics recomputed on the training images. With
    ``recipe.domain_bn`` the returned model's running statistics mix the training domains:
    predict with :func:`adapt_bn` on the target domain's images (or
    :func:`predict_per_domain`). ``out_dir``: the loop's resumable training state."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DGNet(build_backbone(recipe.norm, num_classes)).to(device, memory_format=torch.channels_last)
    gens = EpochGenerators(seed, sampler=torch.Generator(), augment=torch.Generator())
    swa = _SWA(model, epochs, train.x) if recipe.swa else None
    task = DGTask(recipe, train, val, num_classes, eval_labels, (gens,) + ((swa,) if swa else ()))
    probs = sample_weights(train.y, train.d) if recipe.sampler == "balanced" else None
    batches = _EpochBatches(len(train), batch_size, probs, gens["sampler"])
    config = LoopConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_frac * epochs,
                        min_lr_ratio=0.0, seed=seed, monitor="macro_f1", progress=False)
    start = time.perf_counter()
    r = train_loop(model, batches, task, config, out_dir=out_dir, resume=resume, device=device,
                   stop_after_steps=stop_after_steps)
    result = TrainResult(model, history=r.history, best_epoch=r.best_epoch)
    if swa is not None and not r.interrupted:
        result.swa_model = swa.model
    result.train_time_s = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- checkpoint
def save_dg_checkpoint(path, model, classes: list[str], image_size: int, scale_norm, recipe,
                       extra: dict | None = None) -> Path:
    """Write ``model.backbone`` as safetensors with what :func:`predict_folder` needs: the
    one checkpoint format (:mod:`leukemia_core.checkpoints`); read back by :func:`load_dg_checkpoint`, kind ``dg_classifier``.
    ``extra``: more fields of ``meta["dg"]`` (e.g. the table row, whether it is used with
    test-time BatchNorm adaptation, the domains it was trained on)."""
    from dataclasses import asdict

    from leukemia_core.data.transforms import preprocess_dict

    meta = {"kind": "dg_classifier", "model": "efficientnet_lite0", "classes": list(classes),
            "image_size": image_size,
            "preprocess": preprocess_dict(image_size, MEAN, STD, None,
                                          scale_norm=asdict(scale_norm) if scale_norm else None,
                                          stain_norm=bool(recipe.stain_norm)),
            "dg": {"norm": recipe.norm, "recipe": recipe.to_dict(), **(extra or {})}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(path, model.backbone, meta)


def load_dg_checkpoint(path):
    """``(model, meta, preprocess)`` of a checkpoint written by :func:`save_dg_checkpoint`
    (also one written before the structured ``preprocess`` field)."""

    path = Path(path)
    meta = read_meta(path)
    if "preprocess" not in meta:  # the earlier layout kept these under "dg"
        meta["preprocess"] = {"image_size": meta["image_size"], "mean": meta["mean"], "std": meta["std"],
                              "clahe": None, "scale_norm": meta["dg"].get("scale_norm"),
                              "stain_norm": bool(meta["dg"].get("stain_norm", False))}
    net = build_backbone(meta["dg"]["norm"], len(meta["classes"]), pretrained=False)
    load_weights(path, net)
    pre = meta["preprocess"]
    sn = ScaleNorm(**pre["scale_norm"]) if pre.get("scale_norm") else None

    def prep(im):
        arr, ok = preprocess(np.asarray(im), pre["image_size"], sn, pre.get("stain_norm", False))
        return normalize(torch.from_numpy(arr).permute(2, 0, 1)[None])[0], ok
    return net.eval(), meta, prep
