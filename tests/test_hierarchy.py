"""Taxonomy and hierarchical classification: a toy tree exercises every rule; the
bundled leukemia tree is checked against the mirror."""
from __future__ import annotations

import pytest
import torch

from leukemia_core.errors import DatasetError, UnknownNameError
from leukemia_core.hierarchy import (HierarchicalTask, LevelCodec, MultiLevelNet, hierarchical_metrics,
                                     is_valid_path)
from leukemia_core.data.taxonomy import Taxonomy, load_taxonomy_table

# root ─ A ─ a1, a2          a1, a2 at depth 2
#      ├ B (leaf)            B at depth 1: no target below level 0
#      └ C ─ c1 ─ x, y       x, y at depth 3
#            └ c2 (no data)  stays in the tree, never decoded
TOY = {"name": "root", "children": [
    {"name": "A", "children": [{"name": "a1", "sources": ["toy:a1"]}, {"name": "a2", "sources": ["toy:a2"]}]},
    {"name": "B", "sources": ["toy:b"]},
    {"name": "C", "children": [
        {"name": "c1", "children": [{"name": "x", "sources": ["toy:x"]}, {"name": "y", "sources": ["toy:y"]}]},
        {"name": "c2", "note": "no data"}]},
]}


@pytest.fixture
def toy():
    return Taxonomy(TOY, "toy")


def test_toy_tree_levels_targets_and_distances(toy):
    assert toy.leaves == ["a1", "a2", "B", "x", "y", "c2"]
    assert toy.data_leaves == ["a1", "a2", "B", "x", "y"]
    assert not toy.has_data("c2") and toy.has_data("C")
    assert toy.levels == [["A", "B", "C"], ["a1", "a2", "c1"], ["x", "y"]]
    assert toy.path("y") == ["C", "c1", "y"]
    assert toy.level_targets("B") == [1, -1, -1]
    assert toy.level_targets("y") == [2, 2, 1]
    assert toy.distance("a1", "a2") == 2 and toy.distance("a1", "y") == 5 and toy.distance("x", "x") == 0


