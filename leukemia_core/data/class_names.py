"""Class-name synonyms: a labelled folder from another hospital names its classes its own
way ("Segmented neutrophils", "NRBC", "seg_neutrophil"); :func:`map_classes` maps them to
a model's classes. The one table of synonyms is :data:`SYNONYMS`.

Matching ignores case, surrounding and repeated whitespace, ``_`` and ``-`` (read as a
space) and a plural ``s`` on each word ("Band neutrophils" = "band neutrophil").
"""
from __future__ import annotations

import re

#: canonical class (as the book's models name it) -> other names for it, including the
#: PBC file-name prefixes (SNE, BNE, MY, MMY, PMY, ERB, ...) and Matek-19's codes.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "neutrophil": ("segmented neutrophil", "seg neutrophil", "neutrophil segmented", "band neutrophil",
                   "neutrophil band", "band", "segmented", "sne", "bne", "neu", "neut", "ngs", "ngb",
                   "polymorphonuclear neutrophil", "pmn"),
    "lymphocyte": ("lymph", "lym", "ly", "lyt", "typical lymphocyte", "small lymphocyte"),
    "monocyte": ("mono", "mon", "mo"),
    "eosinophil": ("eos", "eo", "eosinophile"),
    "basophil": ("baso", "bas", "ba", "basophile"),
    "ig": ("immature granulocyte", "immature granulocyte ig", "myelocyte", "metamyelocyte",
           "promyelocyte", "my", "mmy", "pmy", "myb", "mmz", "pmo", "pmb"),
    "erythroblast": ("nrbc", "nucleated red blood cell", "nucleated rbc", "normoblast", "erb", "ebo"),
    "platelet": ("thrombocyte", "plt", "platelet clump", "giant platelet", "giant thrombocyte"),
    "myeloblast": ("myo", "myeloblast aml", "aml myeloblast"),
}


def normalize_name(name: str) -> str:
    """Lower case, ``_``/``-`` as spaces, single spaces, a plural ``s`` dropped per word."""
    words = re.sub(r"[\s_\-]+", " ", str(name).strip().lower()).split()
    return " ".join(w[:-1] if len(w) > 2 and w.endswith("s") and not w.endswith("ss") else w
                    for w in words)


_CANONICAL = {normalize_name(alias): canon for canon, aliases in SYNONYMS.items()
              for alias in (canon, *aliases)}


def canonical_name(name: str) -> str | None:
    """The canonical class a name stands for (``None`` when the table does not know it)."""
    return _CANONICAL.get(normalize_name(name))


def map_classes(names, model_classes) -> dict[str, str | None]:
    """Each of ``names`` (e.g. a folder's class subfolders) -> the model class it is, or
    ``None`` when the model has no such class. A name equal to a model class (up to
    case, spacing and plural) maps to it directly; otherwise through :data:`SYNONYMS`."""
    by_norm = {normalize_name(c): c for c in model_classes}
    by_canon = {canonical_name(c) or normalize_name(c): c for c in model_classes}
    out = {}
    for name in names:
        key = normalize_name(name)
        out[name] = by_norm.get(key) or by_canon.get(canonical_name(name) or key)
    return out
