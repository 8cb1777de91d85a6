"""A tiny fit() run, as one process or as one rank of ``torchrun`` (used by test_ddp.py).

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT.json

Rank 0 writes the final weights, the history and how many samples each rank read per
epoch to OUT.json (and checkpoints under OUT's folder).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CLASSES = ["a", "b", "c"]
GLOBAL_BATCH = 16


class CountingData(Dataset):
    """Class = the brightest channel; counts the items this process reads."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        self.x[torch.arange(n), self.y] += 1.0
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def model() -> nn.Module:
    """No batch norm and no dropout: per-process statistics would differ from one
    process's by design, and the comparison is meant to be exact."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def train(out_dir: Path, epochs: int = 3) -> dict:
    from leukemia_core.engine import distributed as ddp
    from leukemia_core.engine.train import FitConfig, fit

    torch.set_num_threads(1)
    data = CountingData(96, 0)
    train_loader = DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
    val_loader = DataLoader(CountingData(48, 1), batch_size=32)
    net = model()
    res = fit(net, train_loader, val_loader, CLASSES,
              FitConfig(epochs=epochs, lr=0.05, warmup_epochs=0.5, progress=False),
              out_dir=out_dir, device="cpu")
    reads = [data.reads]
    if ddp.is_distributed():
        reads = [None] * ddp.world_size()
        torch.distributed.all_gather_object(reads, data.reads)
    return {"world_size": ddp.world_size(), "reads_per_rank": reads, "epochs": epochs,
            "history": res.history, "best_epoch": res.best_epoch,
            "state": {k: v.tolist() for k, v in net.state_dict().items()}}


def main(out: str) -> None:
    from leukemia_core.engine import distributed as ddp

    started = ddp.init_from_env()
    try:
        result = train(Path(out).parent / "ckpt")
        if ddp.is_main_process():
            Path(out).write_text(json.dumps(result))
    finally:
        if started:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
