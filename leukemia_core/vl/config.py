"""Chapter sizes of the vision-language chapter, per profile (sizes only: every profile
runs the same code), kept with every other chapter's in ``leukemia_core.config.CHAPTER_SIZES``.
The profile itself gives image size, batch size, workers and the evaluation cap.

train_cap: training images per source (dataset:label) for the joint model;
heldout_train_cap: per class for the held-out-class training (PBC, four classes);
probe_cap: training images per non-PBC source embedded for the source / group probes
(PBC's training images are always all embedded); cam_images: Grad-CAM examples.
"""
from __future__ import annotations

from leukemia_core.config import CHAPTER_SIZES, Profile, chapter_sizes

VL_SIZES: dict[str, dict] = CHAPTER_SIZES["05_vision_language"]


def vl_sizes(profile: str | Profile) -> dict:
    return chapter_sizes("05_vision_language", profile)
