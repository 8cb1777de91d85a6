"""A class taxonomy read from YAML: tree queries, per-level targets and a record table.

The tree is data (``leukemia_core/data/taxonomies/*.yaml``); nothing here knows about
leukemia. Levels are depths: level ``d`` holds the nodes ``d`` steps below the root.
A sample labelled with leaf ``l`` has a target at every level down to ``depth(l)``
and none below, so trees with leaves at different depths work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from leukemia_core.errors import DatasetError, UnknownNameError

TAXONOMY_DIR = Path(__file__).resolve().parent / "taxonomies"


@dataclass
class Node:
    name: str
    parent: str | None
    depth: int
    children: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "dataset:label" (leaves only)
    description: str = ""
    note: str = ""


class Taxonomy:
    """An immutable class tree. ``has_data(n)``: some leaf under ``n`` has image sources."""

    def __init__(self, root: dict, name: str = "taxonomy"):
        self.name = name
        self.nodes: dict[str, Node] = {}
        self._add(root, None, 0, "root")
        self.root = root["name"]

    def _add(self, spec: dict, parent: str | None, depth: int, where: str) -> None:
        if not isinstance(spec, dict) or "name" not in spec:
            raise DatasetError(f"taxonomy '{self.name}': node at {where} needs a 'name' key, got {spec!r}")
        name = str(spec["name"])
        if name in self.nodes:
            raise DatasetError(f"taxonomy '{self.name}': node name '{name}' occurs twice; names must be unique")
        children = spec.get("children") or []
        sources = [str(s) for s in spec.get("sources") or []]
        if children and sources:
            raise DatasetError(f"taxonomy '{self.name}': node '{name}' has children and sources; "
                               "only leaves carry sources")
        bad = [s for s in sources if s.count(":") != 1]
        if bad:
            raise DatasetError(f"taxonomy '{self.name}': sources of '{name}' must be 'dataset:label', got {bad}")
        self.nodes[name] = Node(name, parent, depth, [str(c.get("name")) for c in children if isinstance(c, dict)],
                                sources, spec.get("description", ""), spec.get("note", ""))
        for i, child in enumerate(children):
            self._add(child, name, depth + 1, f"{name}.children[{i}]")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path_or_name: str | Path) -> "Taxonomy":
        """Read a tree: a YAML path, or the name of a bundled one (``"leukemia"``)."""
        path = Path(path_or_name)
        if not path.suffix:
            path = TAXONOMY_DIR / f"{path_or_name}.yaml"
        if not path.exists():
            bundled = sorted(p.stem for p in TAXONOMY_DIR.glob("*.yaml"))
            raise UnknownNameError(f"taxonomy file {path} not found; bundled taxonomies: {bundled}")
        spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict) or "root" not in spec:
            raise DatasetError(f"{path}: a taxonomy file needs a top-level 'root' node")
        return cls(spec["root"], spec.get("name", path.stem))

    # ------------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> Node:
        if name not in self.nodes:
            raise UnknownNameError(f"'{name}' is not a node of taxonomy '{self.name}'; "
                                   f"nodes: {sorted(self.nodes)}")
        return self.nodes[name]

    @cached_property
    def leaves(self) -> list[str]:
        return [n for n, node in self.nodes.items() if not node.children]

    def has_data(self, name: str) -> bool:
        node = self[name]
        return bool(node.sources) if not node.children else any(self.has_data(c) for c in node.children)

    @cached_property
    def data_leaves(self) -> list[str]:
        """Leaves with image sources, in tree order: the flat classifier's classes."""
        return [n for n in self.leaves if self.nodes[n].sources]

    def path(self, name: str) -> list[str]:
        """Nodes from depth 1 down to ``name`` (the root excluded)."""
        out = []
        while self[name].parent is not None:
            out.append(name)
            name = self.nodes[name].parent
        return out[::-1]

    @cached_property
    def depth(self) -> int:
        return max(node.depth for node in self.nodes.values())

    @cached_property
    def levels(self) -> list[list[str]]:
        """``levels[d-1]``: the nodes with data at depth ``d`` (the classes of head ``d``)."""
        return [[n for n, node in self.nodes.items() if node.depth == d and self.has_data(n)]
                for d in range(1, self.depth + 1)]

    def distance(self, a: str, b: str) -> int:
        """Edges between two nodes through their lowest common ancestor."""
        pa, pb = [self.root] + self.path(a), [self.root] + self.path(b)
        common = sum(1 for x, y in zip(pa, pb) if x == y)
        return (len(pa) - common) + (len(pb) - common)

    def level_targets(self, leaf: str) -> list[int]:
        """Class index of ``leaf``'s ancestor at each level, ``-1`` below its depth."""
        path = self.path(leaf)
        return [self.levels[d].index(path[d]) if d < len(path) else -1 for d in range(self.depth)]

    def source_map(self) -> dict[tuple[str, str], str]:
        """``(dataset, label) -> leaf``; a source claimed by two leaves is an error."""
        out: dict[tuple[str, str], str] = {}
        for leaf in self.data_leaves:
            for src in self.nodes[leaf].sources:
                key = tuple(src.split(":"))
                if key in out:
                    raise DatasetError(f"taxonomy '{self.name}': source '{src}' is claimed by "
                                       f"'{out[key]}' and '{leaf}'")
                out[key] = leaf
        return out

    def edges(self) -> list[tuple[str, str]]:
        return [(n.parent, n.name) for n in self.nodes.values() if n.parent is not None]


def load_taxonomy_table(taxonomy: Taxonomy, root=None) -> pd.DataFrame:
    """Records of every data leaf's sources with their committed splits.

    Columns: the record columns plus ``split``, ``source_label`` (the dataset's own
    label) and ``label`` (the leaf). ``attrs['split_sha256']`` joins the split files' hashes.
    """
    from leukemia_core.data import load_dataset
    from leukemia_core.data.splits import apply_split

    wanted: dict[str, dict[str, str]] = {}
    for (dataset, label), leaf in taxonomy.source_map().items():
        wanted.setdefault(dataset, {})[label] = leaf
    parts, hashes = [], []
    for dataset, labels in wanted.items():
        table = apply_split(load_dataset(dataset, root))
        missing = sorted(set(labels) - set(table["label"].dropna()))
        if missing:
            raise DatasetError(f"taxonomy '{taxonomy.name}': dataset '{dataset}' has no label(s) "
                               f"{missing}; its labels are {sorted(table['label'].dropna().unique())}")
        hashes.append(f"{dataset}:{table.attrs.get('split_sha256')}")
        table = table[table["label"].isin(labels)].copy()
        table["source_label"] = table["label"]
        table["label"] = table["label"].map(labels)
        parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    dup = out[out.duplicated("sha256", keep=False)]
    clash = dup.groupby("sha256")["split"].nunique()
    if (clash > 1).any():
        raise DatasetError(f"taxonomy '{taxonomy.name}': {int((clash > 1).sum())} identical images "
                           "sit in different splits of different datasets; deduplicate first")
    out.attrs["split_sha256"] = ";".join(sorted(hashes))
    out.attrs["taxonomy"] = taxonomy.name
    return out
