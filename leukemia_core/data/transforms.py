"""Image transforms: resize, augmentation, CLAHE, and normalisation statistics."""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CLAHE:
    """Contrast-limited adaptive histogram equalisation on the L channel of LAB."""

    def __init__(self, clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)):
        self.clip_limit, self.tile_grid = float(clip_limit), tuple(tile_grid)

    def __call__(self, image: Image.Image) -> Image.Image:
        lab = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2LAB)
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=self.tile_grid)
        lab[..., 0] = clahe.apply(lab[..., 0])
        return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))

    def __repr__(self):
        return f"CLAHE(clip_limit={self.clip_limit}, tile_grid={self.tile_grid})"

    def to_dict(self) -> dict:
        return {"clip_limit": self.clip_limit, "tile_grid": list(self.tile_grid)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "CLAHE | None":
        return None if not d else cls(d["clip_limit"], tuple(d["tile_grid"]))


def static_transform(image_size: int, clahe: CLAHE | None = None) -> v2.Compose:
    """The deterministic part on PIL images (CLAHE, then resize); cacheable."""
    return v2.Compose(([clahe] if clahe is not None else []) +
                      [v2.Resize((image_size, image_size), antialias=True)])


def build_transform(image_size: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    clahe: CLAHE | None = None, color_jitter: float = 0.1,
                    rotate_degrees: float = 0.0) -> v2.Compose:
    """PIL image -> normalised float tensor of ``image_size`` x ``image_size``.

    The whole field is resized (cells sit in the centre of every single-cell set).
    Training adds flips, right-angle rotations, optional small rotations and colour jitter
    (brightness, contrast, saturation; hue jitter is left to stain augmentation).
    """
    steps = [static_transform(image_size, clahe), v2.ToImage()]
    if train:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                  v2.RandomApply([v2.RandomRotation((90, 90))], p=0.5)]
        if rotate_degrees:
            steps.append(v2.RandomRotation(rotate_degrees))
        if color_jitter:
            steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def compute_norm_stats(paths, image_size: int, max_images: int = 2000, seed: int = 0,
                       clahe: CLAHE | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``max_images`` training images (after resize)."""
    from leukemia_core.data.torch_dataset import read_image

    paths = list(paths)
    rng = np.random.default_rng(seed)
    if len(paths) > max_images:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_images, replace=False))]
    to_tensor = build_transform(image_size, train=False, mean=(0, 0, 0), std=(1, 1, 1), clahe=clahe)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    n = 0
    for p in paths:
        x = to_tensor(read_image(p)).double()
        total += x.sum((1, 2))
        total_sq += (x ** 2).sum((1, 2))
        n += x.shape[1] * x.shape[2]
    mean = total / n
    std = (total_sq / n - mean ** 2).sqrt()
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def preprocess_dict(image_size: int, mean, std, clahe: CLAHE | None = None, **extra) -> dict:
    """A checkpoint's preprocessing as structured data (stored in its metadata under
    ``preprocess``): what :func:`eval_transform_from` rebuilds at prediction time."""
    return {"image_size": int(image_size), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "clahe": clahe.to_dict() if clahe is not None else None, **extra}


def eval_transform_from(preprocess: dict) -> v2.Compose:
    """The evaluation transform of a :func:`preprocess_dict`."""
    return build_transform(preprocess["image_size"], False, preprocess["mean"], preprocess["std"],
                           CLAHE.from_dict(preprocess.get("clahe")))
