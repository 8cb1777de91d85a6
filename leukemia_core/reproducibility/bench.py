"""Benchmarks (not tests): data-loader throughput, ``fit()`` overhead, inference
latency of each chapter's main model, and training time against image size.

Run them alone on the machine: another busy process halves the numbers. Every result
carries the machine it was measured on (:func:`leukemia_core.reproducibility.results.hardware`). The
book's benchmarks chapter runs the same functions with small batch counts.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from leukemia_core.config import get_profile
from leukemia_core.reproducibility.results import hardware


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


def bench_loader(data_root=None, sizes=(64, 128), workers=(0, 2), n_raw: int = 1000,
                 batches: int = 40, batch: int = 64, max_train_per_class: int | None = None,
                 train_steps: int = 15) -> dict:
    """Images/s of the PBC training pipeline vs a raw PIL decode, and the rate the
    default model consumes at 64 px (its bare training step on ready tensors).
    ``max_train_per_class`` caps the training split read (a rate needs no more)."""
    from PIL import Image

    from leukemia_core.pipeline import prepare_data

    data = prepare_data("pbc", get_profile("ci", max_train_per_class=max_train_per_class), data_root)
    paths = data.split("train")["path"].tolist()[:n_raw]
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")
    out = {"raw_pil_decode_images_per_s": len(paths) / (time.perf_counter() - t0), "pipeline": {}}
    for size in sizes:
        ds = data.dataset("train", size)
        for w in workers:
            out["pipeline"][f"{size}px_{w}workers"] = _loader_rate(ds, w, batch, min(batches, len(ds) // batch - 1))
    out["train_consumes_images_per_s_64px"] = bench_train(steps=train_steps, repeats=1,
                                                          which=("bare",))["bare_images_per_s"]
    out["loader_faster_than_training_64px_2workers"] = (
        out["pipeline"].get("64px_2workers", 0) > out["train_consumes_images_per_s_64px"])
    return out


def _bare_loop(model, loader, lr=1e-3):
    """The reference: a plain timm/torch training loop (NHWC like fit()), nothing else.
    The one optimiser step outside the engine's loop and the GAN's, on purpose: it is what
    the loop's overhead is measured against (tests/test_loop.py lists it)."""
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
    from leukemia_core.engine.train import FitConfig, fit
    from leukemia_core.models import create_model

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


# --------------------------------------------------------------------------- latency
class _ZeroShot(torch.nn.Module):
    """A vision-language model at inference: image embedding, then cosine similarity
    with the (precomputed) class-sentence embeddings."""

    def __init__(self, embedder, n_classes: int, dim: int):
        super().__init__()
        self.embedder = embedder
        self.register_buffer("classes", torch.nn.functional.normalize(torch.randn(n_classes, dim), dim=-1))

    def forward(self, x):
        return self.embedder(x) @ self.classes.T


