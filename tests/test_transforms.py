import numpy as np
import cv2
import pytest
import torch
from PIL import Image

from leukemia_core.data.transforms import CLAHE, build_transform, compute_norm_stats


def _low_contrast(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    blob = 20 * np.exp(-((xx - 128) ** 2 + (yy - 128) ** 2) / 3000.0)
    base = 110 + blob[..., None] + rng.normal(0, 3, size=(256, 256, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _l_std(img):
    return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2LAB)[..., 0].std()


def test_clahe_raises_local_contrast_on_l_channel():
    img = _low_contrast()
    out = CLAHE(clip_limit=4.0, tile_grid=(4, 4))(img)
    assert out.size == img.size and out.mode == "RGB"
    assert _l_std(out) > 1.5 * _l_std(img)
    assert _l_std(CLAHE(4.0)(img)) > 1.1 * _l_std(CLAHE(1.0)(img))  # the clip limit matters


def test_train_and_eval_transforms_shape_and_randomness():
    img = _low_contrast()
    ev = build_transform(32, train=False)
    assert ev(img).shape == (3, 32, 32)
    assert torch.equal(ev(img), ev(img))
    tr = build_transform(32, train=True)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_norm_stats_of_constant_images(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (16, 16), colour).save(p)
        paths.append(p)
    mean, std = compute_norm_stats(paths, 8)
    assert mean == pytest.approx([0.5, 0.0, 0.5], abs=1e-4)
    assert std == pytest.approx([0.5, 0.0, 0.5], abs=1e-4)
