"""The vision-language chapter's library (leukemia_core.vl): loss, texts, towers, metrics,
held-out split, checkpoints, similarity Grad-CAM, and a tiny training run on real data."""
import math

import pytest
import torch
import torch.nn.functional as F

from leukemia_core.config import PROFILES, get_profile
from leukemia_core.data import ATTRIBUTES
from leukemia_core.vl import (VL_SIZES, TextBank, attribute_sentence, build_vl_model, class_texts,
                              heldout_split, multi_positive_info_nce, positives_from_keys,
                              random_recall_at_k, recall_at_k, retrieval_report, templates,
                              value_sentences)
from leukemia_core.vl.texts import attribute_values, attribute_key, key_to_attributes
from leukemia_core.vl.train import attribute_value_loss

CELL = {"cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-bilobed",
        "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
        "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "round",
        "granule_colour": "red", "granularity": "yes"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster and leaves the other core alone; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return build_vl_model(pretrained=False, image_size=64, embed_dim=32)


# --------------------------------------------------------------------------- loss
def test_info_nce_on_known_inputs():
    e = torch.eye(2, dtype=torch.float64)
    out = multi_positive_info_nce(e, e, 1.0)
    expected = math.log(1 + math.exp(-1))  # -log(e / (e + 1)) in each row, both directions
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["image_to_text"].item() == pytest.approx(expected, rel=1e-6)
    # temperature: scale 10 sharpens the same logits
    assert multi_positive_info_nce(e, e, 10.0)["loss"].item() == pytest.approx(math.log(1 + math.exp(-10)), rel=1e-4)


def test_info_nce_is_symmetric_and_uses_both_directions():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    pos = positives_from_keys([0, 0, 1, 2, 2], [0, 1, 1, 2, 0])
    a = multi_positive_info_nce(img, txt, 3.0, pos)
    b = multi_positive_info_nce(txt, img, 3.0, pos.t())
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
    assert a["image_to_text"].item() == pytest.approx(b["text_to_image"].item(), rel=1e-6)
    assert a["image_to_text"].item() != pytest.approx(a["text_to_image"].item(), rel=1e-3)
    assert a["loss"].item() == pytest.approx((a["image_to_text"] + a["text_to_image"]).item() / 2, rel=1e-6)


def test_shared_sentences_are_positives_not_negatives():
    """Images 0 and 1 share a class, texts 0 and 1 are two paraphrases of it: the loss equals
    the hand-computed soft-target CE, and which paraphrase was drawn for which of the two
    images does not matter (with CLIP's one-positive targets it does)."""
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    keys = [0, 0, 1]
    pos = positives_from_keys(keys, keys)
    out = multi_positive_info_nce(img, txt, 2.0, pos)
    logits = 2.0 * img @ txt.t()
    target = pos.double() / pos.double().sum(1, keepdim=True)
    t2i_target = (pos.double() / pos.double().sum(0, keepdim=True)).t()
    hand = (-(target * logits.log_softmax(1)).sum(1).mean()
            - (t2i_target * logits.t().log_softmax(1)).sum(1).mean()) / 2
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-9)
    swapped = txt[[1, 0, 2]]
    assert multi_positive_info_nce(img, swapped, 2.0, pos)["loss"].item() == pytest.approx(out["loss"].item())
    plain, plain_swapped = multi_positive_info_nce(img, txt, 2.0), multi_positive_info_nce(img, swapped, 2.0)
    assert plain["loss"].item() != pytest.approx(plain_swapped["loss"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        multi_positive_info_nce(img, txt, 1.0, torch.zeros(3, 3, dtype=torch.bool))


def test_temperature_is_learnable(model):
    assert model.logit_scale.requires_grad
    assert float(1 / model.scale.detach()) == pytest.approx(0.07)  # CLIP's initial temperature
    before = model.logit_scale.detach().clone()
    x = torch.randn(4, 3, 64, 64)
    img = model.encode_image(x)
    txt = model.encode_text(["a", "b", "c", "d"])
    loss = multi_positive_info_nce(img, txt, model.scale)["loss"]
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    torch.optim.SGD([model.logit_scale], lr=0.1).step()
    assert not torch.equal(before, model.logit_scale.detach())
    with torch.no_grad():
        model.logit_scale.copy_(before)
    model.zero_grad(set_to_none=True)


def test_attribute_value_loss_learns_the_values():
    """Free embeddings trained with the clause loss read out every attribute value, also a rare one."""
    torch.manual_seed(0)
    va, vi = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2])
    values = torch.stack([(torch.rand(64) < 0.1).long(), torch.randint(3, (64,))], 1)
    img, txt = torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(5, 16))
    opt = torch.optim.Adam([img, txt], 0.05)
    for _ in range(200):
        loss = attribute_value_loss(F.normalize(img, dim=1), values, F.normalize(txt, dim=1), va, vi, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).t()
    assert torch.equal(s[:, :2].argmax(1), values[:, 0]) and torch.equal(s[:, 2:].argmax(1), values[:, 1])


