"""The one training loop of the core (issue 17), in the spirit of Lightning's
``training_step``/``configure_optimizers`` and MONAI's handlers.

A *task* says what one training step computes and how a model is validated; *callbacks*
hook into the loop (epoch start/end, step end, fit end) for EMA, SWA, BatchNorm
re-estimation, pseudo-label switching or resampling. The loop owns everything else:
seeding, device placement, mixed precision, the optimiser and its one scheduler builder,
gradient clipping, model selection on validation, early stopping, checkpoints, and
**exact resume**: the training state (weights, optimiser, scheduler, every RNG, the
position inside the epoch, the task's and callbacks' own state) is written every
``checkpoint_every_s`` seconds of wall time and at the end of every epoch, and a run
killed at any point and restarted with ``resume=True`` ends with the same weights and
history as an uninterrupted one.

How resume inside an epoch stays exact: every epoch starts by reseeding every RNG from
``(seed, epoch)``, so the epoch's sample order (drawn when the loader's iterator is
created) is a function of the epoch alone. Resuming at step ``k`` recreates that
iterator, draws and discards ``k`` batches (data workers advance their RNGs exactly as
before), then restores the RNG states saved after step ``k``.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from leukemia_core.engine import distributed as ddp
from leukemia_core.engine.checkpoint import STATE, WEIGHTS, load_weights, save_weights

LAST = "last.safetensors"


@dataclass
class LoopConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warm-up from lr * warmup_lr_ratio, per step
    warmup_lr_ratio: float = 0.01
    min_lr_ratio: float = 0.01  # cosine decay to lr * min_lr_ratio
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    grad_clip: float | None = None
    channels_last: bool = True
    monitor: str | None = "macro_f1"  # validation metric that selects the epoch (None: the last)
    patience: int | None = None  # epochs without improvement before stopping
    checkpoint_every_s: float = 180.0  # training state written at least this often (and per epoch)
    progress: bool = True


@dataclass
class LoopResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    stopped_early: bool = False
    interrupted: bool = False  # stopped by ``stop_after_steps`` (tests simulate a kill)
    out_dir: str | None = None


@dataclass
class LoopState:
    """What callbacks and the task see of the running loop."""
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained (wrapped by DDP when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: object
    config: LoopConfig
    device: torch.device
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0  # steps done in this epoch
    result: LoopResult = field(default_factory=LoopResult)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


class Callback:
    """Hooks of the loop; state that must survive a resume goes in ``state_dict``
    (tensors only; use ``extra_state`` for JSON-able values)."""

    def on_fit_start(self, state: LoopState) -> None: ...

    def on_epoch_start(self, state: LoopState) -> None:
        """Called before the epoch's data iterator is created, also when a run resumes
        inside the epoch (its saved state is restored afterwards): set per-epoch state
        here, e.g. reseed a sampler's generator from the epoch."""
    def on_step_end(self, state: LoopState, out: dict) -> None: ...
    def on_epoch_end(self, state: LoopState, record: dict) -> None: ...
    def on_fit_end(self, state: LoopState) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, extra: dict) -> None: ...


class EpochGenerators(Callback):
    """Named :class:`torch.Generator` s (a sampler's, an augmentation's, ...) reseeded at the
    start of every epoch from ``(seed, epoch)`` and saved with the training state, so that
    an epoch draws the same numbers whether the run was resumed or not. The ``i``-th
    generator (in the order given) gets ``seed * 10007 + epoch + i * 7919``. Read one with
    ``callback["name"]``."""

    def __init__(self, seed: int, **generators: torch.Generator):
        self.seed, self.generators = seed, generators

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def on_epoch_start(self, state):
        for i, gen in enumerate(self.generators.values()):
            gen.manual_seed(self.seed * 10007 + state.epoch + i * 7919)

    def state_dict(self):
        return {name: gen.get_state() for name, gen in self.generators.items()}

    def load_state_dict(self, tensors):
        for name, gen in self.generators.items():
            if name in tensors:
                gen.set_state(tensors[name])


