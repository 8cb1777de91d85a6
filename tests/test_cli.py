"""The command line: --help everywhere, real smoke runs, and exit code 2 on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-m", "leukemia_core.cli"]


def run(*args, env=None):
    return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("args", [[], ["data"], ["data", "fetch"], ["data", "check"], ["data", "splits"],
                                  ["train"], ["evaluate"], ["predict"], ["bench"]])
def test_help(args):
    r = run(*args, "--help")
    assert r.returncode == 0 and "usage: leukemia-core" in r.stdout


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("leukemia-core: error:")
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.fixture(scope="module")
def pbc_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pbc_smoke")
    r = run("train", "--dataset", "pbc", "--profile", "smoke", "--out", out, "--data-root", data_root)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_train_writes_checkpoint_predictions_and_results(pbc_run, data_root):
    res = json.loads((pbc_run / "results.json").read_text())
    for key in ("metrics", "profile", "config", "git_sha", "data_root", "split_sha256", "data_sha256",
                "hardware", "wall_time_s", "seeds"):
        assert key in res, key
    assert res["profile"] == "smoke" and Path(res["data_root"]) == Path(data_root).resolve()
    assert 0 <= res["metrics"]["test"]["accuracy"] <= 1
    assert len(res["metrics"]["test"]["confusion_matrix"]) == 8
    preds = pd.read_csv(pbc_run / "predictions_test.csv")
    assert len(preds) == 8 * 4 and set(preds["label"]) == set(preds.columns.str.removeprefix("prob_")) & set(preds["label"])


@pytest.mark.slow
def test_evaluate_and_predict(pbc_run, data_root, tmp_path):
    r = run("evaluate", "--checkpoint", pbc_run, "--dataset", "pbc", "--data-root", data_root,
            "--split", "val", "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    committed_val = (pd.read_csv(REPO / "splits" / "pbc.csv")["split"] == "val").sum()
    assert json.loads((tmp_path / "m.json").read_text())["n"] == committed_val  # every val image, once
    folder = data_root / "pbc/PBC_dataset_normal_DIB/basophil"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted(folder.iterdir())[:5]:
        (imgs / p.name).write_bytes(p.read_bytes())
    r = run("predict", "--images", imgs, "--checkpoint", pbc_run / "model.safetensors", "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / "p.csv")
    assert len(p) == 5
    assert p.filter(like="prob_").sum(axis=1).round(4).eq(1).all()
    # an unreadable image is recorded in the error column and counted; --strict: one clear message
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    r = run("predict", "--images", imgs, "--checkpoint", pbc_run, "--out", tmp_path / "q.csv")
    assert r.returncode == 0 and "6 images, 1 unreadable: listed in the error column" in r.stdout, r.stderr
    q = pd.read_csv(tmp_path / "q.csv")
    assert q["error"].notna().sum() == 1 and "broken.jpg" in q["error"].dropna().iloc[0]
    _assert_clean_error(run("predict", "--images", imgs, "--checkpoint", pbc_run, "--out", tmp_path / "s.csv",
                            "--strict"), "broken.jpg")
    _assert_clean_error(run("predict", "--images", imgs, "--checkpoint", pbc_run, "--out", tmp_path / "p.csv"),
                        "--overwrite")


@pytest.mark.slow
def test_checkpoint_for_another_class_set(pbc_run, data_root):
    _assert_clean_error(run("evaluate", "--checkpoint", pbc_run, "--dataset", "matek", "--data-root", data_root),
                        "myeloblast", "trained on classes")


@pytest.mark.slow
def test_bad_input_exits_2(tmp_path, data_root):
    _assert_clean_error(run("train", "--dataset", "nope", "--profile", "smoke"), "unknown dataset 'nope'")
    _assert_clean_error(run("train", "--dataset", "pbc", "--profile", "smoke", "--classes", "neutrophil,dragon",
                            "--out", tmp_path / "x"), "dragon")
    _assert_clean_error(run("train", "--data-root", tmp_path / "missing", "--profile", "smoke",
                            "--out", tmp_path / "y"), "does not exist", "data fetch")
    _assert_clean_error(run("predict", "--images", tmp_path / "none", "--checkpoint", "x", "--out", "y"),
                        "not a folder")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    (tmp_path / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs/a.png")
    _assert_clean_error(run("predict", "--images", tmp_path / "imgs", "--checkpoint", bad, "--out", tmp_path / "o.csv"),
                        "bad.safetensors")
    _assert_clean_error(run("train", "--model", "no_such_net", "--profile", "smoke", "--out", tmp_path / "z"),
                        "unknown model")


@pytest.mark.slow
def test_data_check_exits_nonzero_on_corruption(data_root, tmp_path):
    import shutil
    shutil.copytree(data_root / "zheng_wbc", tmp_path / "zheng_wbc")
    ok = run("data", "check", "zheng", "--data-root", tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    victim = tmp_path / "zheng_wbc/Dataset 1/007.bmp"
    victim.write_bytes(victim.read_bytes()[:200])
    bad = run("data", "check", "zheng", "--data-root", tmp_path)
    assert bad.returncode == 1 and "007.bmp" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_splits_check_reports_unchanged(data_root):
    r = run("data", "splits", "zheng", "--check", "--data-root", data_root)
    assert r.returncode == 0 and "zheng: unchanged" in r.stdout