def test_bad_trees_are_named():
    with pytest.raises(DatasetError, match="occurs twice"):
        Taxonomy({"name": "r", "children": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(DatasetError, match="only leaves carry sources"):
        Taxonomy({"name": "r", "children": [{"name": "a", "sources": ["d:x"], "children": [{"name": "b"}]}]})
    with pytest.raises(DatasetError, match="dataset:label"):
        Taxonomy({"name": "r", "children": [{"name": "a", "sources": ["nocolon"]}]})
    with pytest.raises(DatasetError, match="claimed by"):
        Taxonomy({"name": "r", "children": [{"name": "a", "sources": ["d:x"]},
                                            {"name": "b", "sources": ["d:x"]}]}).source_map()
    with pytest.raises(UnknownNameError, match="bundled taxonomies"):
        Taxonomy.from_yaml("no_such_tree")


def test_path_probabilities_are_a_distribution_and_decoders_agree_with_hand_computation(toy):
    codec = LevelCodec(toy)
    assert codec.sizes == [3, 3, 2]
    # one sample: level 0 prefers C, level 1 prefers a1 (inconsistent with C), level 2 prefers y
    logits = torch.tensor([[0.0, 0.0, 3.0, 5.0, 0.0, 1.0, 0.0, 2.0]])
    levels = codec.split(logits)
    p = codec.path_log_probs(levels).exp()
    assert torch.allclose(p.sum(1), torch.ones(1))
    # c1 is C's only child with data, so p(y) = p(C) * 1 * p(y | c1)
    pc = torch.softmax(torch.tensor([0.0, 0.0, 3.0]), 0)[2]
    py = torch.softmax(torch.tensor([0.0, 2.0]), 0)[1]
    assert torch.isclose(p[0, codec.leaves.index("y")], pc * py)
    assert codec.decode(levels, "path_probability") == [["C", "c1", "y"]]
    assert codec.decode(levels, "top_down") == [["C", "c1", "y"]]
    assert codec.decode(levels, "independent") == [["C", "a1"]]
    assert not is_valid_path(toy, ["C", "a1"]) and is_valid_path(toy, ["C", "c1", "y"])


def test_level_losses_mask_samples_that_do_not_reach_a_level(toy):
    codec = LevelCodec(toy)
    task = HierarchicalTask(codec)
    logits = torch.randn(2, sum(codec.sizes), requires_grad=True)
    y = torch.tensor([codec.leaves.index("B")] * 2)  # depth-1 leaf: only level 0 has targets
    losses = task.level_losses(logits, y)
    assert losses[1].item() == 0.0 and losses[2].item() == 0.0 and losses[0].item() > 0
    task.loss(logits, y).backward()
    assert logits.grad[:, 3:].abs().sum() == 0 and logits.grad[:, :3].abs().sum() > 0


def test_loss_control_each_head_gets_only_its_own_levels_gradient(toy):
    codec = LevelCodec(toy)
    torch.manual_seed(0)
    net = MultiLevelNet("resnet18", codec.sizes)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([codec.leaves.index(n) for n in ("a1", "x", "y", "a2")])
    # level 1 switched off: its head gets no gradient, the others and the backbone do
    HierarchicalTask(codec, level_weights=[1.0, 0.0, 1.0]).loss(net(x), y).backward()
    grads = [h.weight.grad.abs().sum().item() for h in net.heads]
    assert grads[1] == 0.0 and grads[0] > 0 and grads[2] > 0
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    # a head's gradient does not depend on other levels' weights
    g2 = net.heads[2].weight.grad.clone()
    net.zero_grad()
    HierarchicalTask(codec, level_weights=[5.0, 3.0, 1.0]).loss(net(x), y).backward()
    assert torch.allclose(net.heads[2].weight.grad, g2, atol=1e-6)


def test_metrics_on_hand_made_predictions(toy):
    true = ["a1", "y", "B", "x"]
    pred = [["A", "a1"], ["C", "c1", "x"], ["C", "a1"], ["C", "c1", "x"]]  # right, sibling, invalid, right
    s = hierarchical_metrics(toy, true, pred)
    assert s.path_consistency == 0.75
    assert s.leaf_accuracy == 0.5
    assert s.level_accuracy[0] == 0.75  # B predicted as C
    assert s.level_accuracy[2] == 0.5  # x right, y -> x wrong
    # mistake severity: y->x is 2 edges; B->a1 (last node of the invalid path) is 3
    assert s.mistake_severity == pytest.approx(2.5)
    # hierarchical precision: overlaps 2 + 2 + 0 + 3 = 7 over predicted 2 + 3 + 2 + 3 = 10
    assert s.hierarchical_precision == pytest.approx(0.7)
    assert s.hierarchical_recall == pytest.approx(7 / 9)


def test_leukemia_tree_keeps_cml_cll_without_data():
    tax = Taxonomy.from_yaml("leukemia")
    assert {"CML", "CLL"} <= set(tax.leaves) and not ({"CML", "CLL"} & set(tax.data_leaves))
    assert "no public" in tax["CML"].note
    assert tax.path("pre_b") == ["leukemia", "acute", "ALL", "pre_b"]


def test_leukemia_table_on_the_mirror(data_root):
    tax = Taxonomy.from_yaml("leukemia")
    table = load_taxonomy_table(tax, data_root)
    counts = table.groupby("label").size()
    assert set(counts.index) == set(tax.data_leaves)
    # Matek neutrophils join PBC neutrophils under one leaf, from two domains
    assert set(table.loc[table.label == "neutrophil", "dataset"]) == {"pbc", "matek"}
    assert set(table["split"]) == {"train", "val", "test"}
    # PBC keeps its same-class duplicate files (so this check is not vacuous), each
    # group of identical files on one side of every split boundary
    dups = table[table["sha256"].duplicated(keep=False)]
    assert len(dups) > 0
    assert dups.groupby("sha256")["split"].nunique().max() == 1
    assert "aria:" in table.attrs["split_sha256"] and "matek:" in table.attrs["split_sha256"]


def test_chapter_experiment_scores_every_decoder_and_the_binary_contrasts(toy):
    """The chapter's protocol functions (leukemia_core.experiments.hierarchy) on the toy tree."""
    from leukemia_core.experiments import hierarchy as experiment

    codec = LevelCodec(toy)
    logits = torch.tensor([[0.0, 0.0, 3.0, 5.0, 0.0, 1.0, 0.0, 2.0]])  # see the decoder test above
    rows = list(experiment.score_rows(codec, "multilevel", "multilevel", logits, ["y"], seed=0))
    assert [r["decoder"] for r in rows] == ["path_probability", "top_down", "independent"]
    assert list(rows[0])[:3] == ["model", "seed", "decoder"] and "level 3 acc" in rows[0]
    by = {r["decoder"]: r for r in rows}
    assert by["path_probability"]["leaf acc"] == 1.0 and by["independent"]["path consistency"] == 0.0
    flat = list(experiment.score_rows(codec, "flat", "flat", torch.eye(5)[[3]], ["x"]))  # argmax: leaf x
    assert [r["decoder"] for r in flat] == ["argmax leaf"] and flat[0]["leaf acc"] == 1.0
    # balanced accuracy: malignant 1/2 called, benign 2/2 right
    assert experiment.binary_scores([True, True, False, False], [True, False, False, False]) == {
        "accuracy": 0.75, "balanced accuracy": 0.75, "test images": 4}


def test_chapter_experiment_profiles():
    from leukemia_core.config import chapter_sizes, get_profile
    from leukemia_core.experiments import hierarchy as experiment

    sizes, P, PS = experiment.profiles("smoke")
    base = get_profile("smoke")
    assert sizes == chapter_sizes("04_hierarchy", "smoke")
    assert (P.image_size, P.lr, P.warmup_epochs, P.max_eval_per_class) == (sizes["image_size"], base.lr / 2, 0.3,
                                                                           None)
    assert (PS.image_size, PS.lr, PS.max_train_per_class) == (sizes["scratch_image_size"], base.lr,
                                                              sizes["scratch_cap"])
    c = experiment.fit_config(3, 2, P)
    assert (c.epochs, c.seed, c.lr, c.patience, c.progress) == (2, 3, P.lr, None, False)


def test_pooled_loss_is_one_multilabel_bce_over_every_node(toy):
    """The ablation without per-level loss control: one binary cross-entropy over every
    node of every level, so a leaf at depth 1 is a negative for every deeper node."""
    import torch.nn.functional as F

    codec = LevelCodec(toy)
    task = HierarchicalTask(codec, pooled=True)
    y = torch.tensor([codec.leaves.index("B"), codec.leaves.index("y")])
    targets = task.node_targets(y)
    #                       level 0: A B C | level 1: a1 a2 c1 | level 2: x y
    assert targets.tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1, 0, 1]]
    logits = torch.randn(2, sum(codec.sizes), requires_grad=True)
    loss = task.loss(logits, y)
    assert torch.isclose(loss, F.binary_cross_entropy_with_logits(logits, targets))
    loss.backward()
    # unlike the masked per-level loss, B's sample pushes every deeper node down
    assert logits.grad[0, 3:].abs().min() > 0
    with pytest.raises(ValueError, match="pooled"):
        HierarchicalTask(codec, levels=[0], pooled=True)