# --------------------------------------------------------------------------- texts
def test_class_descriptions_have_enough_paraphrases():
    classes = class_texts()
    for name in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "hematogone",
                 "AML", "ALL", "CML", "CLL"):
        assert len(set(classes[name].sentences)) >= 5, name
        assert classes[name].heldout and not set(classes[name].heldout) & set(classes[name].sentences)
    assert "no public" in classes["CML"].note and "no public" in classes["CLL"].note
    assert "Large immature blood cells with abnormal structure." in classes["AML"].sentences  # the paper's
    assert "Fast-growing immature lymphocyte cells in the blood." in classes["ALL"].sentences


def test_sentence_builder_uses_all_eleven_attributes_and_several_templates():
    n = len(templates())
    assert n >= 4
    for t in range(n):
        base = attribute_sentence(CELL, t)
        for a, values in attribute_values().items():
            for v in values:
                if v != CELL[a]:
                    assert attribute_sentence(CELL | {a: v}, t) != base, (t, a, v)
    sentences = {attribute_sentence(CELL, t) for t in range(n)}
    heldout = attribute_sentence(CELL, templates(heldout=True)[0])
    assert len(sentences) == n and heldout not in sentences
    assert set(ATTRIBUTES) == set(attribute_values())
    assert key_to_attributes(attribute_key(CELL)) == CELL


def test_readout_sentences_name_one_value_in_an_unseen_framing():
    for a in ATTRIBUTES:
        readout, clause = value_sentences(a), value_sentences(a, "clause")
        assert list(readout) == attribute_values()[a]
        assert not {s for v in readout.values() for s in v} & {s for v in clause.values() for s in v}


def test_text_tower_is_offline_and_groups_paraphrases(model):
    tower = model.text_tower
    assert tower.frozen and not any(p.requires_grad for p in tower.parameters())
    classes = class_texts()
    feats = {c: F.normalize(tower.encode(list(t.sentences)), dim=1) for c, t in classes.items()}
    for c, f in feats.items():
        n = len(f)
        within = ((f @ f.t()).sum() - n) / (n * n - n)
        between = torch.stack([(f @ g.t()).mean() for d, g in feats.items() if d != c])
        assert within > between.max(), c
    again = tower.encode([classes["AML"].sentences[0]])
    torch.testing.assert_close(again[0], tower.encode(list(classes["AML"].sentences))[0])


def test_text_features_do_not_depend_on_input_order():
    """Sentences are batched by (length, text), so two fresh towers fed the same sentences in
    opposite orders give bit-identical features (training runs are then repeatable)."""
    from leukemia_core.vl import TextTower

    sentences = [s for t in class_texts().values() for s in t.sentences]
    a = TextTower().encode(sentences, batch_size=16)
    b = TextTower().encode(sentences[::-1], batch_size=16).flip(0)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- metrics
def test_recall_at_k_on_a_hand_made_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.5],
                        [0.2, 0.3, 0.8],
                        [0.7, 0.6, 0.1]])
    match = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    r = recall_at_k(sim, match, ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    rand = random_recall_at_k(match, ks=(1, 2, 3))
    assert rand["R@1"] == pytest.approx(1 / 3) and rand["R@2"] == pytest.approx(2 / 3) and rand["R@3"] == 1.0
    # two matches among four: P(hit in top 1) = 1/2, top 2 = 1 - (2/4)(1/3) = 5/6
    rand2 = random_recall_at_k(torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), ks=(1, 2))
    assert rand2["R@1"] == pytest.approx(0.5) and rand2["R@2"] == pytest.approx(5 / 6)


def test_retrieval_hits_are_by_attribute_tuple_identity():
    img = torch.eye(3)
    sentences = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # "b" points at image 2, "a" at image 1
    report = retrieval_report(img, ["a", "a", "b"], sentences, ["b", "a"], ks=(1,)).set_index("direction")
    assert report.loc["image → text", "gallery"] == 2 and report.loc["text → image", "gallery"] == 3
    # image 0 (key a) is orthogonal to both sentences: its top-1 is a tie broken either way
    assert report.loc["text → image", "recall"] == 1.0  # both sentences find an image of their tuple
    assert report.loc["text → image", "random"] == pytest.approx((1 / 3 + 2 / 3) / 2)


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def vl_table(data_root):
    from leukemia_core.vl import load_vl_table
    return load_vl_table(data_root)


