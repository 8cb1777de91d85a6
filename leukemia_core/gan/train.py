"""Training a class-conditional R3GAN on in-memory images, with an EMA generator.

The images are the real training images of the classes to synthesise (uint8, HWC, at
the GAN's size); each batch is drawn with replacement and augmented by flips and
right-angle rotations (a cell has no up or down). The generator used for sampling is
an exponential moving average of the trained one (``torch.optim.swa_utils``), as in
R3GAN and StyleGAN: it gives smoother samples after a short schedule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from leukemia_core.engine.checkpoint import save_weights
from leukemia_core.errors import LeukemiaError
from leukemia_core.gan.provenance import file_sha256
from leukemia_core.gan.r3gan import Discriminator, Generator, R3GANConfig, R3GANTrainer


@dataclass
class GANRun:
    generator: Generator  # the EMA generator, in eval mode
    history: list[dict] = field(default_factory=list)  # losses every ``log_every`` steps
    train_images_per_s: float = 0.0
    wall_s: float = 0.0
    checkpoint: Path | None = None
    checkpoint_sha256: str = ""


def to_gan_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-batch random horizontal flip and right-angle rotation."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    return torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), (2, 3))


def train_r3gan(images: np.ndarray, targets, num_classes: int, steps: int, batch: int = 32,
                seed: int = 0, net: dict | None = None, config: R3GANConfig | None = None,
                ema_decay: float = 0.99, log_every: int = 10, out: str | Path | None = None,
                meta: dict | None = None, state_dir: str | Path | None = None, resume: bool = False,
                checkpoint_every_s: float = 180.0, stop_after_steps: int | None = None) -> GANRun:
    """Train a class-conditional R3GAN for ``steps`` alternating D/G steps.

    ``images``: uint8 ``(N, S, S, 3)`` with ``S`` a power of two; ``targets``: class
    indices in ``[0, num_classes)``. ``net`` sizes both networks (``base``, ``max_width``,
    ``blocks``; ``z_dim``/``embed_dim`` for the generator). With ``out``, the EMA
    generator is written there (safetensors) and its SHA-256 is the provenance key of
    every image it generates.

    The GAN keeps its own alternating loop but shares the one loop's state helpers: with
    ``state_dir`` the whole training state (both networks, the EMA, both optimisers, the
    batch generator and the global RNG) is written every ``checkpoint_every_s`` seconds,
    and ``resume=True`` continues a killed run exactly (``stop_after_steps`` simulates
    the kill, for tests).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise LeukemiaError(f"train_r3gan needs uint8 images of shape (N, S, S, 3), got "
                            f"{images.dtype} {images.shape}")
    y_all = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(y_all) != len(images) or len(images) == 0:
        raise LeukemiaError(f"{len(images)} images but {len(y_all)} targets")
    if int(y_all.min()) < 0 or int(y_all.max()) >= num_classes:
        raise LeukemiaError(f"targets must lie in [0, {num_classes}), got {y_all.unique().tolist()}")
    size = images.shape[1]
    net = dict(net or {})
    torch.manual_seed(seed)
    g = Generator(num_classes, size, **net).to(memory_format=torch.channels_last)  # NHWC: ~1.5x on CPU
    d = Discriminator(num_classes, size, **{k: v for k, v in net.items() if k in ("base", "max_width", "blocks")})
    d = d.to(memory_format=torch.channels_last)
    ema = AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    trainer = R3GANTrainer(g, d, config)
    x_all = to_gan_tensor(images).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    history, t0, first = [], time.perf_counter(), 0
    state_file = Path(state_dir) / "gan_state.safetensors" if state_dir else None
    if resume and state_file is not None and state_file.exists():
        first, history = _load_gan_state(state_file, g, d, ema, trainer, gen)
    last_save, done = time.monotonic(), 0
    for step in range(first, steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x = _augment(x_all[idx], gen).contiguous(memory_format=torch.channels_last)
        losses = trainer.step(x, y_all[idx])
        ema.update_parameters(g)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, **losses})
        done += 1
        killed = stop_after_steps is not None and done >= stop_after_steps
        if state_file is not None and (killed or time.monotonic() - last_save >= checkpoint_every_s):
            _save_gan_state(state_file, step + 1, history, g, d, ema, trainer, gen)
            last_save = time.monotonic()
        if killed:
            break
    wall = time.perf_counter() - t0
    run = GANRun(ema.module.eval(), history, steps * batch / max(wall, 1e-9), wall)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(out, run.generator, {"kind": "r3gan_generator", "image_size": size,
                                          "num_classes": num_classes, "net": net, "steps": steps,
                                          "batch": batch, "seed": seed, **(meta or {})})
        run.checkpoint, run.checkpoint_sha256 = out, file_sha256(out)
    return run


def load_generator(path: str | Path) -> tuple[Generator, dict]:
    """The EMA generator written by :func:`train_r3gan` (``out=``) and its metadata."""
    from leukemia_core.engine.checkpoint import load_weights, read_meta

    meta = read_meta(Path(path))
    if meta.get("kind") != "r3gan_generator":
        raise LeukemiaError(f"{path} is not an R3GAN generator checkpoint (kind {meta.get('kind')!r}); "
                            "write one with train_r3gan(..., out=PATH)")
    net = {k: v for k, v in (meta.get("net") or {}).items()
           if k in ("z_dim", "base", "max_width", "blocks", "embed_dim")}
    g = Generator(meta["num_classes"], meta["image_size"], **net)
    load_weights(Path(path), g)
    return g.eval(), meta


def _save_gan_state(path: Path, step: int, history: list, g, d, ema, trainer, gen) -> None:
    import json

    from safetensors.torch import save_file

    from leukemia_core.engine.loop import optimizer_state, rng_state

    tensors, meta = {}, {"step": step, "history": history}
    for name, module in (("g", g), ("d", d), ("ema", ema)):
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    for name, opt in (("opt_g", trainer.opt_g), ("opt_d", trainer.opt_d)):
        t, m = optimizer_state(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    rng_t, meta["rng"] = rng_state()
    tensors.update(rng_t)
    tensors["gen"] = gen.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def _load_gan_state(path: Path, g, d, ema, trainer, gen) -> tuple[int, list]:
    from safetensors.torch import load_file

    from leukemia_core.engine.checkpoint import read_meta
    from leukemia_core.engine.loop import load_optimizer_state, set_rng_state

    meta, tensors = read_meta(path), load_file(str(path))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for name, module in (("g", g), ("d", d), ("ema", ema)):
        module.load_state_dict(part(f"{name}."))
    for name, opt in (("opt_g", trainer.opt_g), ("opt_d", trainer.opt_d)):
        load_optimizer_state(opt, part(f"{name}."), meta[name])
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    gen.set_state(tensors["gen"])
    return meta["step"], meta["history"]
