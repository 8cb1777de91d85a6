"""Reference checkpoints load only when every file matches the committed SHA-256 manifest;
a missing, altered or unlisted file fails with a message naming the file and the fix; fp16
and int8 publication keep the outputs within tolerance."""
from __future__ import annotations

import json

import pytest
import torch

from leukemia_core.data.transforms import preprocess_dict
from leukemia_core.engine.checkpoint import save_weights
from leukemia_core.errors import CheckpointError
from leukemia_core.models import create_model
from leukemia_core.reproducibility import reference as ref

CLASSES = ["a", "b", "c"]
RESULTS = {"dataset": "pbc", "data_sha256": "d" * 64, "split_sha256": "s" * 64, "git_sha": "abc",
           "wall_time_s": 3600.0, "profile": "reference", "hardware": {"cpu": "test", "threads": 2},
           "history": [{"epoch": 1, "train_loss": 1.0, "val_macro_f1": 0.5},
                       {"epoch": 2, "train_loss": 0.5, "val_macro_f1": 0.8},
                       {"epoch": 3, "train_loss": 0.4, "val_macro_f1": 0.7}]}


@pytest.fixture
def published(tmp_path):
    torch.manual_seed(0)
    net = create_model("convnext_atto", num_classes=3)
    meta = {"kind": "classifier", "model": "convnext_atto", "classes": CLASSES, "image_size": 32,
            "preprocess": preprocess_dict(32, [0.5] * 3, [0.25] * 3, None)}
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "model.safetensors", net, meta)
    root = tmp_path / "reference"
    ref.publish(run, "03_baseline", "tiny", description="a test model", command="leukemia-core run 03_baseline",
                intended_use="tests", limits="none", metrics={"accuracy": 0.5}, results=RESULTS, dtype="float16",
                root=root)
    return net, root


def test_publish_writes_card_log_and_manifest(published):
    _, root = published
    folder = root / "03_baseline" / "tiny"
    assert {p.name for p in folder.iterdir()} == set(ref.FILES)
    manifest = ref.read_manifest(root)
    assert sorted(manifest) == sorted(f"03_baseline/tiny/{f}" for f in ref.FILES)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["selected_epoch"] == 2 and card["dtype"] == "float16" and card["epochs_run"] == 3
    assert card["data_licences"] == {"pbc": ref.DATA_LICENCES["pbc"]}
    assert "leukemia-core run 03_baseline" in (folder / "MODEL_CARD.md").read_text()
    assert ref.available("03_baseline", root) == ["tiny"]
    assert list(ref.training_log("03_baseline", "tiny", root)["val_macro_f1"]) == [0.5, 0.8, 0.7]


def test_fp16_reference_loads_and_matches_the_fp32_model(published):
    net, root = published
    model, meta, prep, card = ref.load_reference("03_baseline", "tiny", root)
    assert meta["classes"] == CLASSES and card["name"] == "tiny"
    assert next(model.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()(x), atol=2e-2, rtol=2e-2)


def test_int8_reference_loads_within_quantisation_error(published, tmp_path):
    """int8 storage: weight matrices and kernels per output channel, biases and norms in
    float16; the loader dequantizes, and the model's outputs stay close to the float32 ones."""
    net, root = published
    ref.publish(tmp_path / "run", "03_baseline", "tiny", description="d", command="c", intended_use="u",
                limits="l", metrics={}, results=RESULTS, dtype="int8", root=root)
    from safetensors.torch import load_file

    stored = load_file(str(root / "03_baseline" / "tiny" / "model.safetensors"))
    assert {v.dtype for k, v in stored.items() if k.startswith("int8_scale/")} == {torch.float32}
    quantised = [k for k, v in stored.items() if v.dtype == torch.int8]
    assert "stem.0.weight" in quantised and "stages.0.blocks.0.mlp.fc1.weight" in quantised
    # the 3-class head has too few rows to quantise per row; biases stay float: both float16
    assert stored["head.fc.weight"].dtype == stored["head.fc.bias"].dtype == torch.float16
    model, _, _, card = ref.load_reference("03_baseline", "tiny", root)
    assert card["dtype"] == "int8" and "per output channel" in card["dtype_note"]
    for k, v in model.state_dict().items():  # dequantized: within half a step of the original
        w = net.state_dict()[k]
        if k in quantised:
            step = w.reshape(w.shape[0], -1).abs().amax(1) / 127
            assert ((v - w).reshape(w.shape[0], -1).abs().amax(1) <= step / 2 + 1e-6).all(), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()(x), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("shift, kept", [({"int8": 0.0005, "float16": 0.0}, "int8"),
                                         ({"int8": 0.002, "float16": 0.0005}, "float16"),
                                         ({"int8": 0.002, "float16": 0.002}, "float32")])
