"""Data-parallel training across processes (DDP), for ``fit()`` and the CLI.

``fit()`` trains data-parallel whenever ``torch.distributed`` is initialised with more
than one process; nothing changes otherwise. Launch one process per GPU with either

    torchrun --nproc_per_node 4 -m leukemia_core.cli train --profile full ...
    accelerate launch --multi_gpu --num_processes 4 -m leukemia_core.cli train --profile full ...

Both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``;
:func:`init_from_env` (called by ``leukemia-core train``) then joins the process group:
NCCL on GPUs, gloo on CPUs. The profile's batch size stays the *global* batch: each of
N processes takes ``batch_size / N`` per step, so the optimisation matches one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, WeightedRandomSampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True in a single process and on rank 0: the one that writes files and logs."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group a launcher (torchrun, accelerate launch) described in the
    environment; returns True if this call initialised it (and should destroy it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def all_reduce_sum(*values: float, device=None) -> list[float]:
    """Sums over all processes (the values themselves in a single process)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` for this process: the same dataset and worker settings, ``1/N`` of each
    global batch. Shuffled loaders get a :class:`DistributedSampler` (call
    ``sampler.set_epoch`` every epoch); ordered ones are split round-robin, so that the
    N processes together see exactly the global batches of one process; a weighted
    sampler draws ``1/N`` of its samples per process (from each process's own RNG)."""
    n = world_size()
    if loader.batch_size is None:
        raise ValueError("data-parallel fit() needs a DataLoader with batch_size "
                         "(a custom batch_sampler cannot be split between processes)")
    if loader.batch_size % n:
        raise ValueError(f"the global batch size {loader.batch_size} is not divisible by "
                         f"the {n} processes")
    sampler = loader.sampler
    if isinstance(sampler, WeightedRandomSampler):
        sampler = WeightedRandomSampler(sampler.weights, num_samples=-(-sampler.num_samples // n),
                                        replacement=sampler.replacement)
    elif isinstance(sampler, (RandomSampler, SequentialSampler)):
        sampler = DistributedSampler(loader.dataset, num_replicas=n, rank=rank(),
                                     shuffle=isinstance(sampler, RandomSampler), seed=seed)
    else:
        raise ValueError(f"data-parallel fit() cannot split a {type(sampler).__name__}")
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_size=loader.batch_size // n, sampler=sampler,
                      num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=workers > 0 and loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor if workers > 0 else None)
