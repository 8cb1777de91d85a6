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


def load_weights(path: Path, model: torch.nn.Module) -> dict:
    """Load weights into ``model`` (strict) and return the metadata."""
    meta = read_meta(path)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
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
