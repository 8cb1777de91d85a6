"""Exercise ex-ex-per-class of chapter 09: the faithfulness test on more images per class."""
import json
from pathlib import Path

from conftest import REPO, notebook_text, run_exercise

RUNS = ("pbc_convnext_atto_s0", "pbc_efficientnet_lite0_imagenet_s0")


def baseline_artifacts(tmp_path: Path) -> str:
    """The smoke checkpoints of 03_baseline: the build's own when it has them (the chapter
    only reads them), else trained here, under tmp_path."""
    built = REPO / "_build" / "artifacts"
    if all((built / "smoke" / run / "model.safetensors").is_file() for run in RUNS):
        return str(built)
    run_exercise("03_baseline", tmp_path / "baseline", results_dir=str(tmp_path / "baseline" / "results"),
                 artifacts=str(tmp_path / "baseline" / "artifacts"))
    return str(tmp_path / "baseline" / "artifacts")


def test_exercise_explain_per_class(tmp_path, data_root):
    artifacts = baseline_artifacts(tmp_path)
    nb = run_exercise("09_explain", tmp_path, per_class=2, artifacts=artifacts,
                      results_dir=str(tmp_path / "results"))
    res = json.loads((tmp_path / "results" / "smoke" / "explain_faithfulness.json").read_text())
    assert res["config"]["per_class"] == 2
    classes = 8  # PBC: a class-stratified sample of per_class images per class, for each model
    assert res["metrics"]["images"] == {"ConvNeXt-Atto (scratch)": 2 * classes,
                                        "EfficientNet-Lite0 (ImageNet, fine-tuned)": 2 * classes}
    for rows in res["metrics"]["table"].values():
        assert {r["method"] for r in rows} == set(res["config"]["methods"]) | set(res["config"]["baselines"])
    text = notebook_text(nb)
    assert f"on {2 * classes} test images per model" in text
    assert "Takeaways" in text and f"{2 * classes} images)" in text
