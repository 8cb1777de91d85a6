"""Benchmarks (not tests): data-loader throughput and ``fit()`` overhead.

Run them alone on the machine: another busy process halves the numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .config import get_profile
from .results import hardware


def _loader_rate(ds, workers: int, batch: int = 64, batches: int = 40) -> float:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=False, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench_loader(data_root=None, sizes=(64, 128), workers=(0, 2), n_raw: int = 1000) -> dict:
    """Images/s of the PBC training pipeline vs a raw PIL decode, and the rate the
    default model consumes at 64 px (its bare training step on ready tensors)."""
    from PIL import Image

    from .pipeline import prepare_data

    data = prepare_data("pbc", get_profile("ci"), data_root)
    paths = data.split("train")["path"].tolist()[:n_raw]
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")
    out = {"raw_pil_decode_images_per_s": len(paths) / (time.perf_counter() - t0), "pipeline": {}}
    for size in sizes:
        ds = data.dataset("train", size)
        for w in workers:
            out["pipeline"][f"{size}px_{w}workers"] = _loader_rate(ds, w)
    out["train_consumes_images_per_s_64px"] = bench_train(steps=15, which=("bare",))["bare_images_per_s"]
    out["loader_faster_than_training_64px_2workers"] = (
        out["pipeline"].get("64px_2workers", 0) > out["train_consumes_images_per_s_64px"])
    return out


def _bare_loop(model, loader, lr=1e-3):
    """The reference: a plain timm/torch training loop (NHWC like fit()), nothing else."""
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t0)


def bench_train(model_name: str = "convnext_atto", image_size: int = 64, batch: int = 64,
                steps: int = 30, repeats: int = 2, which=("bare", "fit")) -> dict:
    """Images/s of ``fit()`` vs the bare loop, same model, batch and ready tensors."""
    from .engine.train import FitConfig, fit
    from .models import create_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 8, (batch * steps,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    rates = {w: [] for w in which}
    for _ in range(repeats):
        for w in which:
            torch.manual_seed(0)
            model = create_model(model_name, num_classes=8)
            if w == "bare":
                _bare_loop(model, [next(iter(loader))])  # warm-up step
                rates[w].append(_bare_loop(model, loader))
            else:
                fit(model, [next(iter(loader))], None, list("abcdefgh"), FitConfig(epochs=1, progress=False))
                t0 = time.perf_counter()
                fit(model, loader, None, list("abcdefgh"), FitConfig(epochs=1, progress=False),
                    device="cpu" if not torch.cuda.is_available() else None)
                rates[w].append(batch * steps / (time.perf_counter() - t0))
    out = {"model": model_name, "image_size": image_size, "batch": batch, "steps": steps}
    for w in which:
        out[f"{w}_images_per_s"] = max(rates[w])
    if "fit" in which and "bare" in which:
        out["ratio_fit_over_bare"] = out["fit_images_per_s"] / out["bare_images_per_s"]
    return out


def run(what: str, data_root=None, out: str | None = None) -> dict:
    result = {"machine": hardware(), "torch_threads": torch.get_num_threads()}
    if what in ("train", "all"):
        result["train"] = bench_train()
    if what in ("loader", "all"):
        result["loader"] = bench_loader(data_root)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
