"""Resolve the data root: ``--data-root`` option, else ``LEUKEMIA_DATA``, else ``data/``."""
from __future__ import annotations

import os
from pathlib import Path

from leukemia_core.errors import DataRootError

ENV_VAR = "LEUKEMIA_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "data"


def resolve_data_root(option: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return ``(root, source)`` where ``source`` names the setting that chose it."""
    if option:
        return Path(option).expanduser().resolve(), "--data-root"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve(), ENV_VAR
    return DEFAULT_ROOT, "default data/ in the repository"


def data_root(option: str | os.PathLike | None = None) -> Path:
    """The data root as a path; raises :class:`DataRootError` if it does not exist."""
    root, source = resolve_data_root(option)
    if not root.is_dir():
        raise DataRootError(
            f"data root {root} (set by {source}) does not exist. Point --data-root or "
            f"{ENV_VAR} at a folder holding the datasets, or download them with "
            "`leukemia-core data fetch NAME`."
        )
    return root


def dataset_dir(root: Path, name: str, relative: str) -> Path:
    """The folder of one dataset under ``root``; a clear error if it is missing."""
    path = Path(root) / relative
    if not path.exists():
        raise DataRootError(
            f"dataset '{name}' not found: {path} is missing from data root {root}. "
            f"Set --data-root or {ENV_VAR} to a root that has it, or run "
            f"`leukemia-core data fetch {name} --data-root {root}`."
        )
    return path
