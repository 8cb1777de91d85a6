"""Chapter sizes of the vision-language chapter, per profile (sizes only: every profile
runs the same code). Read with :func:`vl_sizes`; the profile itself gives image size,
batch size, workers and the evaluation cap."""
from __future__ import annotations

from ..config import Profile, get_profile

#: train_cap: training images per source (dataset:label) for the joint model;
#: heldout_train_cap: per class for the held-out-class training (PBC, four classes);
#: probe_cap: training images per non-PBC source embedded for the source / group probes
#: (PBC's training images are always all embedded); cam_images: Grad-CAM examples.
VL_SIZES: dict[str, dict] = {
    "smoke": dict(train_cap=8, heldout_train_cap=8, probe_cap=8, epochs=1, heldout_epochs=1, embed_dim=64,
                  text_trainable_layers=0, lr=1e-3, head_lr=3e-3, cam_images=2),
    "ci": dict(train_cap=400, heldout_train_cap=300, probe_cap=100, epochs=3, heldout_epochs=3, embed_dim=256,
               text_trainable_layers=0, lr=1e-3, head_lr=3e-3, cam_images=6),
    "full": dict(train_cap=None, heldout_train_cap=None, probe_cap=None, epochs=20, heldout_epochs=10,
                 embed_dim=256, text_trainable_layers=2, lr=5e-4, head_lr=2e-3, cam_images=8),
}


def vl_sizes(profile: str | Profile) -> dict:
    name = profile.name if isinstance(profile, Profile) else get_profile(profile).name
    return dict(VL_SIZES[name])