class _Tiny(torch.utils.data.Dataset):
    """Random 32 px images with leaf indices: what train_hierarchical needs of a dataset."""

    def __init__(self, n, n_leaves, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.targets = torch.randint(0, n_leaves, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize("kind,level", [("multilevel", None), ("level", 3), ("pooled", None)])
def test_hierarchical_checkpoints_reload_through_the_one_loader(tmp_path, kind, level):
    """train_hierarchical writes a ``hierarchical`` checkpoint that load_checkpoint rebuilds
    with identical outputs, and a results.json a model card is made from; a checkpoint
    whose leaves no longer match its taxonomy fails with the fix."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from leukemia_core.checkpoints import load_checkpoint
    from leukemia_core.config import get_profile
    from leukemia_core.data.transforms import preprocess_dict
    from leukemia_core.engine.train import FitConfig
    from leukemia_core.errors import CheckpointError
    from leukemia_core.hierarchy import LevelData, train_hierarchical

    codec = LevelCodec(Taxonomy.from_yaml("leukemia"))
    data = LevelData(codec, {s: _Tiny(24, len(codec.leaves), i) for i, s in enumerate(("train", "val", "test"))},
                     {})
    prof = get_profile("smoke", image_size=32, batch_size=8)
    run = train_hierarchical(kind, "resnet18", data, prof, FitConfig(epochs=1, lr=1e-3, seed=0, progress=False),
                             level=level, out_dir=tmp_path, meta={"preprocess": preprocess_dict(32, [0.5] * 3, [0.25] * 3)},
                             provenance={"split_sha256": "s" * 64, "data_sha256": "d" * 64,
                                         "datasets": ["pbc"]})
    model, meta, _ = load_checkpoint(tmp_path)
    assert (meta["kind"], meta["model_kind"], meta["level"], meta["classes"]) == (
        "hierarchical", kind, level, codec.leaves)
    x = data.datasets["test"].x[:4]
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.model.eval()(x))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["datasets"] == ["pbc"] and len(results["history"]) == 1
    assert results["train_time_s"] == pytest.approx(results["history"][0]["train_time_s"])
    # the same weights under a tree whose leaves differ: a clear error, not wrong labels
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = json.loads(f.metadata()["meta"])
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "other.safetensors"),
              metadata={"meta": json.dumps(stored | {"classes": codec.leaves[::-1]})})
    with pytest.raises(CheckpointError, match="trained on the leaves.*retrain"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_reference_names_match_the_expected_checkpoints():
    from leukemia_core.experiments import hierarchy as experiment
    from leukemia_core.reproducibility import reference

    assert tuple(experiment.reference_names()) == reference.EXPECTED["04_hierarchy"]


@pytest.mark.slow
def test_reference_publish_and_live_evaluation_on_the_mirror(data_root, tmp_path):
    """A smoke run of the chapter published as reference checkpoints (some of them) and
    evaluated live on the whole test split: the published models are scored, with every
    node's precision and recall, consistently with their cards; the others are rows that
    say they are missing, never skipped."""
    import json

    from leukemia_core.experiments import hierarchy as experiment

    names = ["multilevel_efficientnet_lite0"] + [f"level{d}_efficientnet_lite0" for d in range(1, 5)]
    with pytest.raises(UnknownNameError, match="level5_efficientnet_lite0"):
        experiment.run("smoke", data_root=data_root, out=tmp_path / "runs", only=["level5_efficientnet_lite0"])
    # `only`: these checkpoints trained into their usual folders, nothing else trained or written
    run = experiment.run("smoke", data_root=data_root, out=tmp_path / "runs", results_dir=tmp_path / "results",
                         only=names)
    assert sorted(run.objects["trained"]) == sorted(names) and run.results == []
    assert sorted(p.name for p in run.objects["checkpoints"].iterdir()) == sorted(f"{n}_s0" for n in names)
    assert not (tmp_path / "results").exists()
    root = tmp_path / "reference"
    published = experiment.publish_reference(tmp_path / "runs", data_root=data_root, root=root, models=names)
    assert sorted(p.name for p in published) == sorted(names)
    ev = experiment.evaluate_reference(data_root=data_root, results_dir=tmp_path / "results", root=root)
    rows = {r["model"]: r for r in ev["rows"]}
    assert rows["multilevel_efficientnet_lite0"]["status"] == "verified"
    assert rows["base_hierarchical_efficientnet_lite0"]["status"] == "verified"
    assert rows["flat_efficientnet_lite0"]["status"] == "missing"
    assert "leukemia-core run 04_hierarchy" in rows["flat_efficientnet_lite0"]["message"]
    out = json.loads((tmp_path / "results" / "reference" / "hierarchy_multilevel_efficientnet_lite0.json").read_text())
    card = json.loads((root / "04_hierarchy" / "multilevel_efficientnet_lite0" / "model_card.json").read_text())
    assert out["metrics"]["test"]["path_probability"]["leaf acc"] == pytest.approx(card["metrics"]["accuracy"])
    nodes = out["metrics"]["nodes"]
    assert {"ALL", "reactive", "hematogone"} <= set(nodes)
    assert nodes["ALL"]["support"] == sum(nodes[s]["support"] for s in ("early_pre_b", "pre_b", "pro_b"))
    assert len(ev["logs"]["base_hierarchical_efficientnet_lite0"]) == 4
    # under smoke: the first 6 test images per leaf, written beside the whole-split files
    capped = experiment.evaluate_reference(data_root=data_root, results_dir=tmp_path / "results", root=root,
                                           per_class=6)
    rows = {r["model"]: r for r in capped["rows"]}
    assert rows["multilevel_efficientnet_lite0"]["test images"] == 6 * 10  # 10 leaves
    assert (tmp_path / "results" / "smoke" / "reference" / "hierarchy_multilevel_efficientnet_lite0.json").exists()
    again = json.loads((tmp_path / "results" / "reference" / "hierarchy_multilevel_efficientnet_lite0.json").read_text())
    assert again["metrics"] == out["metrics"]


def test_reference_findings_follow_the_numbers():
    """The reference section's verdicts on hand-made evaluations: hierarchy ahead on every
    node comparison is 'reproduced', the ViT reaching the common level first 'converges
    faster'; a model that is not verified turns its comparison into a message."""
    from leukemia_core.experiments import hierarchy as experiment

    B = experiment.BACKBONE
    row = lambda m, f1: {"model": m, "status": "verified", "leaf acc": f1, "leaf macro-F1": f1,  # noqa: E731
                         "image size (px)": 64, "epochs": "3"}
    node = lambda p, r: {"precision": p, "recall": r, "support": 10}  # noqa: E731
    nodes = {f"flat_{B}": {"ALL": node(0.8, 0.8), "reactive": node(0.5, 0.5)},
             f"base_hierarchical_{B}": {"ALL": node(0.9, 0.85), "reactive": node(0.6, 0.7)},
             f"multilevel_{B}": {"ALL": node(0.95, 0.9), "reactive": node(0.55, 0.6)}}
    curve = lambda *f1: [{"epoch": i, "train_loss": 1.0, "val_macro_f1": v} for i, v in enumerate(f1)]  # noqa: E731
    ref = {"rows": [row(f"flat_{B}", 0.90), row(f"base_hierarchical_{B}", 0.92), row(f"multilevel_{B}", 0.95),
                    row(f"pooled_{B}", 0.93), row("flat_convnext_atto", 0.80), row("flat_vit_tiny_patch16_224", 0.70)],
           "nodes": nodes,
           "logs": {"flat_convnext_atto": [curve(0.3, 0.5, 0.8)], "flat_vit_tiny_patch16_224": [curve(0.4, 0.69, 0.7)]}}
    f = experiment.reference_findings(ref)
    s = f["sentences"]
    assert "both hierarchical models are ahead" in s["flat_vs_hier"] and "+5.0 points" in s["flat_vs_hier"]
    assert "**reproduced**" in s["nodes"] and "8 comparisons" in s["nodes"]
    assert "2.0 points ahead" in s["ablation"]
    # common level 0.95 * 0.70 = 0.665: the ViT at epoch 2, the CNN at epoch 3
    assert "the ViT converges faster, as the paper says" in s["cnn_vit"]
    assert set(f["nodes"]["model"]) == {"flat", "base hierarchical", "multi-level"}
    # flat better on one of the 8 comparisons: partly reproduced
    nodes[f"flat_{B}"]["reactive"] = node(0.58, 0.5)
    assert "**partly reproduced**" in experiment.reference_findings(ref)["sentences"]["nodes"]
    ref["rows"][3] = {"model": f"pooled_{B}", "status": "corrupt", "message": "bad hash"}
    assert "not available" in experiment.reference_findings(ref)["sentences"]["ablation"]
    assert "corrupt" in experiment.reference_findings(ref)["sentences"]["ablation"]


def test_scratch_config_gives_a_backbone_its_own_learning_rate_only_where_the_sizes_say():
    from leukemia_core.config import chapter_sizes
    from leukemia_core.experiments import hierarchy as experiment

    sizes, _, PS = experiment.profiles("reference")
    vit = experiment.scratch_config(0, "vit_tiny_patch16_224", sizes, PS)
    cnn = experiment.scratch_config(0, "convnext_atto", sizes, PS)
    assert (vit.lr, vit.grad_clip) == (5e-4, 1.0)
    assert (cnn.lr, cnn.grad_clip) == (PS.lr, None) and cnn.epochs == vit.epochs == sizes["scratch_epochs"]
    ci, _, PSci = experiment.profiles("ci")
    assert "scratch_lr" not in chapter_sizes("04_hierarchy", "ci")
    assert experiment.scratch_config(0, "vit_tiny_patch16_224", ci, PSci).lr == PSci.lr
