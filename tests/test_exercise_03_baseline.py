"""Exercise ex-bl-seeds of chapter 03: re-run the baseline with several seeds. The tests'
smoke book ran the chapter with ``seeds = [0, 1]`` (tests/exercises.py)."""
import json

import pytest

from conftest import notebook_text, run_exercise

pytestmark = pytest.mark.slow  # reads the smoke book


def test_exercise_baseline_seeds(data_root):
    nb, results, artifacts = run_exercise("03_baseline")
    files = sorted(results.glob("baseline_*.json"))
    assert [f.name for f in files] == ["baseline_convnext_atto.json", "baseline_efficientnet_lite0.json"]
    for f in files:
        res = json.loads(f.read_text())
        assert res["seeds"] == [0, 1], f.name
        # several seeds: the mean, the standard deviation and every seed's metrics
        assert len(res["metrics"]["per_seed"]) == 2, f.name
        assert "macro_f1" in res["metrics"]["test_std"], f.name
        assert len(set(res["source_results"])) == 2, f.name
    for folder in ("pbc_convnext_atto_s0", "pbc_convnext_atto_s1"):
        assert (artifacts / folder / "model.safetensors").is_file()
    text = notebook_text(nb)
    assert "±" in text  # the results table reports mean ± standard deviation over seeds
    assert "over 2 seeds" in text  # the takeaways compare the gap with the seed spread
