"""One checkpoint format for every model the book trains, and one loader.

Every checkpoint is a safetensors file: the tensors, and JSON metadata under the key
``meta`` with at least a ``kind`` (what to rebuild) and, for models that read images, a
structured ``preprocess`` (image size, mean/std, CLAHE, scale and stain normalisation):

============================  ==========================================  ===============
kind                          written by                                  preprocess
============================  ==========================================  ===============
``classifier``                ``engine.fit`` via ``pipeline``/``train``   resize, CLAHE
``hierarchical``              ``hierarchy.train_hierarchical``            resize
``dg_classifier``             ``dg.save_dg_checkpoint``              scale/stain norm
``vision_language``           ``vl.save_vl``                              (the chapter's)
``detector``                  ``detection.train.save_detector``           the detector's own
``r3gan_generator``           ``gan.train``                               none (a generator)
``fcmae``                     ``ssl.pretrain_fcmae``                      resize (pool statistics)
============================  ==========================================  ===============

:func:`load_checkpoint` dispatches on ``kind``. Checkpoints written before the field
existed are recognised by their metadata and still load; a file that is none of these
fails with a message naming the file and what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from leukemia_core.engine.checkpoint import KINDS, checkpoint_file, read_checkpoint_meta  # noqa: F401 (the format)

#: ``preprocess(PIL image) -> (tensor, ok)``: ``ok`` is False where a step fell back
#: (e.g. scale normalisation found no nucleus).
Preprocess = Callable[[object], tuple[torch.Tensor, bool]]


def _resize_prep(meta: dict) -> Preprocess | None:
    """The evaluation transform of the checkpoint's ``preprocess`` (None when it has none)."""
    if not meta.get("preprocess"):
        return None
    from leukemia_core.data.transforms import eval_transform_from

    tf = eval_transform_from(meta["preprocess"])
    return lambda im: (tf(im), True)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, dict, Preprocess | None]:
    """``(model in eval mode, metadata, preprocess)`` for any leukemia-core checkpoint.

    ``preprocess`` maps one PIL image to the model's input tensor (and whether every step
    applied); it is None for a generator, which reads no images."""
    path = checkpoint_file(path)
    meta = read_checkpoint_meta(path)
    kind = meta["kind"]
    if kind == "classifier":
        from leukemia_core.pipeline import load_classifier

        model, meta = load_classifier(path)
        prep = _resize_prep(meta)
    elif kind == "hierarchical":
        from leukemia_core.hierarchy import load_hierarchical

        model, meta = load_hierarchical(path)
        prep = _resize_prep(meta)
    elif kind == "dg_classifier":
        from leukemia_core.dg import load_dg_checkpoint

        model, meta, prep = load_dg_checkpoint(path)
    elif kind == "vision_language":
        from leukemia_core.vl import load_vl

        model, meta = load_vl(path)
        prep = _resize_prep(meta)
    elif kind == "detector":
        from torchvision.transforms.functional import pil_to_tensor

        from leukemia_core.detection.train import load_detector

        model, values = load_detector(path)
        meta = {**meta, "attribute_values": values}
        prep = lambda im: (pil_to_tensor(im.convert("RGB")).float() / 255, True)  # noqa: E731
    elif kind == "fcmae":
        from leukemia_core.ssl import load_fcmae

        model, meta = load_fcmae(path)
        prep = _resize_prep(meta)
    else:  # r3gan_generator
        from leukemia_core.gan.train import load_generator

        model, meta = load_generator(path)
        prep = None
    return model.to(device).eval(), meta, prep
