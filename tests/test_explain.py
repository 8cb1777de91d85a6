"""CAMs through grad-cam: the architecture -> target-layer mapping (CNN, ViT, Swin, models
that name their own layers), CAM shapes, faithfulness against random maps on a model
where it must hold, and clear errors for bad input. Tiny random-weight models, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from leukemia_core.explain import cams as explain
from leukemia_core.errors import LeukemiaError, UnknownNameError
from leukemia_core.models import create_model

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def tiny(name: str) -> nn.Module:
    kw = {}
    if name.startswith("vit"):
        kw = dict(img_size=SIZE, depth=2, embed_dim=48, num_heads=2)
    elif name.startswith("swin"):
        kw = dict(img_size=SIZE, window_size=2, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 2, 2))
    if name == "efficientnet_lite0":  # the book's registered model (timm tf_efficientnet_lite0)
        return create_model(name, num_classes=3).eval()
    return timm.create_model(name, num_classes=3, **kw).eval()


@pytest.mark.parametrize("name, where", [
    ("convnext_atto", "stages.2 (stride 16)"),  # the last stage is 2x2 at 64 px: one earlier
    ("efficientnet_lite0", "blocks.4 (stride 16)"),
    ("resnet18", "layer3 (stride 16)"),
    ("vit_tiny_patch16_224", "blocks.1.norm1 (patch tokens on a 4x4 grid)"),
    ("swin_tiny_patch4_window7_224", "layers.2.blocks.0.norm1 (stride 16, NHWC)"),
])
def test_mapping_and_cam_shapes(name, where):
    model = tiny(name)
    target = explain.cam_target(model, SIZE)
    assert target.where == where
    x = torch.randn(2, 3, SIZE, SIZE)
    assert explain.feature_grid(model, target, x) == (4, 4)
    for method in explain.METHODS:
        cams = explain.compute_cams(model, x, method, targets=[0, 2])
        assert cams.shape == (2, SIZE, SIZE) and cams.dtype == np.float32, method
        assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6, method


def test_last_stage_at_full_size():
    model = tiny("convnext_atto")
    assert explain.cam_target(model, 224).where == "stages.3 (stride 32)"
    assert explain.cam_target(tiny("efficientnet_lite0"), 224).where == "bn2 (stride 32)"


class BlobNet(nn.Module):
    """Scores class 0 by how much bright stuff the image holds; names its own CAM layer.
    Only the blob is evidence, so a faithful map must point at the blob."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
        self.head = nn.Linear(4, 2)
        self.num_classes = 2
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 27)
            self.features[0].bias.zero_()
            self.head.weight.copy_(torch.tensor([[3.0] * 4, [-3.0] * 4]))
            self.head.bias.copy_(torch.tensor([-0.5, 0.5]))

    def cam_target_layers(self):
        return [self.features]

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)) * 16)


def blobs(n: int = 10, size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 3, size, size)
    for i in range(n):
        r, c = rng.integers(0, size - 8, 2)
        x[i, :, r:r + 8, c:c + 8] = 1.0
    return x


def test_a_model_can_name_its_own_layers():
    model = BlobNet().eval()
    target = explain.cam_target(model)
    assert target.layers == [model.features] and "cam_target_layers" in target.where
    model.cam_reshape = lambda t: t  # used when given
    assert explain.cam_target(model).reshape is model.cam_reshape


def test_registered_rule_for_a_new_architecture():
    class Hybrid(nn.Module):  # e.g. the ConvNeXtV2-Swin hybrid, before it has a hook
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, stride=4, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    with pytest.raises(UnknownNameError, match="cam_target_layers"):
        explain.cam_target(Hybrid())
    rule = explain.register_cam_target("test hybrid", lambda m: isinstance(m, Hybrid))(
        lambda m, size, min_size: explain.CamTarget([m.body], None, "body"))
    try:
        model = Hybrid().eval()
        assert explain.cam_target(model).where == "body"
        assert explain.compute_cams(model, torch.randn(1, 3, 32, 32), "gradcam++").shape == (1, 32, 32)
    finally:
        explain._RULES[:] = [r for r in explain._RULES if r[2] is not rule]


def test_tokens_to_grid_drops_prefix_tokens():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class token + 2x2
    grid = explain.tokens_to_grid(tokens, prefix=1)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1])
    with pytest.raises(LeukemiaError, match="grid"):
        explain.tokens_to_grid(tokens, prefix=0)


def test_random_maps():
    maps = explain.random_maps(3, (4, 4), (32, 32), seed=1)
    assert maps.shape == (3, 32, 32) and maps.min() == 0 and np.isclose(maps.max(), 1)
    assert np.array_equal(maps, explain.random_maps(3, (4, 4), (32, 32), seed=1))


def test_overlay_changes_the_image():
    image = np.full((40, 40, 3), 128, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[2:4, 2:4] = 1
    out = explain.overlay(image, cam)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_cams_beat_random_maps_where_they_must():
    model = BlobNet().eval()
    x = blobs()
    table, per_image = explain.faithfulness(model, x, percentiles=(25, 50, 75))
    assert list(table.index) == list(explain.METHODS) + list(explain.BASELINES)
    assert len(per_image) == len(table) * len(x)
    for method in ("Grad-CAM", "Grad-CAM++", "LayerCAM"):
        assert table.loc[method, "ROAD"] > table.loc["random map", "ROAD"] + 0.05, table
        assert table.loc[method, "wins vs random"] >= 0.8, table
    assert np.isnan(table.loc["random map", "gain over random"])
    assert table.attrs["images"] == len(x) and table.attrs["percentiles"] == [25, 50, 75]


def test_bad_input_errors():
    model = BlobNet().eval()
    x = blobs(2)
    with pytest.raises(UnknownNameError, match="unknown CAM method 'gradcum'.*Grad-CAM"):
        explain.compute_cams(model, x, "gradcum")
    with pytest.raises(LeukemiaError, match=r"shape \(batch, 3, H, W\)"):
        explain.compute_cams(model, x[0])
    with pytest.raises(LeukemiaError, match="shape"):
        explain.compute_cams(model, np.zeros((1, 3, 8, 8)))
    with pytest.raises(UnknownNameError, match="out of range"):
        explain.compute_cams(model, x, targets=[0, 5])
    with pytest.raises(LeukemiaError, match="2 images"):
        explain.compute_cams(model, x, targets=[0])
    assert explain.method_class("grad_cam++") is explain.method_class("Grad-CAM++")


def test_callable_targets_for_embedding_models():
    """A vision-language image tower has no classes: the target is a similarity to a sentence."""
    from torch.nn.functional import cosine_similarity

    model = BlobNet().eval()
    text = torch.tensor([1.0, -1.0])
    sim = lambda out: cosine_similarity(out.flatten(), text, dim=0)
    x = blobs(3)
    cams = explain.compute_cams(model, x, "Grad-CAM", targets=[sim] * 3)
    assert cams.shape == (3, 32, 32) and cams.max() > 0
    road = explain.road_scores(model, x, cams, [sim] * 3)
    assert list(road.columns) == ["MoRF", "LeRF", "ROAD"] and len(road) == 3
