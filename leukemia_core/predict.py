"""Predict a folder of single-cell images of any size and source with a DG checkpoint.

The checkpoint's metadata names the preprocessing it was trained with (image size,
scale normalisation, normalisation statistics); :func:`predict_folder` applies exactly
that, so an image from an unseen hospital goes through the same steps as training.
Checkpoints written by ``leukemia-core train`` (no ``dg`` metadata) are accepted too and
use their own evaluation transform.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.records import find_images
from .data.torch_dataset import read_image
from .engine.checkpoint import WEIGHTS, load_weights, read_meta, save_weights
from .errors import LeukemiaError


def save_dg_checkpoint(path, model, classes: list[str], image_size: int, scale_norm, recipe) -> Path:
    """Write ``model.backbone`` as safetensors with what :func:`predict_folder` needs."""
    from dataclasses import asdict

    from . import dg

    meta = {"model": "efficientnet_lite0", "classes": list(classes), "image_size": image_size,
            "mean": list(dg.MEAN), "std": list(dg.STD),
            "dg": {"norm": recipe.norm, "scale_norm": asdict(scale_norm) if scale_norm else None,
                   "stain_norm": recipe.stain_norm, "recipe": recipe.to_dict()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(path, model.backbone, meta)


def load_predictor(checkpoint):
    """``(model, meta, preprocess)``: ``preprocess(PIL image) -> (3 x S x S float tensor, ok)``."""
    from . import dg

    path = Path(checkpoint)
    path = path / WEIGHTS if path.is_dir() else path
    meta = read_meta(path)
    if "dg" not in meta:  # a leukemia-core train checkpoint
        from .pipeline import eval_transform, load_classifier
        net, meta = load_classifier(path)
        tf = eval_transform(meta)
        return net, meta, lambda im: (tf(im), True)
    net = dg.build_backbone(meta["dg"]["norm"], len(meta["classes"]), pretrained=False)
    load_weights(path, net)
    sn = dg.ScaleNorm(**meta["dg"]["scale_norm"]) if meta["dg"]["scale_norm"] else None

    def prep(im):
        arr, ok = dg.preprocess(np.asarray(im), meta["image_size"], sn, meta["dg"].get("stain_norm", False))
        return dg.normalize(torch.from_numpy(arr).permute(2, 0, 1)[None])[0], ok
    return net.eval(), meta, prep


@torch.no_grad()
def predict_folder(checkpoint, folder, out_csv, batch_size: int = 64, overwrite: bool = False,
                   adapt_bn: bool = False) -> pd.DataFrame:
    """Class probabilities for every image under ``folder`` (recursively), written to
    ``out_csv``: one row per image with path, original width/height, predicted class,
    confidence, ``scale_ok`` (a nucleus was found for scale normalisation) and
    ``prob_<class>``. A corrupt image raises :class:`DatasetError` naming the file.

    ``adapt_bn`` re-estimates the BatchNorm statistics on the folder's own images first
    (test-time BN adaptation: worth it for a folder from one new hospital, with dozens of
    images or more; the predictions then depend on the folder as a whole)."""
    out = Path(out_csv)
    if out.exists() and not overwrite:
        raise LeukemiaError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    paths = find_images(folder, recursive=True)
    net, meta, prep = load_predictor(checkpoint)
    if meta.get("dg", {}).get("recipe", {}).get("domain_bn") and not adapt_bn:
        warnings.warn(f"{checkpoint} was trained with domain-wise BatchNorm and expects the target "
                      "hospital's statistics: pass adapt_bn=True (CLI: --adapt-bn) with a folder of "
                      "many cells from one hospital", UserWarning, stacklevel=2)
    classes = meta["classes"]
    images = [read_image(p) for p in paths]  # DatasetError names a corrupt file
    prepped = [prep(im) for im in images]
    x_all = torch.stack([x for x, _ in prepped])
    if adapt_bn:
        from .dg import recompute_bn_float
        net = recompute_bn_float(net, x_all, batch_size)
    rows = []
    for i in range(0, len(paths), batch_size):
        batch = paths[i:i + batch_size]
        probs = net(x_all[i:i + batch_size]).float().softmax(1)
        images_b, prepped_b = images[i:i + batch_size], prepped[i:i + batch_size]
        for p, im, (_, ok), pr in zip(batch, images_b, prepped_b, probs):
            rows.append({"path": str(p), "width": im.width, "height": im.height,
                         "pred": classes[int(pr.argmax())], "confidence": float(pr.max()),
                         "scale_ok": bool(ok), **{f"prob_{c}": float(v) for c, v in zip(classes, pr)}})
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return table


def cmd_predict(args):
    """``leukemia-core predict --images DIR --checkpoint CKPT --out CSV [--overwrite]``."""
    table = predict_folder(args.checkpoint, args.images, args.out, overwrite=args.overwrite,
                           adapt_bn=getattr(args, "adapt_bn", False))
    print(f"wrote {len(table)} predictions to {args.out}")


def add_predict_parser(subparsers):
    pr = subparsers.add_parser("predict", help="class probabilities for a folder of single-cell "
                               "images (any size; the checkpoint's own preprocessing)")
    pr.add_argument("--images", required=True, help="folder of images (searched recursively)")
    pr.add_argument("--checkpoint", required=True, help="model.safetensors or its run folder")
    pr.add_argument("--out", required=True, help="CSV to write")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--adapt-bn", action="store_true",
                    help="re-estimate BatchNorm statistics on the folder's images (one new hospital)")
    pr.set_defaults(func=cmd_predict)
    return pr