def test_vl_table_joins_taxonomy_text_classes_and_attributes(vl_table):
    from leukemia_core.data import load_dataset

    assert vl_table["text_class"].notna().all() and vl_table["group"].notna().all()
    assert set(vl_table["group"]) == {"normal", "benign", "AML", "ALL"}
    has = vl_table["attr_key"] != ""
    assert set(vl_table.loc[has, "dataset"]) == {"pbc"}
    # every PBC cell has attributes but WBCAtt's copies dropped across its own splits
    dropped = set(load_dataset("wbcatt", hashes=False).attrs["cross_split_copies"]["relpath"])
    pbc = vl_table[vl_table["dataset"] == "pbc"]
    assert set(pbc.loc[pbc["attr_key"] == "", "relpath"]) == dropped & set(pbc["relpath"])
    assert vl_table.loc[vl_table["source"] == "aria:pro_b", "text_class"].eq("ALL").all()
    assert vl_table.loc[vl_table["source"] == "matek:myeloblast", "group"].eq("AML").all()
    assert vl_table.loc[vl_table["source"] == "aria:benign", "group"].eq("benign").all()
    assert vl_table.loc[vl_table["source"] == "matek:neutrophil", "group"].eq("normal").all()


def test_heldout_class_is_absent_from_training(vl_table):
    train = vl_table[vl_table["split"] == "train"]
    held = heldout_split(train, "monocyte")
    bank = TextBank.build(held)
    assert "monocyte" not in bank.classes and "monocyte" not in set(held["text_class"])
    mono = class_texts()["monocyte"]
    assert not set(bank.class_sentences) & set(mono.sentences + mono.heldout)
    assert len(bank.row_class) == len(held) == (train["text_class"] != "monocyte").sum()
    # every attribute tuple in the bank is carried by a non-monocyte training image
    assert set(bank.keys) <= set(held.loc[held["attr_key"] != "", "attr_key"])
    only_mono = set(train.loc[train["text_class"] == "monocyte", "attr_key"]) - set(held["attr_key"])
    assert only_mono and not only_mono & set(bank.keys)


# --------------------------------------------------------------------------- model, checkpoint, CAM
def test_cam_target_layer_keeps_a_4x4_map(model):
    layers = model.cam_target_layers()
    feats = {}
    hook = layers[0].register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, 64, 64))
    hook.remove()
    assert feats["o"].shape[-2:] == (4, 4)
    big = build_vl_model(pretrained=False, image_size=224, embed_dim=8)
    assert big.cam_target_layers()[0] is big.image_tower.backbone.blocks[6]


def test_similarity_cam(model):
    from leukemia_core.vl.cam import similarity_cam
    text = model.encode_text(["A large cell with a kidney-shaped nucleus."])[0].detach()
    maps = similarity_cam(model, torch.randn(2, 3, 64, 64), text)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_checkpoint_round_trip_without_the_frozen_text_tower(model, tmp_path):
    from safetensors.torch import load_file

    from leukemia_core.errors import CheckpointError
    from leukemia_core.vl import load_vl, save_vl

    path = save_vl(tmp_path / "vl.safetensors", model.eval(), {"classes": ["x"]})
    assert not any(k.startswith("text_tower.") for k in load_file(str(path)))
    again, meta = load_vl(path)
    assert meta["classes"] == ["x"] and meta["vl_config"]["embed_dim"] == 32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x))
        torch.testing.assert_close(again.encode_text(["a cell"]), model.encode_text(["a cell"]))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_vl(tmp_path / "bad.safetensors")


def test_sizes_exist_for_every_profile():
    assert set(VL_SIZES) == set(PROFILES)
    assert VL_SIZES["full"]["text_trainable_layers"] > 0  # the full profile fine-tunes the text tower's top


