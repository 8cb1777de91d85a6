"""One checkpoint format: every kind the book writes loads through one call,
``load_checkpoint(path) -> (model, meta, preprocess)``, with its preprocessing stored as
structured data; checkpoints in the earlier layouts still load; anything else fails with
a message naming the file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from leukemia_core import dg
from leukemia_core.checkpoints import load_checkpoint
from leukemia_core.engine.checkpoint import KINDS, read_checkpoint_meta, save_weights
from leukemia_core.errors import CheckpointError
from leukemia_core.models import create_model
from leukemia_core.data.transforms import CLAHE, build_transform, preprocess_dict

CLASSES = ["a", "b", "c"]


def cell(seed: int = 0, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_classifier_round_trip_with_structured_preprocess(tmp_path):
    torch.manual_seed(0)
    net = create_model("efficientnet_lite0", num_classes=3)
    clahe = CLAHE(3.0, (4, 4))
    meta = {"kind": "classifier", "model": "efficientnet_lite0", "classes": CLASSES, "image_size": 32,
            "preprocess": preprocess_dict(32, [0.4, 0.5, 0.6], [0.2, 0.2, 0.2], clahe)}
    path = save_weights(tmp_path / "model.safetensors", net, meta)
    model, got, prep = load_checkpoint(tmp_path)  # a run folder works too
    assert got["kind"] == "classifier" and got["preprocess"]["clahe"] == {"clip_limit": 3.0, "tile_grid": [4, 4]}
    x, ok = prep(cell())
    expected = build_transform(32, False, [0.4, 0.5, 0.6], [0.2, 0.2, 0.2], clahe)(cell())
    assert ok and torch.equal(x, expected)
    without = build_transform(32, False, [0.4, 0.5, 0.6], [0.2, 0.2, 0.2], None)(cell())
    assert not torch.equal(x, without), "CLAHE was dropped from the stored preprocessing"
    same_outputs(model, net, x[None])
    assert read_checkpoint_meta(path)["kind"] == "classifier"


def test_classifier_in_the_earlier_layout_still_loads(tmp_path):
    """Before the structured field: mean/std at the top and CLAHE as a repr string."""
    net = create_model("efficientnet_lite0", num_classes=3)
    old = {"model": "efficientnet_lite0", "classes": CLASSES, "image_size": 32, "mean": [0.5] * 3,
           "std": [0.25] * 3, "clahe": repr(CLAHE(2.0, (8, 8)))}
    save_weights(tmp_path / "old.safetensors", net, old)
    _, meta, prep = load_checkpoint(tmp_path / "old.safetensors")
    assert meta["kind"] == "classifier"
    assert meta["preprocess"]["clahe"] == {"clip_limit": 2.0, "tile_grid": [8, 8]}
    assert torch.equal(prep(cell())[0], build_transform(32, False, [0.5] * 3, [0.25] * 3, CLAHE(2.0, (8, 8)))(cell()))


def test_dg_classifier_round_trip(tmp_path):
    from leukemia_core.dg import save_dg_checkpoint

    torch.manual_seed(0)
    model = dg.DGNet(dg.build_backbone("bn", 3, pretrained=False))
    path = save_dg_checkpoint(tmp_path / "m.safetensors", model, CLASSES, 32, dg.ScaleNorm(), dg.Recipe("t"))
    net, meta, prep = load_checkpoint(path)
    assert meta["kind"] == "dg_classifier" and meta["preprocess"]["scale_norm"]["fill"] == dg.ScaleNorm().fill
    x, ok = prep(cell(1, 64))
    assert x.shape == (3, 32, 32) and isinstance(ok, bool)
    same_outputs(net, model.backbone, x[None])


def test_detector_round_trip_and_earlier_layout(tmp_path):
    from leukemia_core.detection.model import WBCDetector
    from leukemia_core.detection.train import save_detector

    torch.manual_seed(0)
    det = WBCDetector(attributes={"size": 2}, short_side=64, fpn_channels=32, pretrained=False,
                      score_thresh=0.0).eval()
    save_detector(det, tmp_path / "det.safetensors", {"size": ["big", "small"]})
    model, meta, prep = load_checkpoint(tmp_path / "det.safetensors")
    assert meta["kind"] == "detector" and meta["attribute_values"] == {"size": ["big", "small"]}
    x, _ = prep(Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 200, 3), dtype=np.uint8)))  # FCOS: P7 >= 2 px
    with torch.no_grad():
        a, b = model([x])[0], det([x])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    # the earlier layout: config and value names as their own metadata keys
    state = {k: v.contiguous() for k, v in det.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"),
              metadata={"config": json.dumps(det.config), "attribute_values": json.dumps({"size": ["big", "small"]})})
    assert load_checkpoint(tmp_path / "old.safetensors")[1]["kind"] == "detector"


def test_generator_round_trip(tmp_path):
    from leukemia_core.gan.train import train_r3gan

    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    run = train_r3gan(images, [0, 1] * 4, 2, steps=1, batch=4, net={"base": 8, "max_width": 16},
                      out=tmp_path / "g.safetensors")
    g, meta, prep = load_checkpoint(tmp_path / "g.safetensors")
    assert meta["kind"] == "r3gan_generator" and prep is None
    u, y = torch.randn(2, run.generator.z_dim), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(g(u, y), run.generator(u, y))


def test_every_kind_has_a_loader():
    """Each kind is rebuilt by a round trip above (``hierarchical``: in test_hierarchy.py,
    ``fcmae``: in test_fcmae.py)."""
    assert set(KINDS) == {"classifier", "hierarchical", "dg_classifier", "vision_language", "detector",
                          "r3gan_generator", "fcmae"}


def test_bad_files_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors.*safetensors file written by leukemia-core"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"), metadata={"meta": "{}"})
    with pytest.raises(CheckpointError, match="foreign.safetensors is not a checkpoint.*leukemia-core train"):
        load_checkpoint(tmp_path / "foreign.safetensors")
