"""Exercise ex-ex-per-class of chapter 09: the faithfulness test on more images per class.
The tests' smoke book ran the chapter with ``per_class = 2`` (tests/exercises.py)."""
import json

import pytest

from conftest import notebook_text, run_exercise

pytestmark = pytest.mark.slow  # reads the smoke book


def test_exercise_explain_per_class(data_root):
    nb, results, _ = run_exercise("09_explain")
    res = json.loads((results / "explain_faithfulness.json").read_text())
    assert res["config"]["per_class"] == 2
    classes = 8  # PBC: a class-stratified sample of per_class images per class, for each model
    assert res["metrics"]["images"] == {"ConvNeXt-Atto (scratch)": 2 * classes,
                                        "EfficientNet-Lite0 (ImageNet, fine-tuned)": 2 * classes}
    for rows in res["metrics"]["table"].values():
        assert {r["method"] for r in rows} == set(res["config"]["methods"]) | set(res["config"]["baselines"])
    text = notebook_text(nb)
    assert f"on {2 * classes} test images per model" in text
    assert "Takeaways" in text and f"{2 * classes} images)" in text
