import pytest

from leukemia_core.data import load_dataset
from leukemia_core.data.dataroot import DEFAULT_ROOT, data_root, resolve_data_root
from leukemia_core.errors import DataRootError, UnknownNameError


def test_precedence_option_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKEMIA_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "opt") == ((tmp_path / "opt").resolve(), "--data-root")
    assert resolve_data_root(None) == ((tmp_path / "env").resolve(), "LEUKEMIA_DATA")
    monkeypatch.delenv("LEUKEMIA_DATA")
    assert resolve_data_root(None)[0] == DEFAULT_ROOT


def test_missing_root_names_setting_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKEMIA_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataRootError) as err:
        data_root()
    msg = str(err.value)
    assert "LEUKEMIA_DATA" in msg and "leukemia-core data fetch" in msg and "nowhere" in msg


def test_incomplete_root_names_dataset_and_fetch(tmp_path):
    (tmp_path / "pbc").mkdir()
    with pytest.raises(DataRootError, match=r"zheng.*data fetch zheng"):
        load_dataset("zheng", tmp_path)
    with pytest.raises(DataRootError, match="PBC_dataset_normal_DIB"):
        load_dataset("pbc", tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown dataset 'pbcx'"):
        load_dataset("pbcx", tmp_path)
