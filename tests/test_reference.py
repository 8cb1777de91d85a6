"""Reference checkpoints load only when every file matches the committed SHA-256 manifest;
a missing, altered or unlisted file fails with a message naming the file and the fix; fp16
publication keeps the outputs within tolerance."""
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
                intended_use="tests", limits="none", metrics={"accuracy": 0.5}, results=RESULTS, fp16=True,
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
                limits="l", metrics={}, results=RESULTS, fp16=False, root=root)
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
