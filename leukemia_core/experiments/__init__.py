"""The chapters' experiments: one module per chapter protocol, runnable without a notebook.

Each module ``leukemia_core.experiments.<name>`` holds one chapter's whole protocol (what
is trained, on which data and split, how it is evaluated and which results JSON it
writes) and exposes

``run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False,
**params) -> ExperimentRun``

- ``profile``: a profile name or :class:`~leukemia_core.config.Profile`; sizes come from
  :func:`~leukemia_core.config.chapter_sizes`, nowhere else;
- ``seeds``: None for the profile's seeds;
- ``out``: the folder for checkpoints and training state (default
  ``_build/artifacts/<profile>``); ``resume=True`` continues every interrupted training
  run found there, bit for bit (the one loop's resume);
- ``results_dir``: the results registry root (default ``results/``): the chapter writes
  ``<results_dir>/<profile>/<name>.json``;
- ``params``: the chapter notebook's other parameters (the same names).

The notebook calls ``run`` and draws its figures from the returned objects; the CLI
(``leukemia-core run <chapter>``) calls the same function, so both write the same results.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import LeukemiaError

EXPERIMENTS = {  # chapter -> module under leukemia_core.experiments
    "03_baseline": "baseline",
    "04_hierarchy": "hierarchy",
    "05_vision_language": "vision_language",
    "06_domain_generalization": "domain_generalization",
    "07_detection": "detection",
    "08_r3gan_hybrid": "r3gan_hybrid",
}


@dataclass
class ExperimentRun:
    """What a chapter's ``run`` returns: the results JSONs it wrote and, for the notebook's
    figures, the chapter's objects (runs, histories, tables, models) by name."""

    chapter: str
    profile: str
    results: list[Path] = field(default_factory=list)
    objects: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.objects[name]


def resolve_paths(profile_name: str, out=None, results_dir=None) -> tuple[Path, Path]:
    """``(out, results_dir)`` as absolute folders; relative paths are taken from the
    repository root, as the notebooks' ``artifacts`` and ``results_dir`` parameters are."""
    out = Path(out) if out is not None else Path("_build/artifacts") / profile_name
    results_dir = Path(results_dir) if results_dir is not None else Path("results")
    out = out if out.is_absolute() else REPO_ROOT / out
    results_dir = results_dir if results_dir.is_absolute() else REPO_ROOT / results_dir
    return out, results_dir


def get_experiment(chapter: str) -> ModuleType:
    """The module of ``chapter`` (its full name, e.g. ``04_hierarchy``, or the module name)."""
    name = EXPERIMENTS.get(chapter, chapter if chapter in EXPERIMENTS.values() else None)
    if name is None:
        raise LeukemiaError(f"no experiment for chapter '{chapter}'; chapters that train: "
                            f"{', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"leukemia_core.experiments.{name}")


def run_experiment(chapter: str, profile: str = "ci", **kwargs) -> ExperimentRun:
    """``get_experiment(chapter).run(profile, **kwargs)``."""
    return get_experiment(chapter).run(profile, **kwargs)
