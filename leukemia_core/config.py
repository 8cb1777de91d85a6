"""Profiles: one config type; ``smoke``, ``ci`` and ``full`` differ only in sizes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UnknownNameError


@dataclass(frozen=True)
class Profile:
    """Sizes for one run scale. Every field is a size; none changes the code path."""

    name: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    max_train_per_class: int | None  # subsample cap per class (None = all)
    max_eval_per_class: int | None
    model: str  # default classifier for the baseline
    num_workers: int
    patience: int  # early-stopping patience in epochs
    preload_images: bool = False  # decode + resize once, keep in memory (CPU profiles)
    seeds: tuple[int, ...] = (0,)
    extra: dict = field(default_factory=dict)  # chapter-specific sizes, e.g. finetune_epochs

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", image_size=32, epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0.0,
        max_train_per_class=8, max_eval_per_class=4, model="convnext_atto",
        num_workers=0, patience=1, seeds=(0,), extra={"finetune_epochs": 1},
    ),
    "ci": Profile(
        name="ci", image_size=64, epochs=8, batch_size=64, lr=2e-3, warmup_epochs=1.0,
        max_train_per_class=None, max_eval_per_class=None, model="convnext_atto",
        num_workers=2, patience=4, seeds=(0,), preload_images=True,
        extra={"finetune_epochs": 3},
    ),
    "full": Profile(
        name="full", image_size=224, epochs=60, batch_size=128, lr=2e-3, warmup_epochs=3.0,
        max_train_per_class=None, max_eval_per_class=None, model="convnext_tiny",
        num_workers=8, patience=10, seeds=(0, 1, 2), extra={"finetune_epochs": 20},
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    """Look up a profile by name, optionally overriding sizes."""
    if name not in PROFILES:
        raise UnknownNameError(f"unknown profile '{name}'; choose one of {sorted(PROFILES)}")
    return PROFILES[name].replace(**overrides) if overrides else PROFILES[name]
