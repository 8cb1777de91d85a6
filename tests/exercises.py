"""The exercise of each method chapter that changes a parameter and re-runs the chapter.

The tests' smoke book (tests/test_book.py) executes every chapter *with its exercise's
change* (the ``ci`` book of CI runs the defaults), so each exercise is run once per test
session at no extra cost, and ``tests/test_exercise_<chapter>.py`` checks on that very
run that the effect the exercise promises holds. :func:`exercise_params` gives the
overrides; a chapter's entry is a dict, or a function of a scratch folder for exercises
that need a file (chapter 04's taxonomy).
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hierarchy_exercise_yaml() -> str:
    """The ```yaml block of exercise ex-hi-taxonomy, read from the chapter itself (without
    the '# ' of the py:percent file), so the test runs exactly what the student is given."""
    text = (REPO / "notebooks" / "04_hierarchy.py").read_text()
    block = text[text.index(":label: ex-hi-taxonomy"):]
    block = block[:block.index("# ::::")]
    lines = re.search(r"# ```yaml\n(.*?)# ```\n", block, re.S).group(1).splitlines()
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines) + "\n"


def _hierarchy(folder: Path) -> dict:
    tree = folder / "flat_leukemia.yaml"
    tree.write_text(hierarchy_exercise_yaml())
    return {"taxonomy": str(tree)}


EXERCISES = {
    "03_baseline": {"seeds": [0, 1]},  # ex-bl-seeds
    "04_hierarchy": _hierarchy,  # ex-hi-taxonomy
    "05_vision_language": {"heldout_class": "eosinophil"},  # ex-vl-heldout
    "06_domain_generalization": {"supcon_weight": 0.0},  # ex-dg-supcon-off
    "07_detection": {"patch_fractions": [0.1]},  # ex-det-patch-fraction
    "08_r3gan_hybrid": {"gan_steps": 12, "synthetic_per_class": 20},  # ex-r3g-gan-steps
    "09_explain": {"per_class": 2},  # ex-ex-per-class
}


def exercise_params(folder: Path) -> dict[str, dict]:
    """Chapter stem -> the parameter overrides of its exercise (files written to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {ch: (p(folder) if callable(p) else dict(p)) for ch, p in EXERCISES.items()}