@pytest.mark.slow
@pytest.mark.parametrize("text_layers", [0, 1])
def test_tiny_training_run_on_real_images(vl_table, text_layers):
    """A few smoke-profile images through fit_vl: finite losses, the temperature moves, and
    with a trainable text layer (the full profile's path) that layer's weights change."""
    from leukemia_core.vl import IndexedDataset, embed_images, fit_vl, prepare_vl
    from leukemia_core.vl.train import VLFitConfig

    P = get_profile("smoke")
    data = prepare_vl(vl_table, P, train_cap=2, eval_cap=1)
    train = data.split("train")
    assert len(train) == 2 * vl_table["source"].nunique()
    model = build_vl_model(pretrained=False, image_size=32, embed_dim=16, text_trainable_layers=text_layers)
    layer = model.text_tower.encoder.encoder.layer[-1].output.dense.weight.detach().clone()
    scale = model.logit_scale.detach().clone()
    ds = data.dataset("train", 32, preload=True)
    result = fit_vl(model, ds, TextBank.build(train), VLFitConfig(epochs=1, batch_size=8, head_lr=0.05))
    h = result.history[0]
    assert all(math.isfinite(h[k]) for k in ("train_class_loss", "train_attribute_loss", "train_clause_loss"))
    assert h["train_attribute_loss"] > 0 and h["train_clause_loss"] > 0
    assert not torch.equal(scale, model.logit_scale.detach())
    changed = not torch.equal(layer, model.text_tower.encoder.encoder.layer[-1].output.dense.weight.detach())
    assert changed == bool(text_layers)
    emb, feats = embed_images(model, IndexedDataset(data.dataset("test", 32, preload=True)))
    assert emb.shape == (len(data.split("test")), 16) and feats.shape[1] == 1280
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-4)


