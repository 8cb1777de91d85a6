"""Hierarchical classification over a :class:`~leukemia_core.data.taxonomy.Taxonomy`.

Models emit the logits of every level they have a head for, concatenated in level
order. A sample's loss at level ``d`` counts only if its leaf reaches depth ``d``
(level target ``-1`` otherwise), and each level's loss has its own weight: a head
sees only the gradient of its own level's loss (the "loss control"), while the
shared backbone sees the weighted sum.

Decoders turn level logits into root-to-leaf paths:

- ``independent``: the argmax of each level on its own (paths may be invalid);
- ``top_down``: from the root, the best child of the node chosen one level up;
- ``path_probability``: the leaf maximising the product over its path of each
  level's softmax restricted to the siblings (children of the same parent).
Only nodes with data are decoded: a leaf without images cannot be learnt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from leukemia_core.models.multilevel import MultiLevelNet
from leukemia_core.engine.metrics import classification_metrics
from leukemia_core.engine.train import predict_logits
from leukemia_core.data.taxonomy import Taxonomy


class LevelCodec:
    """Level bookkeeping for one taxonomy: targets, logit slices, sibling groups, decoders."""

    def __init__(self, taxonomy: Taxonomy):
        self.tax = taxonomy
        self.leaves = taxonomy.data_leaves
        self.sizes = [len(level) for level in taxonomy.levels]
        #: (n_leaves, depth) level target of each data leaf, -1 below its depth
        self.targets = torch.tensor([taxonomy.level_targets(leaf) for leaf in self.leaves])
        # sibling groups per level: indices of nodes sharing a parent
        self.groups = []
        for level in taxonomy.levels:
            parents: dict[str, list[int]] = {}
            for i, n in enumerate(level):
                parents.setdefault(taxonomy[n].parent, []).append(i)
            self.groups.append(list(parents.values()))
        # path of each leaf as (level, index) pairs
        self.leaf_paths = [[(d, taxonomy.levels[d].index(n)) for d, n in enumerate(taxonomy.path(leaf))]
                           for leaf in self.leaves]

    def split(self, logits: torch.Tensor, levels: list[int] | None = None) -> dict[int, torch.Tensor]:
        levels = list(range(len(self.sizes))) if levels is None else levels
        parts = torch.split(logits, [self.sizes[d] for d in levels], dim=1)
        return dict(zip(levels, parts))

    def conditional_log_probs(self, level_logits: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each level's log-softmax within sibling groups: log p(node | parent)."""
        out = {}
        for d, z in level_logits.items():
            lp = torch.empty_like(z, dtype=torch.float32)
            for g in self.groups[d]:
                lp[:, g] = F.log_softmax(z[:, g].float(), dim=1)
            out[d] = lp
        return out

    def path_log_probs(self, level_logits: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, n_leaves) log-probability of each data leaf's whole path."""
        cond = self.conditional_log_probs(level_logits)
        return torch.stack([sum(cond[d][:, i] for d, i in path) for path in self.leaf_paths], dim=1)

    # ------------------------------------------------------------------ decoders -> node paths
    def decode(self, level_logits: dict[int, torch.Tensor], method: str = "path_probability") -> list[list[str]]:
        if method == "path_probability":
            leaf = self.path_log_probs(level_logits).argmax(1).tolist()
            return [self.tax.path(self.leaves[i]) for i in leaf]
        levels = self.tax.levels
        if method == "independent":
            picks = {d: z.argmax(1).tolist() for d, z in level_logits.items()}
            paths = []
            for b in range(len(next(iter(level_logits.values())))):
                path = []
                for d in range(len(levels)):
                    node = levels[d][picks[d][b]]
                    path.append(node)
                    if not self.tax[node].children:
                        break
                paths.append(path)
            return paths
        if method == "top_down":
            paths = []
            for b in range(len(next(iter(level_logits.values())))):
                node, path = self.tax.root, []
                for d in range(len(levels)):
                    children = [c for c in self.tax[node].children if self.tax.has_data(c)]
                    if not children:
                        break
                    scores = level_logits[d][b, [levels[d].index(c) for c in children]]
                    node = children[int(scores.argmax())]
                    path.append(node)
                paths.append(path)
            return paths
        raise ValueError(f"unknown decoder '{method}'; use path_probability, top_down or independent")


