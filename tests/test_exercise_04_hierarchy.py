"""Exercise ex-hi-taxonomy of chapter 04: re-run the hierarchy chapter on a tree without
the acute/chronic level. The tests' smoke book ran the chapter on the YAML printed in the
exercise, read from the chapter (tests/exercises.py)."""
import json

import pytest

from conftest import notebook_text, run_exercise

pytestmark = pytest.mark.slow  # reads the smoke book


def test_exercise_hierarchy_taxonomy(data_root):
    nb, results, _ = run_exercise("04_hierarchy")
    files = {f.name: json.loads(f.read_text()) for f in results.glob("hierarchy_*.json")}
    assert {"hierarchy_flat_efficientnet_lite0.json", "hierarchy_multilevel_efficientnet_lite0.json",
            "hierarchy_base_hierarchical_efficientnet_lite0.json"} <= set(files)
    leaves = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "hematogone", "AML",
              "early_pre_b", "pre_b", "pro_b"]
    for name, res in files.items():
        # three levels now: AML and ALL are siblings under leukemia, no acute/chronic level
        assert res["config"]["taxonomy"] == "flat_leukemia", name
        assert res["config"]["levels"] == [["normal", "reactive", "leukemia"], leaves[:7] + ["ALL"],
                                           ["early_pre_b", "pre_b", "pro_b"]], name
        assert res["config"]["leaves"] == leaves, name  # same leaves with images as the book's tree
        for decoder, m in res["metrics"]["test"].items():
            assert "level 3 acc" in m and "level 4 acc" not in m, (name, decoder)
            # the longest leaf-to-leaf distance of the new tree is 5 (a leukocyte called an ALL stage)
            assert 0 <= m["mistake severity"] <= 5, (name, decoder, m["mistake severity"])
    assert set(files["hierarchy_multilevel_efficientnet_lite0.json"]["metrics"]["test"]) == {
        "independent", "path_probability", "top_down"}
    text = notebook_text(nb)
    assert "**3**: early_pre_b, pre_b, pro_b" in text and "**4**:" not in text  # the levels line under the tree
    assert "Taxonomy `flat_leukemia` has 3 levels and 10 leaves" in text  # the takeaways
