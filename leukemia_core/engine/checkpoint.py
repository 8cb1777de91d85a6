"""safetensors checkpoints: weights + JSON metadata (the training state for resuming is
written by :mod:`leukemia_core.engine.loop`).

Nothing is pickled: tensors go into safetensors, everything else into its
string metadata as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leukemia_core.errors import CheckpointError

WEIGHTS = "model.safetensors"
STATE = "train_state.safetensors"
#: What a checkpoint holds, in its metadata's ``kind``; leukemia_core.checkpoints rebuilds each.
KINDS = ("classifier", "hierarchical", "dg_classifier", "vision_language", "detector", "r3gan_generator", "fcmae")


def save_weights(path: Path, model: torch.nn.Module, meta: dict | None = None) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"meta": json.dumps(meta or {})})
    return Path(path)


def read_meta(path: Path) -> dict:
    """The JSON metadata stored beside the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}") from exc
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; it must be a "
                              "safetensors file written by leukemia-core") from exc


#: Key prefix of the per-channel scales of int8-stored weights (:func:`encode_int8`).
INT8_SCALE = "int8_scale/"


def encode_int8(state: dict[str, torch.Tensor], min_rows: int = 8, min_numel: int = 1024) -> dict[str, torch.Tensor]:
    """A state dict for storage with its weight matrices and kernels in int8.

    Every floating tensor with at least 2 dimensions, ``min_rows`` rows (output channels) and
    ``min_numel`` elements is stored as symmetric per-output-channel int8,
    :math:`q = \\mathrm{round}(w / s)`, :math:`s = \\max|w_{\\text{row}}| / 127`, its scales
    (float32) under ``int8_scale/<key>``; every other floating tensor (biases, norms,
    embeddings) in float16. :func:`read_state` undoes it. Weight-only: the model still
    computes in float32."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.ndim >= 2 and v.shape[0] >= min_rows and v.numel() >= min_numel:
            rows = v.reshape(v.shape[0], -1).float()
            scale = rows.abs().amax(1).clamp_min(1e-12) / 127
            out[k] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(v.shape).contiguous()
            out[INT8_SCALE + k] = scale.contiguous()
        else:
            out[k] = (v.half() if v.is_floating_point() else v).contiguous()
    return out


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint as a state dict: int8-stored weights
    (:func:`encode_int8`) come back dequantized to float32; float16 ones stay float16
    (``load_state_dict`` casts them to the model's dtype). Every weight reader uses this."""
    tensors = load_file(str(path))
    scales = {k[len(INT8_SCALE):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(INT8_SCALE)]}
    for k, scale in scales.items():
        q = tensors[k]
        tensors[k] = q.float() * scale.float().reshape(-1, *([1] * (q.ndim - 1)))
    return tensors


def load_weights(path: Path, model: torch.nn.Module) -> dict:
    """Load weights into ``model`` (strict) and return the metadata."""
    meta = read_meta(path)
    try:
        model.load_state_dict(read_state(path), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit model "
                              f"{meta.get('model', type(model).__name__)}: {exc}") from exc
    return meta


# --------------------------------------------------------------------------- the one format
#: The weights file of a run folder, by writer (the vision-language chapter's has its own name).
RUN_FILES = (WEIGHTS, "vl_model.safetensors")


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or the weights file of a run folder (:data:`RUN_FILES`)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return next((path / f for f in RUN_FILES if (path / f).is_file()), path / WEIGHTS)


def read_checkpoint_meta(path: str | Path) -> dict:
    """The metadata of any leukemia-core checkpoint, with its ``kind`` filled in (also for
    checkpoints written before the field existed, recognised by their metadata)."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # not a safetensors file, truncated, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; it must be a safetensors file "
                              "written by leukemia-core (retrain it, or fetch it again)") from exc
    if "meta" in raw:
        meta = json.loads(raw["meta"])
    elif "config" in raw:  # a detector written before the one format
        meta = {"kind": "detector", "config": json.loads(raw["config"]),
                "attribute_values": json.loads(raw.get("attribute_values", "{}"))}
    else:
        meta = {}
    meta.setdefault("kind", _legacy_kind(meta))
    if meta["kind"] not in KINDS:
        raise CheckpointError(
            f"{path} is not a checkpoint leukemia-core can rebuild (kind {meta['kind']!r}; known: "
            f"{', '.join(KINDS)}). Write it with leukemia-core (e.g. `leukemia-core train ... --out DIR`).")
    return meta


def _legacy_kind(meta: dict) -> str | None:
    if "dg" in meta:
        return "dg_classifier"
    if "vl_config" in meta:
        return "vision_language"
    if {"model", "classes"} <= set(meta):
        return "classifier"
    return None
