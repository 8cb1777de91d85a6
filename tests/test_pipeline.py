"""The run pipeline on real data: preloading, subsampling, normalisation."""
import pytest
import torch

from leukemia_core.config import get_profile
from leukemia_core.errors import UnknownNameError
from leukemia_core.pipeline import content_hash, prepare_data, subsample


@pytest.fixture(scope="module")
def smoke_data(data_root):
    return prepare_data("pbc", get_profile("smoke"), data_root)


def test_smoke_subsample_is_per_class_and_deterministic(smoke_data, data_root):
    counts = smoke_data.table.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["train"] == 8).all() and (counts.loc["test"] == 4).all()
    again = prepare_data("pbc", get_profile("smoke"), data_root)
    assert content_hash(again.table) == content_hash(smoke_data.table)
    other = subsample(smoke_data.table, 2, seed=1)
    assert (other.groupby("label").size() == 2).all()


def test_normalisation_comes_from_the_training_split(smoke_data):
    assert smoke_data.norm_source == "training split"
    assert all(0.5 < m < 1.0 for m in smoke_data.mean)  # pale smear background
    assert all(0.0 < s < 0.4 for s in smoke_data.std)


def test_preloaded_dataset_equals_decoding_every_time(smoke_data):
    plain = smoke_data.dataset("val", 32, train=False)
    cached = smoke_data.dataset("val", 32, train=False, preload=True)
    assert cached.cache is not None and len(cached) == len(plain)
    for i in range(len(plain)):
        x, y = plain[i]
        xc, yc = cached[i]
        assert y == yc
        torch.testing.assert_close(x, xc)


def test_unknown_class_is_named(data_root):
    with pytest.raises(UnknownNameError, match="dragon"):
        prepare_data("pbc", get_profile("smoke"), data_root, classes=["neutrophil", "dragon"])


def test_baseline_protocol_settings_and_run_folders():
    """Chapter 03's protocol (leukemia_core.experiments.baseline), without training: the
    profile's defaults fill the parameters, and the run folders keep the names that
    chapters 09/10 and ``make explore`` read."""
    import inspect

    from leukemia_core.config import chapter_sizes
    from leukemia_core.experiments import baseline

    P = get_profile("smoke")
    cfg = baseline.settings("smoke", image_size=48)
    assert cfg["profile"].image_size == 48 and cfg["profile"].name == "smoke"
    assert cfg["scratch_model"] == P.model and cfg["epochs"] == P.epochs
    assert cfg["finetune_epochs"] == chapter_sizes("03_baseline", "smoke")["finetune_epochs"]
    assert baseline.settings(P, epochs=5, finetune_epochs=2)["epochs"] == 5
    specs = baseline.model_specs(baseline.settings("smoke", scratch_model="convnext_atto"))
    assert [s["folder"] for s in specs.values()] == ["pbc_convnext_atto", "pbc_efficientnet_lite0_imagenet"]
    assert [s["pretrained"] for s in specs.values()] == [False, True]
    assert specs[baseline.PRETRAINED]["profile"].lr == P.lr / 2
    assert baseline.resolve_seeds(None, 3, P) == [3]  # one-seed profile: the seed parameter
    assert baseline.resolve_seeds(None, 3, get_profile("full")) == list(get_profile("full").seeds)
    assert baseline.resolve_seeds((0, 1), 3, P) == [0, 1]
    assert baseline.mean_std([0.5]) == "50.00%" and baseline.mean_std([0.4, 0.6]).startswith("50.00% ± 14.14%")
    params = inspect.signature(baseline.run).parameters  # the notebook's parameters, same defaults
    assert {k: params[k].default for k in ("seed", "scratch_model", "pretrained_model", "epochs",
                                           "finetune_epochs", "image_size")} == dict(
        seed=0, scratch_model=None, pretrained_model="efficientnet_lite0", epochs=None, finetune_epochs=None,
        image_size=None)
