"""Records for the vision-language chapter: taxonomy leaves, text classes, WBCAtt
attributes, task groups, and the sentences each training image may be paired with.

One table (:func:`load_vl_table`) joins the leaves of ``taxonomies/leukemia.yaml``
(PBC, Matek, Aria with their committed splits) with the WBCAtt attributes of the PBC
cells (WBCAtt shares PBC's split). Subsampling is per *source* (dataset and its own
label), so Matek neutrophils are not swamped by PBC's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from leukemia_core.config import Profile
from leukemia_core.data import ATTRIBUTES, load_dataset
from leukemia_core.data.prepare import PreparedData, prepare_records
from leukemia_core.models.pretrained import pretrained_norm
from leukemia_core.data.taxonomy import Taxonomy, load_taxonomy_table
from leukemia_core.vl.texts import (TextClass, attribute_keys, attribute_sentence, attribute_values, class_texts,
                    node_to_text_class, templates, value_sentences)

#: The leukemia task's four groups: the first node of a leaf's taxonomy path found here.
TASK_GROUPS = {"normal": "normal", "reactive": "benign", "AML": "AML", "ALL": "ALL"}
GROUPS = ["normal", "benign", "AML", "ALL"]


def task_group(taxonomy: Taxonomy, leaf: str) -> str | None:
    """normal / benign / AML / ALL for a leaf, from its path (None outside the task)."""
    for node in taxonomy.path(leaf):
        if node in TASK_GROUPS:
            return TASK_GROUPS[node]
    return None


def text_class_groups(taxonomy: str | Taxonomy = "leukemia") -> dict[str, str]:
    """Text class -> task group via its first taxonomy node; ``"other"`` outside the task
    (CML, CLL: chronic leukemias without images)."""
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy.from_yaml(taxonomy)
    return {name: task_group(tax, c.nodes[0]) or "other" for name, c in class_texts().items()}


def load_vl_table(root=None, taxonomy: str | Taxonomy = "leukemia") -> pd.DataFrame:
    """Every image of the taxonomy's data leaves with its committed split, plus columns
    ``leaf``, ``source`` (``dataset:label``), ``text_class``, ``group``, the 11 WBCAtt
    attributes (PBC cells only, NaN elsewhere) and ``attr_key`` (empty without attributes)."""
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy.from_yaml(taxonomy)
    table = load_taxonomy_table(tax, root)
    attrs = table.attrs
    wbcatt = load_dataset("wbcatt", root, hashes=False)[["relpath", *ATTRIBUTES]].assign(dataset="pbc")
    table = table.merge(wbcatt, on=["dataset", "relpath"], how="left", validate="many_to_one")
    to_text = node_to_text_class()
    table["leaf"] = table["label"]
    table["source"] = table["dataset"] + ":" + table["source_label"]
    table["text_class"] = table["leaf"].map(to_text)
    table["group"] = table["leaf"].map(lambda leaf: task_group(tax, leaf))
    table["attr_key"] = attribute_keys(table)
    table.attrs.update(attrs, taxonomy=tax.name)
    return table


def prepare_vl(table: pd.DataFrame, profile: Profile, train_cap: int | None, eval_cap: int | None = None,
               seed: int = 0, image_model: str = "efficientnet_lite0", pretrained: bool = True) -> PreparedData:
    """:func:`leukemia_core.data.prepare.prepare_records` with one class per *source*: at most
    ``train_cap`` training and ``eval_cap`` val/test images per source; normalisation of
    the pretrained weights. ``data.classes`` are sources; the other columns ride along."""
    t = table.assign(label=table["source"])
    return prepare_records(t, profile.replace(max_train_per_class=train_cap, max_eval_per_class=eval_cap),
                           seed=seed, norm=pretrained_norm(image_model, pretrained), name="vision-language table")


class IndexedDataset(torch.utils.data.Dataset):
    """(image, row index) pairs of a split's dataset: the row locates the image's texts."""

    def __init__(self, base):
        self.base = base
        self.cache = getattr(base, "cache", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], i


class LabelledView(torch.utils.data.Dataset):
    """Items ``indices`` of a dataset with new integer labels (e.g. a supervised baseline on
    the PBC rows of the vision-language training set, without decoding the images again)."""

    def __init__(self, base, indices, labels):
        self.base, self.indices, self.targets = base, list(indices), [int(y) for y in labels]
        if len(self.indices) != len(self.targets):
            raise ValueError("one label per index")
        self.cache = getattr(base, "cache", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]][0], self.targets[i]


def eval_view(ds, data: PreparedData, image_size: int):
    """The same (possibly preloaded) images of ``ds`` with the evaluation transform of
    ``data`` (no augmentation), sharing the decoded cache."""
    import copy

    from leukemia_core.data.transforms import build_transform

    view = copy.copy(ds)
    clahe = None if ds.cache is not None else data.clahe  # a cache already holds CLAHE'd images
    view.transform = build_transform(image_size, False, data.mean, data.std, clahe)
    return view


@dataclass
class TextBank:
    """The sentences training images are paired with, and their cached tower features.

    ``row_class[i]``: text-class index of training row ``i``; ``row_key[i]``: index of its
    attribute tuple (``-1``: no attributes). ``class_sentences[j]`` belongs to class
    ``sentence_class[j]``; ``attr_sentences[k][t]`` is tuple ``k`` in training template ``t``.
    ``row_values[i, a]``: index of the value of attribute ``a`` (WBCAtt order) of row ``i``
    (``-1``: none); ``clause_sentences[c]`` names value ``clause_value[c]`` of attribute
    ``clause_attribute[c]`` alone (the training framing of :func:`value_sentences`).
    """

    classes: list[str]
    class_sentences: list[str]
    sentence_class: torch.Tensor
    keys: list[str]
    attr_sentences: list[list[str]]
    row_class: torch.Tensor
    row_key: torch.Tensor
    row_values: torch.Tensor | None = None
    clause_sentences: list[str] = field(default_factory=list)
    clause_attribute: torch.Tensor | None = None
    clause_value: torch.Tensor | None = None
    class_feats: torch.Tensor | None = None
    attr_feats: torch.Tensor | None = None  # [n_keys, n_templates, 384]
    clause_feats: torch.Tensor | None = None
    sentences_per_class: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(cls, train: pd.DataFrame, text_classes: dict[str, TextClass] | None = None) -> "TextBank":
        """From the training rows: only the text classes and attribute tuples that occur there."""
        text_classes = text_classes or class_texts()
        names = [c for c in text_classes if c in set(train["text_class"])]
        sentences, owner = [], []
        for k, name in enumerate(names):
            sentences += list(text_classes[name].sentences)
            owner += [k] * len(text_classes[name].sentences)
        keyed = train.loc[train["attr_key"] != "", ["attr_key", *ATTRIBUTES]].drop_duplicates("attr_key")
        keys = keyed["attr_key"].tolist()
        n_t = len(templates())
        attr_sentences = [[attribute_sentence(row, t) for t in range(n_t)]
                          for row in keyed[ATTRIBUTES].to_dict("records")]
        key_index = {k: i for i, k in enumerate(keys)}
        bank = cls(names, sentences, torch.tensor(owner), keys, attr_sentences,
                   torch.tensor([names.index(c) for c in train["text_class"]]),
                   torch.tensor([key_index.get(k, -1) for k in train["attr_key"]]))
        bank.sentences_per_class = [torch.nonzero(bank.sentence_class == k).flatten() for k in range(len(names))]
        values = attribute_values()
        codes = np.full((len(train), len(ATTRIBUTES)), -1, dtype=np.int64)
        has = (train["attr_key"] != "").to_numpy()
        for a, attr in enumerate(ATTRIBUTES):
            codes[has, a] = [values[attr].index(str(v)) for v in train.loc[has, attr]]
        bank.row_values = torch.from_numpy(codes)
        clause, c_attr, c_val = [], [], []
        for a, attr in enumerate(ATTRIBUTES):
            for v, sents in value_sentences(attr, framing="clause").items():
                clause += sents
                c_attr += [a] * len(sents)
                c_val += [values[attr].index(v)] * len(sents)
        bank.clause_sentences = clause
        bank.clause_attribute, bank.clause_value = torch.tensor(c_attr), torch.tensor(c_val)
        return bank

    def cache_features(self, text_tower) -> "TextBank":
        """Tower features of every sentence (frozen tower: computed once)."""
        self.class_feats = text_tower.encode(self.class_sentences)
        flat = [s for row in self.attr_sentences for s in row]
        n_t = len(self.attr_sentences[0]) if self.attr_sentences else 0
        feats = text_tower.encode(flat)
        self.attr_feats = feats.reshape(len(self.attr_sentences), n_t, -1) if flat else None
        self.clause_feats = text_tower.encode(self.clause_sentences)
        return self

    def sample_class_sentences(self, class_idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random training paraphrase (sentence index) per entry of ``class_idx``."""
        out = torch.empty_like(class_idx)
        for k in class_idx.unique().tolist():
            where = class_idx == k
            pool = self.sentences_per_class[k]
            out[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=gen)]
        return out

    def sample_templates(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.attr_sentences[0]), (n,), generator=gen)

    def sample_value_sentences(self, gen: torch.Generator) -> torch.Tensor:
        """One random clause variant per (attribute, value), in the order of
        ``value_attribute`` / ``value_index``: sentence ids [n_values]."""
        out = []
        for a, v in zip(self.value_attribute.tolist(), self.value_index.tolist()):
            pool = torch.nonzero((self.clause_attribute == a) & (self.clause_value == v)).flatten()
            out.append(pool[torch.randint(len(pool), (1,), generator=gen)])
        return torch.cat(out)

    @property
    def value_attribute(self) -> torch.Tensor:
        """Attribute index of each (attribute, value) slot."""
        return self._slots()[0]

    @property
    def value_index(self) -> torch.Tensor:
        return self._slots()[1]

    def _slots(self):
        pairs = sorted(set(zip(self.clause_attribute.tolist(), self.clause_value.tolist())))
        return torch.tensor([a for a, _ in pairs]), torch.tensor([v for _, v in pairs])

    def summary(self) -> dict:
        return {"text_classes": self.classes, "class_sentences": len(self.class_sentences),
                "attribute_tuples": len(self.keys),
                "attribute_sentences": sum(len(r) for r in self.attr_sentences),
                "clause_sentences": len(self.clause_sentences),
                "rows_with_attributes": int((self.row_key >= 0).sum())}


def class_balanced_weights(row_class: torch.Tensor) -> torch.Tensor:
    """Sampling weight per row, 1 / (rows of its text class): every class equally often
    per epoch in expectation (the book's stand-in for the paper's GAN balancing)."""
    counts = torch.bincount(row_class).float()
    return (1.0 / counts)[row_class]


def heldout_split(table: pd.DataFrame, heldout: str) -> pd.DataFrame:
    """Training rows with the ``heldout`` text class removed: its images, and with them its
    class sentences and the attribute sentences of its cells (a TextBank built from the
    result contains no sentence written for a held-out image)."""
    return table[table["text_class"] != heldout].reset_index(drop=True)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
