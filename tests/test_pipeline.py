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