def test_publish_smallest_keeps_the_smallest_storage_within_a_tenth_of_a_point(published, tmp_path, shift, kept):
    """The score is read off the weights as published at the time: the smallest storage
    whose every metric moves by at most 0.001 is kept; ``n`` is carried, never compared."""
    _, root = published
    run = tmp_path / "run"

    def score():
        dtype = json.loads((root / "03_baseline" / "tiny" / "model_card.json").read_text())["dtype"]
        return {"accuracy": 0.9 - shift.get(dtype, 0.0), "macro_f1": 0.8, "n": len(dtype)}

    folder = ref.publish_smallest(run, "03_baseline", "tiny", score, description="d", command="c",
                                  intended_use="u", limits="l", results=RESULTS, root=root)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["dtype"] == kept
    assert card["metrics"]["fp32_accuracy"] == 0.9 and card["metrics"]["fp32_macro_f1"] == 0.8
    assert "fp32_n" not in card["metrics"] and card["metrics"]["n"] == len(kept)
    assert card["metrics"]["accuracy"] == pytest.approx(0.9 - shift.get(kept, 0.0))
    assert card["metrics"]["storages_tried"]["int8"]["accuracy"] == pytest.approx(0.9 - shift["int8"])
    ref.load_reference("03_baseline", "tiny", root)  # the manifest matches what was kept


def test_the_budget_is_checked_on_the_kept_weights_only(published, tmp_path, monkeypatch):
    """A trial float32 publication may pass the budget for a moment; the kept one may not."""
    _, root = published
    size = (root / "03_baseline" / "tiny" / "model.safetensors").stat().st_size / 1e6  # float16
    monkeypatch.setattr(ref, "MAX_TOTAL_MB", size * 1.2)  # float16 fits, float32 would not
    card = dict(description="d", command="c", intended_use="u", limits="l", results=RESULTS, root=root)
    ref.publish_smallest(tmp_path / "run", "03_baseline", "tiny", lambda: {"accuracy": 0.5}, **card)
    with pytest.raises(CheckpointError, match="budget"):
        ref.publish(tmp_path / "run", "03_baseline", "tiny", metrics={}, dtype="float32", **card)


def test_tampered_weights_fail_with_the_file_and_the_fix(published):
    _, root = published
    w = root / "03_baseline" / "tiny" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its SHA-256.*git checkout"):
        ref.load_reference("03_baseline", "tiny", root)


def test_missing_file_and_missing_manifest_fail_clearly(published):
    _, root = published
    (root / "03_baseline" / "tiny" / "training_log.csv").unlink()
    with pytest.raises(CheckpointError, match=r"training_log\.csv is missing"):
        ref.load_card("03_baseline", "tiny", root)
    (root / ref.MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="MANIFEST.sha256 is missing"):
        ref.load_card("03_baseline", "tiny", root)


def test_committed_references_match_their_manifest():
    """Whatever is committed under reference/ verifies (nothing yet is not an error)."""
    for rel in ref.read_manifest():
        chapter, name = rel.split("/")[:2]
        ref.verify(ref.reference_folder(chapter, name))


