"""Exercise ex-vl-heldout of chapter 05 (vision-language): with another held-out class the
chapter trains its second model without that class and scores it, by its description
alone, in the results JSON. The tests' smoke book ran it with ``heldout_class =
"eosinophil"`` (tests/exercises.py)."""
from __future__ import annotations

import json

import pytest

from conftest import notebook_text, run_exercise

pytestmark = pytest.mark.slow  # reads the smoke book


def test_exercise_vl_heldout_eosinophil(data_root):
    from leukemia_core.engine.checkpoint import read_meta
    from leukemia_core.vl.train import WEIGHTS

    nb, results, artifacts = run_exercise("05_vision_language")
    held = json.loads((results / "vision_language.json").read_text())["metrics"]["heldout_class"]
    assert held["class"] == "eosinophil"
    # its own zero-shot rows: the unseen class's recall under both prompt sets, none for the default class
    rows = held["unseen_class_summary"]
    assert [r["prompts"] for r in rows] == ["held-out class prompts", "textbook attribute profiles"]
    for r in rows:
        assert 0.0 <= r["eosinophil recall (unseen class)"] <= 1.0
        assert not any(k.startswith("monocyte") for k in r)
    for which, r in zip(("heldout", "attributes"), rows):
        assert held["five_class"][which]["per_class"]["eosinophil"]["recall"] == r["eosinophil recall (unseen class)"]
    # the second model really trained without the eosinophil (and with the monocyte back in)
    meta = read_meta(artifacts / "vl_without_eosinophil_s0" / WEIGHTS)
    assert meta["heldout_class"] == "eosinophil"
    assert "eosinophil" not in meta["bank"]["text_classes"] and "monocyte" in meta["bank"]["text_classes"]
    joint = read_meta(artifacts / "vl_lite0_minilm_s0" / WEIGHTS)
    assert "eosinophil" in joint["bank"]["text_classes"]
    assert "The unseen eosinophil" in notebook_text(nb)
