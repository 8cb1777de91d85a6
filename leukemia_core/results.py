"""Run results as JSON: metrics, profile, config, git sha, data and split hashes,
hardware and wall time."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .dataroot import REPO_ROOT
from .errors import LeukemiaError


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        info["world_size"] = torch.distributed.get_world_size()
        info["backend"] = torch.distributed.get_backend()
    return info


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def write_results(path: str | Path, **fields) -> Path:
    """Write a results JSON with the given fields plus git sha, hardware and a timestamp.

    Refuses to overwrite an existing file unless ``overwrite=True`` is passed, and to
    write a payload that misses a field of the registry's schema
    (:data:`leukemia_core.registry.REQUIRED`: kind, profile, seeds, config, metrics,
    split and data hashes, wall time). ``paper="<bib key>"`` or ``chapter="NN_name"``
    file the result under a paper of ``results/claims.yaml``.
    """
    from .registry import check

    overwrite = fields.pop("overwrite", False)
    path = Path(path)
    if path.exists() and not overwrite:
        raise LeukemiaError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    payload = {"schema": "leukemia-core/results/v1", **fields, "git_sha": git_sha(),
               "hardware": hardware(),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    payload = _jsonable(payload)
    check(payload, f"results for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