@pytest.mark.slow
def test_vl_training_resumes_exactly(vl_table, tmp_path):
    """Killed after a few steps and resumed (the one loop's resume), fit_vl ends with the
    weights and history of an uninterrupted run: the per-epoch sampler and template
    generators are part of the saved state."""
    from leukemia_core.vl import fit_vl, prepare_vl
    from leukemia_core.vl.train import VLFitConfig

    data = prepare_vl(vl_table, get_profile("smoke"), train_cap=3, eval_cap=1)
    train = data.split("train")
    ds = data.dataset("train", 32, preload=True)
    cfg = VLFitConfig(epochs=2, batch_size=8, head_lr=0.05)

    def model():
        torch.manual_seed(0)
        return build_vl_model(pretrained=False, image_size=32, embed_dim=16)

    whole = model()
    ref = fit_vl(whole, ds, TextBank.build(train), cfg, out_dir=tmp_path / "whole")
    steps = len(ref.history) and max(1, len(train) // 8)
    killed = model()
    cut = fit_vl(killed, ds, TextBank.build(train), cfg, out_dir=tmp_path / "killed",
                 stop_after_steps=steps + 1)
    assert len(cut.history) == 1  # stopped inside the second epoch
    again = model()
    res = fit_vl(again, ds, TextBank.build(train), cfg, out_dir=tmp_path / "killed", resume=True)
    timing = ("train_images_per_s", "train_time_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in res.history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in ref.history]
    for (k, a), b in zip(whole.trainable_state_dict().items(), again.trainable_state_dict().values()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------- the chapter's experiment
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_vl_model(pretrained=False, image_size=32, embed_dim=16)


def test_experiment_scores_the_heldout_class_on_tiny_data(small_model):
    """The held-out-class evaluation of chapter 05 (leukemia_core.experiments.vision_language):
    five-class zero-shot under both prompt sets, the four seen classes among themselves, and one
    summary row per prompt set whose recall is the confusion matrix's."""
    import numpy as np

    from leukemia_core.experiments import vision_language as vl

    labels = [c for c in vl.WBC for _ in range(2)]
    ds = torch.utils.data.TensorDataset(torch.randn(len(labels) + 2, 3, 32, 32), torch.zeros(len(labels) + 2))
    is_pbc = np.array([True] * len(labels) + [False, False])  # two non-PBC images are left out
    r = vl.score_heldout(small_model, ds, is_pbc, labels, "monocyte")
    assert set(r["held"]) == {"heldout", "attributes"} and r["held"]["heldout"]["n"] == len(labels)
    assert r["held_seen"]["n"] == len(labels) - 2
    summary = r["held_table_summary"]
    assert list(summary.index) == ["held-out class prompts", "textbook attribute profiles"]
    for which, (_, row) in zip(("heldout", "attributes"), summary.iterrows()):
        assert row["monocyte recall (unseen class)"] == r["held"][which]["per_class"]["monocyte"]["recall"]
        assert 0 <= row["monocyte in top 2"] <= 1 and 0 <= row["AUROC, margin over the best seen class"] <= 1
    assert r["unseen_fails"] == (r["unseen_recall"] <= 1 / len(vl.WBC))


def test_experiment_chronic_prompts_and_arguments(small_model):
    import pandas as pd

    from leukemia_core.errors import LeukemiaError
    from leukemia_core.experiments import vision_language as vl

    classes8 = vl.WBC + ["hematogone", "AML", "ALL"]
    test = pd.DataFrame({"text_class": ["AML", "lymphocyte", "lymphocyte", "ALL"]})
    r = vl.chronic_prompts(small_model, test, F.normalize(torch.randn(4, 16), dim=1), classes8)
    assert list(r["open_set"].columns) == ["CML", "CLL", "test images"]
    assert list(r["open_set"].index) == ["lymphocyte", "AML", "ALL"]  # the eight's order, present ones only
    assert r["open_set"][["CML", "CLL"]].to_numpy().sum() == round(4 * r["called_chronic"])
    with pytest.raises(LeukemiaError, match="one seed"):
        vl.run("smoke", seeds=[0, 1])
    with pytest.raises(LeukemiaError, match="heldout_class"):
        vl.run("smoke", heldout_class="AML")


def test_reference_table_puts_the_build_beside_the_reference():
    """The build's results and the reference evaluation share one layout (retrieval and
    read-out as tables); the measures come from it; a missing reference, or a reference
    without its held-out model, leaves blanks."""
    from leukemia_core.experiments import vision_language as experiment
    from leukemia_core.reproducibility import reference

    assert tuple(experiment.reference_names()) == reference.EXPECTED["05_vision_language"]
    zs = {"heldout": {"accuracy": 0.9, "macro_f1": 0.85}}

    def metrics(groups, r5, readout, unseen):
        m = {"zero_shot_pbc": zs, "zero_shot_groups": {"accuracy": groups},
             "retrieval": [{"direction": "image → text", "k": 5, "recall": r5},
                           {"direction": "text → image", "k": 5, "recall": 0.1}],
             "attribute_readout": [{"accuracy": a, "majority_floor": 0.6} for a in readout]}
        if unseen is not None:
            m["heldout_class"] = {"class": "monocyte", "unseen_class_summary": [{"monocyte recall (unseen class)": unseen}]}
        return m

    build, ref = metrics(0.6, 0.4, [0.7, 0.5], 0.3), metrics(0.7, 0.5, [0.7, 0.8], 0.6)
    t = experiment.reference_table(build, {"metrics": ref})
    assert t["this build"].tolist() == [0.9, 0.85, 0.6, 0.4, 0.3, 0.5]
    assert t["reference"].tolist() == [0.9, 0.85, 0.7, 0.5, 0.6, 1.0]
    blank = experiment.reference_table(build, {"metrics": None})
    assert blank["reference"].isna().all() and blank["this build"].notna().all()
    no_held = experiment.reference_table(build, {"metrics": metrics(0.7, 0.5, [0.7], None)})
    assert no_held["reference"].isna().tolist() == [False, False, False, False, True, False]


@pytest.mark.slow
def test_reference_publish_and_live_evaluation_on_the_mirror(data_root, tmp_path):
    """A smoke run published as reference checkpoints and evaluated live on the whole test
    split: the card's zero-shot score is what the live evaluation measures; the held-out
    model missing leaves its measure blank and says so."""
    import json

    from leukemia_core.experiments import vision_language as experiment

    experiment.run("smoke", data_root=data_root, out=tmp_path / "runs", results_dir=tmp_path / "results")
    root = tmp_path / "reference"
    published = experiment.publish_reference(tmp_path / "runs", data_root=data_root, root=root,
                                             models=["vl_lite0_minilm"])
    assert [p.name for p in published] == ["vl_lite0_minilm"]
    ev = experiment.evaluate_reference(data_root=data_root, results_dir=tmp_path / "results", root=root)
    assert [c["status"] for c in ev["checks"]] == ["verified", "missing"]
    assert "heldout_class" not in ev["metrics"]
    card = json.loads((root / "05_vision_language" / "vl_lite0_minilm" / "model_card.json").read_text())
    written = json.loads((tmp_path / "results" / "reference" / "vision_language.json").read_text())
    assert written["metrics"]["zero_shot_pbc"]["heldout"]["accuracy"] == pytest.approx(
        card["metrics"]["zero_shot_pbc_accuracy"])
    assert card["data_licences"].keys() >= {"pbc", "matek", "aria"}
    # under smoke: a few test images per source, written beside the whole-split file
    capped = experiment.evaluate_reference(data_root=data_root, results_dir=tmp_path / "results", root=root,
                                           per_class=6)
    small = json.loads((tmp_path / "results" / "smoke" / "reference" / "vision_language.json").read_text())
    assert small["metrics"] == capped["metrics"]
    assert small["metrics"]["zero_shot_pbc"]["heldout"]["n"] < written["metrics"]["zero_shot_pbc"]["heldout"]["n"]
    assert json.loads((tmp_path / "results" / "reference" / "vision_language.json").read_text()) == written
