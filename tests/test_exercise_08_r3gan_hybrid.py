"""Exercise ex-r3g-gan-steps of chapter 08: a longer R3GAN schedule and a larger top-up
target reach the GAN and the training set. The tests' smoke book ran the chapter with
``gan_steps = 12, synthetic_per_class = 20`` (smoke defaults: 4 steps, each minority class
topped up to 12; tests/exercises.py)."""
import hashlib
import json

import pytest

from conftest import notebook_text, run_exercise

from leukemia_core.engine.checkpoint import read_meta

pytestmark = pytest.mark.slow  # reads the smoke book


def test_exercise_r3gan_steps_and_topup(data_root):
    from exercises import EXERCISES

    steps, target = EXERCISES["08_r3gan_hybrid"]["gan_steps"], EXERCISES["08_r3gan_hybrid"]["synthetic_per_class"]
    nb, res, artifacts = run_exercise("08_r3gan_hybrid")
    quality = json.loads((res / "r3gan_gan_quality.json").read_text())
    assert quality["config"]["steps"] == steps
    # the generator that drew every synthetic image is the saved one, and it trained for the new schedule
    ckpt = artifacts / "r3gan_hybrid" / "r3gan_generator.safetensors"
    assert read_meta(ckpt)["steps"] == steps
    assert quality["config"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # each minority class is topped up to the new target, and exactly those images enter the R3GAN rows
    per_class = {r["class"]: r for r in quality["metrics"]["per_class"]}
    assert set(per_class) == {"monocyte", "eosinophil", "basophil"}
    for c, r in per_class.items():
        assert r["generated"] == max(0, target - r["real train"]), (c, r)
    n_gen = sum(r["generated"] for r in per_class.values())
    assert n_gen > sum(max(0, 12 - r["real train"]) for r in per_class.values())  # more than the default top-up
    rows = {}
    for p in res.glob("r3gan_ablation_*.json"):
        d = json.loads(p.read_text())
        rows[d["method"]] = d["config"]
    assert rows["+ R3GAN synthetic"]["n_synthetic"] == n_gen
    assert rows["hybrid + CLAHE + R3GAN"]["n_synthetic"] == n_gen
    assert rows["+ oversampling"]["n_synthetic"] == 0
    assert f"{steps} steps" in notebook_text(nb)  # the profile line and the verdicts name the new schedule
