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

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import LeukemiaError


SCHEMA = "leukemia-core/results/v1"
#: Field -> accepted types. ``split_sha256`` / ``data_sha256`` fingerprint the split
#: files and the exact records a run used; ``hardware`` comes from ``results.hardware()``.
REQUIRED: dict[str, tuple[type, ...]] = {
    "schema": (str,), "kind": (str,), "profile": (str,), "seeds": (list,), "config": (dict,),
    "metrics": (dict,), "split_sha256": (str,), "data_sha256": (str,), "git_sha": (str,),
    "hardware": (dict,), "created": (str,), "wall_time_s": (int, float),
}
#: Optional fields that, when present, must have these types.
OPTIONAL: dict[str, tuple[type, ...]] = {"paper": (str,), "chapter": (str,), "method": (str,),
                                         "model": (str,), "dataset": (str,), "selected_on": (str,)}
#: How a row that was picked among others was picked. ``test``: by held-out/test scores
#: (shown, labelled, never a verdict); ``validation``: by a rule on validation data;
#: ``pre-registered``: named before any result existed.
SELECTED_ON = ("pre-registered", "validation", "test")
#: Metric keys that name a row picked among others: a file holding one must say how.
SELECTION_KEYS = ("best_row", "best_method", "best_cross_domain_method", "headline_method")


class ResultsError(LeukemiaError):
    """A results file or the claims file does not follow its schema."""


# --------------------------------------------------------------------------- schema
def validate(payload: dict) -> list[str]:
    """Problems of one results payload against the schema (empty: valid)."""
    if not isinstance(payload, dict):
        return ["not a JSON object"]
    problems = []
    for key, types in REQUIRED.items():
        if key not in payload:
            problems.append(f"missing field '{key}'")
        elif isinstance(payload[key], bool) or not isinstance(payload[key], types):
            problems.append(f"field '{key}' is {type(payload[key]).__name__}, expected "
                            + " or ".join(t.__name__ for t in types))
        elif types == (str,) and not payload[key].strip():
            problems.append(f"field '{key}' is empty")
    for key, types in OPTIONAL.items():
        if payload.get(key) is not None and not isinstance(payload[key], types):
            problems.append(f"field '{key}' is {type(payload[key]).__name__}, expected str")
    if payload.get("schema") not in (None, SCHEMA) and isinstance(payload.get("schema"), str):
        problems.append(f"schema '{payload['schema']}' is not '{SCHEMA}'")
    if isinstance(payload.get("seeds"), list) and not all(isinstance(s, int) for s in payload["seeds"]):
        problems.append("field 'seeds' must list integers")
    if isinstance(payload.get("metrics"), dict) and not payload["metrics"]:
        problems.append("field 'metrics' is empty")
    if payload.get("selected_on") is not None and payload["selected_on"] not in SELECTED_ON:
        problems.append(f"field 'selected_on' is '{payload['selected_on']}', expected one of {SELECTED_ON}")
    picked = [k for k in SELECTION_KEYS if isinstance(payload.get("metrics"), dict) and k in payload["metrics"]]
    if picked and payload.get("selected_on") is None:
        problems.append(f"metrics name a selected row ({', '.join(picked)}) but 'selected_on' says not how "
                        f"it was selected (one of {SELECTED_ON})")
    return problems


def check(payload: dict, where: str = "results") -> dict:
    """``payload`` if it is valid, else :class:`ResultsError` listing every problem."""
    problems = validate(payload)
    if problems:
        raise ResultsError(f"{where} does not follow {SCHEMA}: " + "; ".join(problems))
    return payload


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


def session_wall_time(path: str | Path, history: list, elapsed: float) -> float:
    """The wall time to record in a run's results file ``path``: ``elapsed`` (this session),
    unless this session trained nothing (a finished run resumed again: the file already
    holds a run with the same number of epochs), in which case the recorded time of the
    session that finished it is kept, not replaced by this session's few seconds."""
    path = Path(path)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return elapsed
        if len(old.get("history") or []) == len(history or []) and old.get("wall_time_s"):
            return float(old["wall_time_s"])
    return elapsed


def write_results(path: str | Path, **fields) -> Path:
    """Write a results JSON with the given fields plus git sha, hardware and a timestamp.

    Refuses to overwrite an existing file unless ``overwrite=True`` is passed, and to
    write a payload that misses a field of the registry's schema
    (:data:`REQUIRED`: kind, profile, seeds, config, metrics,
    split and data hashes, wall time). ``paper="<bib key>"`` or ``chapter="NN_name"``
    file the result under a paper of ``results/claims.yaml``.
    """
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