class HierarchicalTask:
    """:func:`~leukemia_core.engine.fit` task: masked per-level cross-entropy with level weights.

    ``levels``: the levels the model has heads for (all by default). Datasets yield
    leaf indices into ``codec.leaves``; the task maps them to level targets.
    ``pooled=True`` is the ablation *without* per-level loss control: one multi-label
    binary cross-entropy over every node of every level (target 1 on the leaf's path, 0
    elsewhere), averaged over all images and nodes, so the level structure enters only
    through the targets and a deep level's few images weigh what they happen to weigh.
    """

    def __init__(self, codec: LevelCodec, levels: list[int] | None = None,
                 level_weights: list[float] | None = None, pooled: bool = False):
        self.codec = codec
        self.pooled = pooled
        if pooled and (levels is not None or level_weights is not None):
            raise ValueError("the pooled loss covers every level with one mean: no levels or level_weights")
        self.levels = list(range(len(codec.sizes))) if levels is None else list(levels)
        self.weights = list(level_weights) if level_weights is not None else [1.0] * len(self.levels)
        if len(self.weights) != len(self.levels):
            raise ValueError(f"{len(self.weights)} level weights for {len(self.levels)} levels")
        self.full = self.levels == list(range(len(codec.sizes)))

    def level_losses(self, logits: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
        targets = self.codec.targets.to(y.device)[y]
        out = {}
        for d, z in self.codec.split(logits, self.levels).items():
            t = targets[:, d]
            valid = t >= 0
            out[d] = F.cross_entropy(z[valid].float(), t[valid]) if valid.any() else z.sum() * 0.0
        return out

    def node_targets(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, nodes)`` multi-hot targets: 1 on every node of the leaf's path."""
        targets = self.codec.targets.to(y.device)[y]
        parts = [F.one_hot(targets[:, d].clamp(min=0), k) * (targets[:, d:d + 1] >= 0)
                 for d, k in enumerate(self.codec.sizes)]
        return torch.cat(parts, dim=1).float()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.pooled:
            return F.binary_cross_entropy_with_logits(logits.float(), self.node_targets(y))
        losses = self.level_losses(logits, y)
        return sum(w * losses[d] for w, d in zip(self.weights, self.levels))

    def n_correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.full:
            return (self.codec.path_log_probs(self.codec.split(logits)).argmax(1) == y).sum()
        d = self.levels[0]
        t = self.codec.targets.to(y.device)[y, d]
        z = self.codec.split(logits, self.levels)[d]
        return ((z.argmax(1) == t) & (t >= 0)).sum()

    def evaluate(self, model, loader, classes, device, amp) -> dict:
        logits, y = predict_logits(model, loader, device, amp)
        loss = float(self.loss(logits, y))
        if self.full:
            out = classification_metrics(self.codec.path_log_probs(self.codec.split(logits)), y,
                                         self.codec.leaves)
        else:
            d = self.levels[0]
            t = self.codec.targets[y, d]
            z = self.codec.split(logits, self.levels)[d]
            out = classification_metrics(z[t >= 0], t[t >= 0], self.codec.tax.levels[d])
        return out | {"loss": loss}


# ---------------------------------------------------------------------- metrics
def is_valid_path(tax: Taxonomy, path: list[str]) -> bool:
    """A root-to-leaf path: each node a child of the one before, ending in a leaf."""
    parent = tax.root
    for node in path:
        if node not in tax.nodes or tax[node].parent != parent:
            return False
        parent = node
    return bool(path) and not tax[path[-1]].children


@dataclass
class HierarchicalScores:
    level_accuracy: list[float]
    leaf_accuracy: float
    leaf_macro_f1: float
    hierarchical_precision: float
    hierarchical_recall: float
    hierarchical_f1: float
    path_consistency: float
    mistake_severity: float  # mean tree distance between true and predicted leaf, over errors
    n: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def hierarchical_metrics(tax: Taxonomy, true_leaves: list[str], pred_paths: list[list[str]]) -> HierarchicalScores:
    """Per-level and leaf scores, hierarchical P/R/F1 (ancestor sets, Kiritchenko et al.),
    path consistency and mistake severity. An invalid predicted path counts as wrong
    at the leaf, and its severity uses its last node."""
    leaves = tax.data_leaves
    true_paths = [tax.path(t) for t in true_leaves]
    level_acc = []
    for d in range(tax.depth):
        hits = [len(p) > d and p[d] == t[d] for t, p in zip(true_paths, pred_paths) if len(t) > d]
        level_acc.append(float(np.mean(hits)) if hits else float("nan"))
    valid = [is_valid_path(tax, p) for p in pred_paths]
    pred_leaf = [p[-1] if v else None for p, v in zip(pred_paths, valid)]
    correct = [pl == t for pl, t in zip(pred_leaf, true_leaves)]
    inter = sum(len(set(t) & set(p)) for t, p in zip(true_paths, pred_paths))
    hp = inter / max(1, sum(len(set(p)) for p in pred_paths))
    hr = inter / max(1, sum(len(set(t)) for t in true_paths))
    errors = [tax.distance(t, p[-1]) for t, p, c in zip(true_leaves, pred_paths, correct) if not c and p]
    idx = {leaf: i for i, leaf in enumerate(leaves)}
    y = torch.tensor([idx[t] for t in true_leaves])
    # an invalid path gets a class index no true sample has (counted wrong, not dropped)
    yhat = torch.tensor([idx.get(pl, len(leaves)) if pl is not None else len(leaves) for pl in pred_leaf])
    f1 = classification_metrics(yhat, y, leaves + ["<invalid>"])["per_class"]
    return HierarchicalScores(
        level_accuracy=level_acc, leaf_accuracy=float(np.mean(correct)),
        leaf_macro_f1=float(np.mean([f1[c]["f1"] for c in leaves])),
        hierarchical_precision=hp, hierarchical_recall=hr,
        hierarchical_f1=2 * hp * hr / (hp + hr) if hp + hr else 0.0,
        path_consistency=float(np.mean(valid)),
        mistake_severity=float(np.mean(errors)) if errors else 0.0, n=len(true_leaves))


# ---------------------------------------------------------------------- training
@dataclass
class LevelData:
    """Preloaded train/val/test datasets whose targets are leaf indices of ``codec.leaves``."""

    codec: LevelCodec
    datasets: dict  # split -> ImageTableDataset
    tables: dict  # split -> record table (same order)

    def subset(self, split: str, level: int):
        """The samples of ``split`` whose leaf reaches ``level`` (a level model's data)."""
        ds = self.datasets[split]
        keep = [i for i, t in enumerate(ds.targets) if self.codec.targets[t, level] >= 0]
        return torch.utils.data.Subset(ds, keep) if len(keep) < len(ds) else ds


def backbone_kwargs(backbone: str, image_size: int) -> dict:
    """timm sizes for small inputs (see :func:`leukemia_core.models.size_kwargs`)."""
    from leukemia_core.models import size_kwargs
    return size_kwargs(backbone, image_size)


def build_hierarchical_model(kind: str, backbone: str, codec: LevelCodec, image_size: int,
                             level: int | None = None, pretrained: bool = False) -> tuple[nn.Module, object]:
    """``(model, task)`` for ``kind`` in ``flat`` (one softmax over the data leaves),
    ``multilevel`` (shared backbone, one head per level), ``pooled`` (the multi-level
    network trained without per-level loss control, see :class:`HierarchicalTask`) or
    ``level`` (one model for one level, the building block of the base hierarchical model)."""
    from leukemia_core.engine.train import ClassificationTask
    from leukemia_core.models import create_model

    kw = backbone_kwargs(backbone, image_size)
    if kind == "pooled":  # the ablation without per-level loss control
        return MultiLevelNet(backbone, codec.sizes, pretrained=pretrained, **kw), HierarchicalTask(codec, pooled=True)
    if kind == "flat":
        return create_model(backbone, len(codec.leaves), pretrained=pretrained, **kw), ClassificationTask()
    if kind == "multilevel":
        return MultiLevelNet(backbone, codec.sizes, pretrained=pretrained, **kw), HierarchicalTask(codec)
    if kind == "level":
        return (MultiLevelNet(backbone, codec.sizes, levels=[level], pretrained=pretrained, **kw),
                HierarchicalTask(codec, levels=[level]))
    raise ValueError(f"unknown model kind '{kind}'; use flat, multilevel, pooled or level")


def leaf_paths(kind: str, logits: torch.Tensor, codec: LevelCodec, decoder: str = "path_probability"):
    """Predicted node paths from a model's raw output (flat: the argmax leaf's path)."""
    if kind == "flat":
        return [codec.tax.path(codec.leaves[i]) for i in logits.argmax(1).tolist()]
    return codec.decode(codec.split(logits), decoder)


@dataclass
class HierarchicalRun:
    kind: str
    backbone: str
    model: nn.Module
    history: list
    test_logits: torch.Tensor  # raw outputs on the test split (level logits concatenated)
    train_time_s: float


def train_hierarchical(kind: str, backbone: str, data: LevelData, profile, config,
                       level: int | None = None, pretrained: bool = False, out_dir=None,
                       meta: dict | None = None, resume: bool = False,
                       provenance: dict | None = None) -> HierarchicalRun:
    """Fit one model of ``kind`` (see :func:`build_hierarchical_model`) with the shared
    engine; a ``level`` model trains and validates on the samples reaching its level.

    The checkpoint is of kind ``hierarchical`` (:func:`load_hierarchical` rebuilds it);
    ``meta`` adds to its metadata (e.g. the ``preprocess`` of the images). With ``out_dir``
    and ``provenance`` (``split_sha256``, ``data_sha256``, ``datasets``), the run also
    writes ``out_dir/results.json``: history, hardware, hashes and times, what a reference
    checkpoint's model card is made from."""
    import dataclasses
    import time
    from pathlib import Path

    from leukemia_core.engine.train import fit
    from leukemia_core.pipeline import make_loader

    torch.manual_seed(config.seed)
    model, task = build_hierarchical_model(kind, backbone, data.codec, profile.image_size, level, pretrained)
    if kind == "level":
        train, val = data.subset("train", level), data.subset("val", level)
    else:
        train, val = data.datasets["train"], data.datasets["val"]
    t0 = time.perf_counter()
    result = fit(model, make_loader(train, profile, True), make_loader(val, profile, False),
                 data.codec.leaves, config, out_dir=out_dir, resume=resume, task=task,
                 meta={"kind": "hierarchical", "model_kind": kind, "backbone": backbone, "level": level,
                       "pretrained": pretrained, "taxonomy": data.codec.tax.name,
                       "image_size": profile.image_size, "profile": profile.name, **(meta or {})})
    elapsed = time.perf_counter() - t0
    logits, _ = predict_logits(model, make_loader(data.datasets["test"], profile, False))
    if out_dir is not None and provenance is not None:
        from leukemia_core.reproducibility.results import session_wall_time, write_results

        results_path = Path(out_dir) / "results.json"
        write_results(results_path, overwrite=True, kind="hierarchical_training",
                      model=backbone, method=kind, profile=profile.name, seeds=[config.seed],
                      config={"model_kind": kind, "backbone": backbone, "level": level, "pretrained": pretrained,
                              "taxonomy": data.codec.tax.name, "image_size": profile.image_size,
                              "fit": dataclasses.asdict(config), **(meta or {})},
                      metrics={"best_epoch": result.best_epoch, "best_val_score": result.best_score,
                               "monitor": config.monitor},
                      history=result.history, wall_time_s=session_wall_time(results_path, result.history, elapsed),
                      train_time_s=float(sum(h.get("train_time_s", 0.0) for h in result.history)),
                      **provenance)
    return HierarchicalRun(kind, backbone, model, result.history, logits, elapsed)


def load_hierarchical(path) -> tuple[nn.Module, dict]:
    """Rebuild a ``hierarchical`` checkpoint written by :func:`train_hierarchical`:
    ``(model in eval mode, meta)``; ``meta["codec"]`` is the :class:`LevelCodec` of its
    taxonomy (checked against the checkpoint's leaves)."""
    from leukemia_core.engine.checkpoint import checkpoint_file, load_weights, read_meta
    from leukemia_core.errors import CheckpointError

    path = checkpoint_file(path)
    meta = read_meta(path)
    missing = {"model_kind", "backbone", "taxonomy", "image_size", "classes"} - set(meta)
    if missing:
        raise CheckpointError(f"hierarchical checkpoint {path} lacks metadata {sorted(missing)}; "
                              "retrain it with leukemia-core (train_hierarchical)")
    codec = LevelCodec(Taxonomy.from_yaml(meta["taxonomy"]))
    if list(codec.leaves) != list(meta["classes"]):
        raise CheckpointError(f"{path} was trained on the leaves {meta['classes']}, but taxonomy "
                              f"'{meta['taxonomy']}' now has {codec.leaves}: load it with the taxonomy it was "
                              "trained on (its YAML at that commit), or retrain it")
    model, _ = build_hierarchical_model(meta["model_kind"], meta["backbone"], codec, meta["image_size"],
                                        meta.get("level"), pretrained=False)
    load_weights(path, model)
    return model.eval(), {**meta, "codec": codec}


def compose_levels(runs: list[HierarchicalRun]) -> torch.Tensor:
    """The base hierarchical model's output: per-level models' logits in level order."""
    return torch.cat([r.test_logits for r in sorted(runs, key=lambda r: r.model.levels[0])], dim=1)