def chapter_models(profile: str = "ci") -> list[dict]:
    """Each chapter's main model at the chapter's image size under ``profile``, as
    ``{"chapter", "model", "image_size", "build"}`` (``build()`` -> an eval-ready module
    with random weights: latency does not depend on the weights)."""
    from leukemia_core.models import create_model

    P = get_profile(profile)
    size = P.image_size

    def hierarchy():
        from leukemia_core.hierarchy import LevelCodec, build_hierarchical_model
        from leukemia_core.data.taxonomy import Taxonomy

        codec = LevelCodec(Taxonomy.from_yaml("leukemia"))
        return build_hierarchical_model("multilevel", "efficientnet_lite0", codec, size)[0]

    def vision_language():
        from leukemia_core.vl.model import ImageEmbedder, build_vl_model

        vl = build_vl_model(image_size=size, pretrained=False)
        model = _ZeroShot(ImageEmbedder(vl), n_classes=4, dim=vl.config.embed_dim)
        model.n_params = sum(p.numel() for m in (vl.image_tower, vl.image_proj) for p in m.parameters())
        return model  # the text tower runs once per prompt, not per image

    return [
        {"chapter": "03_baseline", "model": f"{P.model} (from scratch)", "image_size": size,
         "build": lambda: create_model(P.model, num_classes=8)},
        {"chapter": "03_baseline", "model": "efficientnet_lite0 (fine-tuned)", "image_size": size,
         "build": lambda: create_model("efficientnet_lite0", num_classes=8)},
        {"chapter": "04_hierarchy", "model": "multi-level efficientnet_lite0", "image_size": size,
         "build": hierarchy},
        {"chapter": "05_vision_language", "model": "efficientnet_lite0 image tower + prompts",
         "image_size": size, "build": vision_language},
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model: torch.nn.Module, image_size: int, batch: int, repeats: int, warmup: int = 2,
            device=None) -> dict:
    """Median wall time of one forward pass over ``batch`` images (NHWC, eval mode), and
    per image; bf16 autocast on CUDA like the engine's evaluation."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(x)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "repeats": repeats, "batch_ms": med * 1e3, "ms_per_image": med * 1e3 / batch,
            "images_per_s": batch / med, "device": str(device)}


def bench_latency(profile: str = "ci", batches=(1, 64), repeats: dict | None = None, device=None) -> list[dict]:
    """Inference latency of every chapter's main model (:func:`chapter_models`) at
    batch 1 and batch 64."""
    repeats = repeats or {1: 20, 64: 3}
    rows = []
    for spec in chapter_models(profile):
        model = spec["build"]()
        params = getattr(model, "n_params", None) or sum(p.numel() for p in model.parameters())
        params /= 1e6
        for b in batches:
            rows.append({"chapter": spec["chapter"], "model": spec["model"], "image_size": spec["image_size"],
                         "params_M": params, **latency(model, spec["image_size"], b, repeats.get(b, 3),
                                                       device=device)})
    return rows


# --------------------------------------------------------------------------- scaling
def bench_scaling(model_name: str = "convnext_atto", sizes=(64, 128, 224), batch: int = 32,
                  steps: int = 3) -> list[dict]:
    """Training throughput of ``fit()`` at each image size (same model, batch and step
    count; ready tensors, so the loader is out of the picture)."""
    rows = []
    for size in sizes:
        r = bench_train(model_name, image_size=size, batch=batch, steps=steps, repeats=1, which=("fit",))
        rows.append({"model": model_name, "image_size": size, "batch": batch, "steps": steps,
                     "images_per_s": r["fit_images_per_s"],
                     "s_per_1000_images": 1000 / r["fit_images_per_s"]})
    base = rows[0]["s_per_1000_images"]
    for r in rows:
        r["relative_to_smallest"] = r["s_per_1000_images"] / base
    return rows


#: Sizes of each benchmark per profile: the book's chapter runs these (ci: <= 2 min on
#: 2 cores); `leukemia-core bench` uses the full ones.
BOOK_SIZES = {
    "smoke": dict(loader=dict(sizes=(32,), workers=(0,), batches=3, batch=16, n_raw=50,
                              max_train_per_class=40, train_steps=2),
                  train=dict(image_size=32, batch=16, steps=3, repeats=1),
                  latency=dict(batches=(1, 64), repeats={1: 3, 64: 1}),
                  scaling=dict(sizes=(64, 128, 224), batch=4, steps=1),
                  gan=[dict(image_size=16, batch=4, steps=1, base=8, max_width=16)]),
    "ci": dict(loader=dict(sizes=(64, 128), workers=(0, 2), batches=15, batch=64, n_raw=300,
                           max_train_per_class=250, train_steps=6),
               train=dict(image_size=64, batch=64, steps=10, repeats=1),
               latency=dict(batches=(1, 64), repeats={1: 15, 64: 3}),
               scaling=dict(sizes=(64, 128, 224), batch=32, steps=3),
               # the R3GAN chapter's ci GAN (32 px) and the full one (64 px)
               gan=[dict(image_size=32, batch=32, steps=5, base=8, max_width=64),
                    dict(image_size=64, batch=32, steps=2)]),
    "full": dict(loader=dict(), train=dict(), latency=dict(batches=(1, 64), repeats={1: 50, 64: 10}),
                 scaling=dict(sizes=(64, 128, 224), batch=64, steps=10),
                 gan=[dict(image_size=64, batch=64, steps=20), dict(image_size=128, batch=64, steps=20)]),
}


def run(what: str, data_root=None, out: str | None = None, profile: str = "full", n: int = 20000,
        checkpoint=None) -> dict:
    """``what``: loader, train, latency, scaling, all (these four), gan (R3GAN rates, on
    its own: not part of ``all``) or predict (peak memory of ``predict_folder`` on ``n``
    generated images and on ``n / 10``, :func:`bench_predict`). ``profile`` picks the sizes
    (:data:`BOOK_SIZES`; ``full``: the full benchmark) and the chapters' image size."""
    sizes = BOOK_SIZES[profile]
    result = {"schema": "leukemia-core/bench/v1", "profile": profile, "machine": hardware(),
              "torch_threads": torch.get_num_threads()}
    if what in ("train", "all"):
        result["train"] = bench_train(**sizes["train"])
    if what in ("loader", "all"):
        result["loader"] = bench_loader(data_root, **sizes["loader"])
    if what in ("latency", "all"):
        result["latency"] = bench_latency(profile, **sizes["latency"])
    if what in ("scaling", "all"):
        result["scaling"] = bench_scaling(**sizes["scaling"])
    if what == "gan":
        result["gan"] = [bench_gan(**kw) for kw in sizes["gan"]]
    if what == "predict":
        result["predict"] = bench_predict(ns=sorted({max(1, n // 10), n}), checkpoint=checkpoint)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- GAN, hybrid
def bench_gan(image_size: int = 64, batch: int = 64, steps: int = 10, num_classes: int = 5,
              device=None, **net_sizes) -> dict:
    """R3GAN training images/s (one D step with R1 + R2 and one G step per batch) and
    generator samples/s (inference), on random data: the rate depends on sizes only."""
    from leukemia_core.gan.r3gan import Discriminator, Generator, R3GANTrainer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    g = Generator(num_classes, image_size, **net_sizes).to(device)
    d = Discriminator(num_classes, image_size, **{k: v for k, v in net_sizes.items()
                                                  if k in ("base", "max_width", "blocks")}).to(device)
    trainer = R3GANTrainer(g, d)
    x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    y = torch.randint(0, num_classes, (batch,), device=device)
    trainer.step(x, y)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, y)
    _sync(device)
    train_rate = batch * steps / (time.perf_counter() - t0)
    with torch.no_grad():
        z = torch.randn(batch, g.z_dim, device=device)
        g(z, y)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            g(z, y)
        _sync(device)
    return {"image_size": image_size, "batch": batch, "steps": steps, "device": str(device),
            "generator_params_M": sum(p.numel() for p in g.parameters()) / 1e6,
            "discriminator_params_M": sum(p.numel() for p in d.parameters()) / 1e6,
            "train_images_per_s": train_rate,
            "generator_samples_per_s": batch * steps / (time.perf_counter() - t0)}


def bench_classifier_train(model_name: str, image_size: int, batch: int = 64, steps: int = 10,
                           device=None) -> dict:
    """Training images/s of any registered or timm classifier on random tensors at
    ``image_size``, trained by the one loop (:func:`leukemia_core.engine.loop.train`:
    AdamW, cross-entropy, bf16 autocast on CUDA), after one warm-up step."""
    from leukemia_core.engine.loop import LoopConfig, Task
    from leukemia_core.engine.loop import train as train_loop
    from leukemia_core.models import create_model, size_kwargs

    class _CrossEntropy(Task):
        def training_step(self, net, batch, state):
            x, y = batch
            return {"loss": torch.nn.functional.cross_entropy(net(x), y), "n": len(y)}

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = create_model(model_name, 5, **size_kwargs(model_name, image_size))
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 5, (batch,))
    config = LoopConfig(epochs=1, lr=1e-3, warmup_epochs=0.0, monitor=None, progress=False)
    train_loop(model, [(x, y)] * 2, _CrossEntropy(), config, device=device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    train_loop(model, [(x, y)] * steps, _CrossEntropy(), config, device=device)
    _sync(device)
    return {"model": model_name, "image_size": image_size, "batch": batch, "steps": steps,
            "device": str(device), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_images_per_s": batch * steps / (time.perf_counter() - t0)}


# --------------------------------------------------------------------------- predict memory
def _rss_mb() -> float:
    """The current resident set size of this process (Linux), in MiB."""
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _predict_memory(folder: str, checkpoint: str, out_csv: str, batch_size: int, adapt_bn: bool) -> dict:
    """Run in a fresh process: RSS before, peak RSS after ``predict_folder`` on ``folder``,
    and the peak of Python-level allocations (tracemalloc) during it."""
    import tracemalloc

    from leukemia_core.predict import load_predictor, predict_folder

    load_predictor(checkpoint)  # imports and weights count in the baseline, not in the growth
    before = _rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    table = predict_folder(checkpoint, folder, out_csv, batch_size=batch_size, overwrite=True,
                           adapt_bn=adapt_bn)
    wall = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak = _peak_rss_mb()
    return {"n_images": len(table), "unreadable": int(table["error"].notna().sum()),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "peak_growth_mb": round(peak - before, 1), "python_alloc_peak_mb": round(py_peak, 2),
            "wall_s": round(wall, 1), "images_per_s": round(len(table) / wall, 1)}


def tiny_checkpoint(path, image_size: int = 32, classes=("neutrophil", "lymphocyte", "monocyte",
                                                          "eosinophil", "basophil")) -> Path:
    """An untrained EfficientNet-Lite0 (BatchNorm) saved as a DG checkpoint at ``image_size``."""
    from leukemia_core import dg
    from leukemia_core.dg import save_dg_checkpoint

    torch.manual_seed(0)
    model = dg.DGNet(dg.build_backbone("bn", len(classes), pretrained=False))
    return save_dg_checkpoint(path, model, list(classes), image_size, None, dg.Recipe("bench"))


def write_cell_images(folder, n: int, seed: int = 0) -> list[Path]:
    """``n`` small synthetic cell-like JPEGs (a purple disc on a pale background, 48-80 px)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(48, 81, 2))
        im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 240, 3)))
        r = int(rng.integers(8, min(w, h) // 2))
        ImageDraw.Draw(im).ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r],
                                   fill=tuple(int(v) for v in rng.integers(60, 160, 3)))
        paths.append(folder / f"cell_{i:06d}.jpg")
        im.save(paths[-1], quality=85)
    return paths


def bench_predict(ns=(2000, 20000), checkpoint=None, batch_size: int = 64, adapt_bn: bool = False) -> dict:
    """Peak memory of :func:`leukemia_core.predict.predict_folder` against the folder's size:
    ``max(ns)`` generated images, a folder of the first ``n`` of them (hard links) for each
    ``n``, each measured in a fresh process (peak RSS is a process high-water mark). With
    streaming the growth over the baseline stays flat in ``n``; only the per-row results
    (a few hundred bytes per image) grow."""
    import multiprocessing
    import os
    import tempfile

    ns = sorted(ns)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        ckpt = Path(checkpoint) if checkpoint else tiny_checkpoint(tmp / "tiny.safetensors")
        t0 = time.perf_counter()
        paths = write_cell_images(tmp / "all", ns[-1])
        generate_s = time.perf_counter() - t0
        ctx = multiprocessing.get_context("spawn")
        for n in ns:
            folder = tmp / "all" if n == ns[-1] else tmp / f"first_{n}"
            if n != ns[-1]:
                folder.mkdir()
                for p in paths[:n]:
                    try:
                        os.link(p, folder / p.name)
                    except OSError:
                        (folder / p.name).write_bytes(p.read_bytes())
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(_predict_memory, (str(folder), str(ckpt), str(tmp / f"pred_{n}.csv"),
                                                         batch_size, adapt_bn)))
    out = {"checkpoint": str(checkpoint) if checkpoint else "untrained efficientnet_lite0, 32 px (DG)",
           "batch_size": batch_size, "adapt_bn": adapt_bn, "generate_images_s": round(generate_s, 1),
           "runs": rows}
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        out["growth_mb_per_1000_images"] = round(
            (b["peak_growth_mb"] - a["peak_growth_mb"]) / max(1, b["n_images"] - a["n_images"]) * 1000, 3)
    return out