class Task:
    """What the loop optimises. Subclasses implement :meth:`training_step` and, to select
    epochs, :meth:`validate`; the defaults cover the rest."""

    callbacks: tuple[Callback, ...] = ()

    def param_groups(self, model: torch.nn.Module, config: LoopConfig) -> list[dict]:
        """AdamW groups: weight decay on matrices and kernels, none on biases and norms."""
        decay = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
        no_decay = [p for p in model.parameters() if p.ndim <= 1 and p.requires_grad]
        return [{"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def to_device(self, batch, device: torch.device, config: LoopConfig):
        """Tensors of ``batch`` (nested lists, tuples, dicts) moved to ``device``; images
        (4-d tensors) channels-last when configured."""
        if torch.is_tensor(batch):
            batch = batch.to(device, non_blocking=True)
            return batch.contiguous(memory_format=torch.channels_last) \
                if config.channels_last and batch.ndim == 4 else batch
        if isinstance(batch, dict):
            return {k: self.to_device(v, device, config) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v, device, config) for v in batch)
        return batch

    def training_step(self, net: torch.nn.Module, batch, state: LoopState) -> dict:
        """``{"loss": tensor, "n": batch size, **other scalars to log}``."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, state: LoopState) -> dict | None:
        """Validation metrics (holding ``config.monitor``), or None without validation."""
        return None


# --------------------------------------------------------------------------- pieces
def build_scheduler(optimizer, config: LoopConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """The one schedule: linear warm-up over ``warmup_epochs`` then cosine decay to
    ``lr * min_lr_ratio``, stepped per optimisation step."""
    return CosineLRScheduler(
        optimizer, t_initial=config.epochs * steps_per_epoch, lr_min=config.lr * config.min_lr_ratio,
        warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=config.lr * config.warmup_lr_ratio,
        warmup_prefix=True, t_in_epochs=False)


def seed_epoch(seed: int, epoch: int) -> None:
    """Every RNG from ``(seed, epoch)`` (rank 0 of a distributed run: as one process)."""
    s = seed * 10007 + epoch + 7919 * ddp.rank()
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    extra = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = extra["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = extra["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as safetensors-ready tensors and JSON-able metadata."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": opt["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_loop_state(path: Path, state: LoopState, task: Task, sums: dict, bad_epochs: int) -> None:
    """The whole training state in one safetensors file (tensors) + JSON metadata."""
    opt_t, opt_meta = optimizer_state(state.optimizer)
    rng_t, rng_extra = rng_state()
    tensors = {**opt_t, **rng_t}
    hooks = {}
    for i, cb in enumerate(task.callbacks):
        tensors.update({f"cb{i}.{k}": v.detach().cpu().contiguous() for k, v in cb.state_dict().items()})
        hooks[str(i)] = cb.extra_state()
    r = state.result
    meta = {"optimizer": opt_meta, "scheduler": state.scheduler.state_dict(), "rng": rng_extra,
            "epoch": state.epoch, "step": state.step, "sums": sums, "history": r.history,
            "best_epoch": r.best_epoch, "best_score": r.best_score if math.isfinite(r.best_score) else None,
            "bad_epochs": bad_epochs, "callbacks": hooks, "config": asdict(state.config)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)  # a kill while writing leaves the previous state intact


def load_loop_state(path: Path, state: LoopState, task: Task) -> dict:
    from leukemia_core.engine.checkpoint import read_meta

    meta = read_meta(path)
    tensors = load_file(str(path))
    load_optimizer_state(state.optimizer, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
    state.scheduler.load_state_dict(meta["scheduler"])
    meta["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    meta["callback_tensors"] = {k: v for k, v in tensors.items() if k.startswith("cb")}
    return meta


def restore_callbacks(task: Task, restored: dict) -> None:
    """The callbacks' saved state (after their ``on_epoch_start`` re-established the
    epoch's, so a mid-epoch resume ends where the kill left them)."""
    tensors = restored["callback_tensors"]
    for i, cb in enumerate(task.callbacks):
        prefix = f"cb{i}."
        cb.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        cb.load_extra_state(restored["callbacks"].get(str(i), {}))


# --------------------------------------------------------------------------- the loop
def train(model: torch.nn.Module, train_loader, task: Task, config: LoopConfig,
          out_dir: str | Path | None = None, resume: bool = False, device=None, meta: dict | None = None,
          stop_after_steps: int | None = None) -> LoopResult:
    """Train ``model`` with ``task``; keep the best weights by ``config.monitor``.

    With ``out_dir``: ``model.safetensors`` (the best weights, or the last without
    validation), ``last.safetensors`` and ``train_state.safetensors`` (everything a resume
    needs), the latter two at least every ``checkpoint_every_s`` seconds and per epoch;
    ``resume=True`` continues from them. Validation is the task's (:meth:`Task.validate`). ``stop_after_steps`` returns after that many
    optimisation steps in this call (after the state is written), as a kill would.
    Distributed (``torch.distributed`` initialised): DDP, each process on its shard of
    every global batch, rank 0 validates and writes, all follow its selection.
    """
    device = torch.device(device) if device else _default_device()
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    distributed, main = ddp.is_distributed(), ddp.is_main_process()
    net = model
    if distributed:
        train_loader = ddp.shard_loader(train_loader, config.seed)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = len(train_loader)
    optimizer = torch.optim.AdamW(task.param_groups(model, config), lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps)
    state = LoopState(model, net, optimizer, scheduler, config, device, steps,
                      result=LoopResult(out_dir=str(out_dir) if out_dir else None))
    meta = {**(meta or {}), "loop_config": asdict(config)}
    out = Path(out_dir) if out_dir else None
    if out and main:
        out.mkdir(parents=True, exist_ok=True)
    r, best_state, bad_epochs = state.result, None, 0
    start_epoch, start_step, sums, restored = 0, 0, {}, None
    if resume and out and (out / STATE).exists() and (out / LAST).exists():
        load_weights(out / LAST, model)
        restored = load_loop_state(out / STATE, state, task)
        r.history, r.best_epoch = restored["history"], restored["best_epoch"]
        r.best_score = restored["best_score"] if restored["best_score"] is not None else -math.inf
        bad_epochs, start_epoch, start_step = restored["bad_epochs"], restored["epoch"], restored["step"]
        sums = restored["sums"]
        if start_step >= steps:  # saved at the end of an epoch
            start_epoch, start_step, sums = start_epoch + 1, 0, {}
            restore_callbacks(task, restored)
    for cb in task.callbacks:
        cb.on_fit_start(state)
    last_save = time.monotonic()
    done_here = 0

    def save(step_in_epoch: int) -> None:
        nonlocal last_save
        if out and main:
            state.step = step_in_epoch
            save_weights(out / LAST, model, meta | {"epoch": state.epoch, "step": step_in_epoch})
            save_loop_state(out / STATE, state, task, sums, bad_epochs)
        last_save = time.monotonic()

    for epoch in range(start_epoch, config.epochs):
        state.epoch = epoch
        if config.patience is not None and r.best_epoch >= 0 and bad_epochs >= config.patience:
            r.stopped_early = True
            break
        seed_epoch(config.seed, epoch)
        if distributed and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        first = start_step if (restored is not None and epoch == start_epoch) else 0
        if first == 0:
            sums = {}
        for cb in task.callbacks:  # also when resuming inside the epoch: it sets the epoch's state
            cb.on_epoch_start(state)
        model.train()
        t0 = time.perf_counter()
        it = iter(train_loader)
        for _ in range(first):  # resume inside the epoch: the same batches, discarded
            next(it)
        if first:
            set_rng_state(restored["rng_tensors"], restored["rng"])
            restore_callbacks(task, restored)
        scheduler.step_update(epoch * steps + first)
        bar = tqdm(it, total=steps, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and main))
        for step, batch in enumerate(bar, start=first):
            state.step = step
            batch = task.to_device(batch, device, config)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
                outs = task.training_step(net, batch, state)
            optimizer.zero_grad(set_to_none=True)
            outs["loss"].backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step_update(epoch * steps + step + 1)
            n = int(outs.get("n", 1))
            sums["n"] = sums.get("n", 0) + n
            for k, v in outs.items():
                if k != "n":
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * n
            for cb in task.callbacks:
                cb.on_step_end(state, outs)
            done_here += 1
            if time.monotonic() - last_save >= config.checkpoint_every_s and step + 1 < steps:
                save(step + 1)
            if stop_after_steps is not None and done_here >= stop_after_steps and step + 1 < steps:
                save(step + 1)
                r.interrupted = True
                return r
        train_time = time.perf_counter() - t0
        seen = sums.get("n", 0)
        if distributed:
            reduced = ddp.all_reduce_sum(*(sums[k] for k in sorted(sums)), device=device)
            sums = dict(zip(sorted(sums), (float(v) for v in reduced)))
            seen = sums["n"]
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": v / max(seen, 1) for k, v in sums.items() if k != "n"},
                  "train_images_per_s": seen / max(train_time, 1e-9), "train_time_s": train_time}
        score = None
        if main:
            state.step = steps
            val = task.validate(model, state)
            if val:
                record.update({f"val_{k}": v for k, v in val.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
                score = val.get(config.monitor) if config.monitor else None
        if distributed:
            record, score = ddp.broadcast_object((record, score))
        for cb in task.callbacks:
            cb.on_epoch_end(state, record)
        if score is not None:
            if score > r.best_score:
                r.best_score, r.best_epoch, bad_epochs = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if out and main:
                    save_weights(out / WEIGHTS, model, meta | {"epoch": epoch, "score": score})
            else:
                bad_epochs += 1
        r.history.append(record)
        if config.progress and main:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        save(steps)
        if stop_after_steps is not None and done_here >= stop_after_steps and epoch + 1 < config.epochs:
            r.interrupted = True  # killed right after the epoch's state was written
            return r
    if r.best_epoch < 0 or config.monitor is None:  # no selection: the last weights
        r.best_epoch = len(r.history) - 1
        if out and main:
            save_weights(out / WEIGHTS, model, meta | {"epoch": r.best_epoch})
    elif best_state is not None:
        model.load_state_dict(best_state)
    elif out and (out / WEIGHTS).exists():  # resumed after the best epoch
        load_weights(out / WEIGHTS, model)
    for cb in task.callbacks:
        cb.on_fit_end(state)
    if distributed:
        torch.distributed.barrier()
    return r


def _default_device() -> torch.device:
    if torch.cuda.is_available() and ddp.is_distributed():
        return torch.device("cuda", ddp.local_rank())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
