"""Texts of the vision-language chapter: class descriptions and per-image attribute sentences.

Two YAML files under ``leukemia_core/texts/`` hold every word the model is trained or
prompted with: ``class_descriptions.yaml`` (several paraphrases per class, written from
standard haematology morphology, and held-out prompts) and ``wbcatt_phrases.yaml`` (one
clause per value of each of the 11 WBCAtt attributes, sentence templates). Nothing here
looks at images.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

from leukemia_core.data.wbcatt import ATTRIBUTES
from leukemia_core.errors import DatasetError, UnknownNameError

TEXTS_DIR = Path(__file__).resolve().parent.parent / "texts"
CLASS_FILE = TEXTS_DIR / "class_descriptions.yaml"
PHRASE_FILE = TEXTS_DIR / "wbcatt_phrases.yaml"


@dataclass(frozen=True)
class TextClass:
    name: str
    nodes: tuple[str, ...]  # taxonomy nodes this description covers
    sentences: tuple[str, ...]  # training paraphrases
    heldout: tuple[str, ...]  # prompts never seen in training
    attributes: dict | None = None  # textbook WBCAtt profile (normal leukocytes)
    note: str = ""


@lru_cache(maxsize=None)
def _read(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def class_texts(path: Path = CLASS_FILE) -> dict[str, TextClass]:
    """Text classes by name, in file order."""
    spec = _read(Path(path))
    out = {}
    for name, c in spec["classes"].items():
        if len(c.get("sentences") or []) < 5:
            raise DatasetError(f"{path}: class '{name}' needs at least 5 training sentences")
        attrs = c.get("attributes")
        if attrs is not None:
            validate_attributes(attrs, where=f"{path}: class '{name}'")
        out[name] = TextClass(name, tuple(c.get("nodes") or [name]), tuple(c["sentences"]),
                              tuple(c.get("heldout") or []), attrs, c.get("note", ""))
    return out


def node_to_text_class(classes: dict[str, TextClass] | None = None) -> dict[str, str]:
    """Taxonomy node -> text class (e.g. ``pro_b`` -> ``ALL``)."""
    classes = classes or class_texts()
    out = {}
    for c in classes.values():
        for node in c.nodes:
            if node in out:
                raise DatasetError(f"taxonomy node '{node}' is described by two text classes: "
                                   f"'{out[node]}' and '{c.name}'")
            out[node] = c.name
    return out


# --------------------------------------------------------------------------- attribute sentences
def phrase_spec(path: Path = PHRASE_FILE) -> dict:
    spec = _read(Path(path))
    missing = sorted(set(ATTRIBUTES) - set(spec["phrases"]))
    if missing:
        raise DatasetError(f"{path}: no phrases for attributes {missing}")
    for t in spec["templates"] + spec["heldout_templates"]:
        order = spec["orders"][t["order"]]
        if sorted(order) != sorted(ATTRIBUTES):
            raise DatasetError(f"{path}: order '{t['order']}' must list each of the 11 attributes once")
    return spec


def attribute_values(path: Path = PHRASE_FILE) -> dict[str, list[str]]:
    """Attribute -> its values (as WBCAtt spells them)."""
    return {a: list(phrase_spec(path)["phrases"][a]) for a in ATTRIBUTES}


def validate_attributes(attrs: dict, where: str = "attributes") -> None:
    values = attribute_values()
    if set(attrs) != set(ATTRIBUTES):
        missing, extra = sorted(set(ATTRIBUTES) - set(attrs)), sorted(set(attrs) - set(ATTRIBUTES))
        raise DatasetError(f"{where}: needs exactly the 11 WBCAtt attributes, missing {missing}, extra {extra}")
    for a, v in attrs.items():
        if str(v) not in values[a]:
            raise UnknownNameError(f"{where}: '{v}' is not a value of {a}; values: {values[a]}")


def templates(heldout: bool = False) -> list[dict]:
    spec = phrase_spec()
    return spec["heldout_templates" if heldout else "templates"]


def attribute_sentence(attrs, template: int | dict = 0) -> str:
    """One sentence naming all 11 attributes of a cell (a dict / row with the WBCAtt columns).

    ``template`` is an index into the training templates or a template dict
    (e.g. ``templates(heldout=True)[0]``).
    """
    spec = phrase_spec()
    t = spec["templates"][template] if isinstance(template, int) else template
    clauses = []
    for a in spec["orders"][t["order"]]:
        variants = spec["phrases"][a].get(str(attrs[a]))
        if variants is None:
            raise UnknownNameError(f"'{attrs[a]}' is not a value of {a}; values: {list(spec['phrases'][a])}")
        clauses.append(variants[t["variant"] % len(variants)])
    body = t["sep"].join(clauses[:-1]) + t["last"] + clauses[-1]
    text = t["opening"] + body + "."
    return text[0].upper() + text[1:]


def value_sentences(attribute: str, framing: str = "readout") -> dict[str, list[str]]:
    """Sentences naming one value of one attribute alone: value -> one sentence per clause
    variant. ``framing="readout"`` (evaluation, never trained on) or ``"clause"`` (training)."""
    spec = phrase_spec()
    if attribute not in spec["phrases"]:
        raise UnknownNameError(f"unknown attribute '{attribute}'; attributes: {ATTRIBUTES}")
    return {v: [spec[framing].format(clause=c) for c in variants]
            for v, variants in spec["phrases"][attribute].items()}


def attribute_key(row) -> str:
    """Identity of a cell's attribute tuple (two cells with equal keys get equal sentences)."""
    return "|".join(str(row[a]) for a in ATTRIBUTES)


def attribute_keys(table: pd.DataFrame) -> pd.Series:
    """:func:`attribute_key` per row; empty string where a row has no WBCAtt attributes."""
    if not set(ATTRIBUTES) <= set(table.columns):
        return pd.Series("", index=table.index)
    has = table[ATTRIBUTES].notna().all(axis=1).to_numpy()
    rows = table[ATTRIBUTES].to_numpy(dtype=object)
    return pd.Series(["|".join(map(str, r)) if h else "" for r, h in zip(rows, has)],
                     index=table.index, dtype=object)


def key_to_attributes(key: str) -> dict[str, str]:
    return dict(zip(ATTRIBUTES, key.split("|")))


def class_prompts(classes: list[str], which: str = "heldout") -> dict[str, list[str]]:
    """Zero-shot prompts per text class: ``"heldout"`` (never trained on), ``"sentences"``
    (the training paraphrases) or ``"attributes"`` (the textbook WBCAtt profile written out
    by :func:`attribute_sentence` in every template, training and held-out)."""
    texts = class_texts()
    unknown = sorted(set(classes) - set(texts))
    if unknown:
        raise UnknownNameError(f"no descriptions for {unknown}; text classes: {sorted(texts)}")
    if which == "attributes":
        missing = [c for c in classes if texts[c].attributes is None]
        if missing:
            raise UnknownNameError(f"no textbook attribute profile for {missing}")
        tmpl = list(range(len(templates()))) + templates(heldout=True)
        return {c: [attribute_sentence(texts[c].attributes, t) for t in tmpl] for c in classes}
    if which not in ("heldout", "sentences"):
        raise UnknownNameError(f"prompt set '{which}': choose heldout, sentences or attributes")
    return {c: list(getattr(texts[c], which)) for c in classes}