def test_every_manifest_file_is_committable():
    """A file the manifest lists but git ignores exists only on the machine that published
    it: a clean clone then fails verification (this happened: ``*.safetensors`` was ignored)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ref.REFERENCE_DIR.parent / ".git").exists():
        pytest.skip("not a git checkout")
    listed = [f"reference/{rel}" for rel in ref.read_manifest()]
    if not listed:
        pytest.skip("no reference checkpoint published yet")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *listed], cwd=ref.REFERENCE_DIR.parent,
                             capture_output=True, text=True).stdout.split()
    assert ignored == [], f"listed in the manifest but ignored by .gitignore: {ignored}"


@pytest.mark.slow
def test_live_evaluation_reproduces_and_drift_is_caught_at_the_tight_tolerance(tmp_path):
    """A reference classifier evaluated live on the real PBC test split writes the same
    metrics twice; the reference freshness check flags a 0.01 change (ci's tolerance would not)."""
    from leukemia_core.data.dataroot import resolve_data_root
    from leukemia_core.reproducibility.registry import freshness, load_claims

    if not (resolve_data_root()[0] / "pbc").is_dir():
        pytest.skip("needs the PBC mirror")
    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    torch.manual_seed(0)
    net = create_model("convnext_atto", num_classes=len(classes))
    meta = {"kind": "classifier", "model": "convnext_atto", "classes": classes, "image_size": 32,
            "preprocess": preprocess_dict(32, [0.5] * 3, [0.25] * 3, None)}
    (tmp_path / "run").mkdir()
    save_weights(tmp_path / "run" / "model.safetensors", net, meta)
    root = tmp_path / "reference"
    ref.publish(tmp_path / "run", "03_baseline", "tiny", description="t", command="c", intended_use="u",
                limits="l", metrics={}, results=RESULTS, root=root)
    out = tmp_path / "repo" / "results"
    path = ref.evaluate_classifier("03_baseline", "tiny", root=root, results_dir=out)
    first = json.loads(path.read_text())
    assert path.name == "baseline_tiny.json" and first["profile"] == "reference"
    assert first["metrics"]["test"]["n"] > 3000  # the whole PBC test split
    assert first["config"]["checkpoint_sha256"] == ref.read_manifest(root)["03_baseline/tiny/model.safetensors"]
    second = json.loads(ref.evaluate_classifier("03_baseline", "tiny", root=root, results_dir=out).read_text())
    assert second["metrics"]["test"] == first["metrics"]["test"]
    claims = load_claims()
    shifted = json.loads(json.dumps(first))
    shifted["metrics"]["test"]["accuracy"] += 0.01
    fresh = freshness("reference", root=tmp_path / "repo", claims=claims, baseline=lambda p: json.dumps(shifted))
    assert fresh.tolerance == claims["freshness"]["reference_tolerance"] < 0.01
    assert [r.status for r in fresh.rows if r.metric == "metrics/test/accuracy"] == ["DRIFT"]
    same = freshness("reference", root=tmp_path / "repo", claims=claims, baseline=lambda p: json.dumps(first))
    assert all(r.status == "ok" for r in same.rows) and same.rows
    # under smoke: the first 6 test images of every class, written beside, never over, the whole-split file
    per_class = ref.test_per_class("smoke")
    assert per_class == ref.SMOKE_TEST_PER_CLASS and ref.test_per_class("ci") is None
    capped = ref.evaluate_classifier("03_baseline", "tiny", root=root, results_dir=out, per_class=per_class)
    assert capped == out / "smoke" / "reference" / "baseline_tiny.json"
    assert json.loads(capped.read_text())["metrics"]["test"]["n"] == per_class * len(classes)
    assert json.loads(path.read_text())["metrics"]["test"] == first["metrics"]["test"]


def test_first_per_class_keeps_table_order_and_attrs():
    import pandas as pd

    t = pd.DataFrame({"label": list("abacbab"), "i": range(7)})
    t.attrs["split_sha256"] = "x"
    two = ref.first_per_class(t, "label", 2)
    assert two["i"].tolist() == [0, 1, 2, 3, 4] and two.attrs == {"split_sha256": "x"}
    assert ref.first_per_class(t, "label", None) is t


def test_cli_reference_check_lists_every_expected_checkpoint(capsys):
    from leukemia_core.cli import main

    rc = main(["reference", "check"])
    out = capsys.readouterr().out
    statuses = {r["name"]: r["status"] for r in ref.status()}
    assert rc == (1 if "corrupt" in statuses.values() else 0)
    for chapter, names in ref.EXPECTED.items():
        for name in names:
            assert f"reference/{chapter}/{name}:" in out
    assert all(s in ("verified", "missing", "corrupt") for s in statuses.values())


def test_publish_reference_names_an_unknown_model(tmp_path):
    """``leukemia-core reference publish --model NAME`` with a name the chapter does not
    train fails before touching reference/, naming the choices."""
    from leukemia_core.errors import UnknownNameError
    from leukemia_core.experiments import baseline

    with pytest.raises(UnknownNameError, match=r"convnext_atto.*efficientnet_lite0"):
        baseline.publish_reference(tmp_path, root=tmp_path / "reference", models=["resnet18"])
    assert not (tmp_path / "reference").exists()
    assert baseline.publish_reference(tmp_path, root=tmp_path / "reference", models=["convnext_atto"],
                                      log=lambda m: None) == []  # no finished run under tmp_path


def test_publish_note_needs_the_model_it_describes(tmp_path):
    """``--note`` (how a run was made, e.g. paused) goes into one model's card, so it needs
    ``--model``; without it the command fails before touching anything."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "leukemia_core.cli", "reference", "publish", "03_baseline",
                        "--out", str(tmp_path), "--note", "paused 40 min"], capture_output=True, text=True)
    assert r.returncode == 2 and "--model" in r.stderr, r.stderr


def test_baseline_reference_takeaway_follows_the_rows():
    from leukemia_core.experiments import baseline as b

    ref = {"rows": [{"model": b.PRETRAINED, "status": "verified", "test accuracy": 0.99},
                    {"model": b.SCRATCH, "status": "verified", "test accuracy": 0.97}]}
    text = b.reference_text(ref, {b.PRETRAINED: 0.90, b.SCRATCH: 0.80}, "ci")
    assert "+2.0 points ahead" in text and "+10.0 under this build's `ci`" in text
    ref["rows"][1] = {"model": b.SCRATCH, "status": "corrupt"}
    text = b.reference_text(ref, {b.PRETRAINED: 0.90, b.SCRATCH: 0.80}, "ci")
    assert "ahead" not in text and "Not available: ConvNeXt-Atto (scratch) (corrupt)" in text
