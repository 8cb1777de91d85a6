"""Data-parallel fit(): 2 CPU processes (torchrun, gloo) train like one process on the
same global batch; and the helpers stay inert in a single process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import load_module

REPO = Path(__file__).resolve().parent.parent
worker = load_module("ddp_worker", "tests/ddp_worker.py")


def test_single_process_helpers_are_inert():
    from leukemia_core.engine import distributed as ddp

    assert not ddp.is_distributed() and ddp.rank() == 0 and ddp.world_size() == 1
    assert ddp.is_main_process() and ddp.all_reduce_sum(1, 2.5) == [1.0, 2.5]
    assert ddp.broadcast_object({"a": 1}) == {"a": 1}
    assert ddp.init_from_env() is False  # no launcher in the environment


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "ddp" / "result.json"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_run = json.loads(out.read_text())
    single = worker.train(tmp_path / "single")

    assert ddp_run["world_size"] == 2 and single["world_size"] == 1
    # each process read half of the training set per epoch (plus nothing else: rank 0
    # validates on its own loader), the single process all of it
    epochs = ddp_run["epochs"]
    assert ddp_run["reads_per_rank"] == [48 * epochs, 48 * epochs]
    assert single["reads_per_rank"] == [96 * epochs]
    # same optimisation: weights, losses and validation scores agree
    for key, value in single["state"].items():
        torch.testing.assert_close(torch.tensor(ddp_run["state"][key]), torch.tensor(value),
                                   atol=1e-4, rtol=1e-4, msg=key)
    assert len(ddp_run["history"]) == len(single["history"]) == epochs
    for a, b in zip(ddp_run["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-6)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])
    assert ddp_run["best_epoch"] == single["best_epoch"]
    # rank 0 alone wrote the checkpoints, and they are complete
    ckpt = tmp_path / "ddp" / "ckpt"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "last.safetensors",
                                                "train_state.safetensors"}


def test_shard_loader_refuses_an_indivisible_batch(monkeypatch):
    from leukemia_core.engine import distributed as ddp

    monkeypatch.setattr(ddp, "world_size", lambda: 3)
    monkeypatch.setattr(ddp, "rank", lambda: 0)
    loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=16)
    with pytest.raises(ValueError, match="not divisible"):
        ddp.shard_loader(loader, seed=0)


def test_shard_loader_splits_each_global_batch_round_robin(monkeypatch):
    from leukemia_core.engine import distributed as ddp

    ds = TensorDataset(torch.arange(32))
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    batches = []
    for r in (0, 1):
        monkeypatch.setattr(ddp, "rank", lambda r=r: r)
        batches.append([b[0].tolist() for b in ddp.shard_loader(DataLoader(ds, batch_size=8), 0)])
    single = [b[0].tolist() for b in DataLoader(ds, batch_size=8)]
    assert [sorted(a + b) for a, b in zip(*batches)] == single
