"""Evaluation of the joint embedding: zero-shot classification by prompts, retrieval
with its random baseline, attribute read-out against majority floors, linear probes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from leukemia_core.data import ATTRIBUTES
from leukemia_core.engine.metrics import classification_metrics
from leukemia_core.engine.train import autocast, to_device
from leukemia_core.vl.model import VisionLanguageModel
from leukemia_core.vl.texts import value_sentences


@torch.no_grad()
def embed_images(model: VisionLanguageModel, ds, batch_size: int = 128, features: bool = True,
                 progress: bool = False, channels_last: bool = True):
    """Unit image embeddings [N, D] (and pooled backbone features [N, F]) in dataset order."""
    device = next(model.parameters()).device
    model.eval()
    if channels_last:
        model.image_tower.to(memory_format=torch.channels_last)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    embs, feats = [], []
    for x, _ in tqdm(loader, desc="embed", leave=False, disable=not progress):
        with autocast(device, True):
            f = model.image_features(to_device(x, device, channels_last))
            embs.append(torch.nn.functional.normalize(model.image_proj(f).float(), dim=-1).cpu())
        feats.append(f.float().cpu())
    return torch.cat(embs), (torch.cat(feats) if features else None)


@torch.no_grad()
def prompt_embeddings(model: VisionLanguageModel, prompts: dict[str, list[str]]) -> torch.Tensor:
    """One unit vector per class: the renormalised mean of its prompts' embeddings
    (prompt ensembling, as in CLIP)."""
    model.eval()
    out = [torch.nn.functional.normalize(model.encode_text(list(p)).mean(0), dim=0).cpu() for p in prompts.values()]
    return torch.stack(out)


def zero_shot_logits(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image with every class prompt [N, C]."""
    return image_emb @ class_emb.t()


def zero_shot_metrics(image_emb, labels: list[str], class_emb, classes: list[str],
                      group_of: dict[str, str] | None = None, groups: list[str] | None = None) -> dict:
    """Classification by the most similar class prompt. With ``group_of`` (prompt class ->
    group), predictions and labels are first mapped to ``groups``."""
    pred = [classes[i] for i in zero_shot_logits(image_emb, class_emb).argmax(1).tolist()]
    if group_of is not None:
        pred = [group_of.get(p, "other") for p in pred]
        classes = list(groups) + (["other"] if "other" in pred else [])
    index = {c: i for i, c in enumerate(classes)}
    out = classification_metrics(torch.tensor([index[p] for p in pred]),
                                 torch.tensor([index[y] for y in labels]), classes)
    out["classes"], out["predictions"] = classes, pred
    return out


# --------------------------------------------------------------------------- retrieval
def recall_at_k(similarity: torch.Tensor, match: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries (rows) with at least one matching gallery item among their top ``k``."""
    order = similarity.argsort(dim=1, descending=True)
    hits = torch.gather(match.to(torch.bool), 1, order)
    return {f"R@{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}


def random_recall_at_k(match: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected :func:`recall_at_k` of a random ranking: per query with ``m`` matches in a
    gallery of ``G``, ``1 - C(G-m, k) / C(G, k)``, averaged over queries."""
    g = match.shape[1]
    m = match.to(torch.bool).sum(1).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(m)
        for t in range(min(k, g)):
            miss = miss * ((g - m - t).clamp(min=0) / (g - t))
        out[f"R@{k}"] = float((1 - miss).mean())
    return out


def retrieval_report(image_emb: torch.Tensor, image_keys: list[str], sentence_emb: torch.Tensor,
                     sentence_keys: list[str], ks=(1, 5, 10)) -> pd.DataFrame:
    """Image->text and text->image recall with the random baseline beside it. A hit is a
    sentence / image with the *same attribute tuple* as the query (many cells share one)."""
    keys = {k: i for i, k in enumerate(dict.fromkeys(list(image_keys) + list(sentence_keys)))}
    a = torch.tensor([keys[k] for k in image_keys])
    b = torch.tensor([keys[k] for k in sentence_keys])
    match = a[:, None] == b[None, :]
    sim = image_emb @ sentence_emb.t()
    rows = []
    for direction, s, mt in (("image → text", sim, match), ("text → image", sim.t(), match.t())):
        model_r, rand_r = recall_at_k(s, mt, ks), random_recall_at_k(mt, ks)
        for k in ks:
            rows.append({"direction": direction, "k": k, "recall": model_r[f"R@{k}"],
                         "random": rand_r[f"R@{k}"], "queries": s.shape[0], "gallery": s.shape[1]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- attribute read-out
@torch.no_grad()
def attribute_readout(model: VisionLanguageModel, image_emb: torch.Tensor, test: pd.DataFrame,
                      train: pd.DataFrame, framing: str = "readout") -> pd.DataFrame:
    """For each attribute, the value whose read-out sentences (ensembled) best match each
    image (``framing="readout"``: a wording never used in training); accuracy and balanced
    accuracy against the WBCAtt labels, beside the floors: the training majority value
    predicted for every cell, and chance (1 / values) for balanced accuracy."""
    rows = []
    for a in ATTRIBUTES:
        prompts = value_sentences(a, framing)
        values = list(prompts)
        pred = np.array(values)[zero_shot_logits(image_emb, prompt_embeddings(model, prompts)).argmax(1).numpy()]
        truth = test[a].astype(str).to_numpy()
        majority = train[a].astype(str).value_counts().idxmax()
        recalls = [float((pred[truth == v] == v).mean()) for v in values if (truth == v).any()]
        rows.append({"attribute": a, "values": len(values), "accuracy": float((pred == truth).mean()),
                     "majority_floor": float((truth == majority).mean()), "majority_value": majority,
                     "balanced_accuracy": float(np.mean(recalls)), "chance_balanced": 1 / len(recalls)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- linear probe
def linear_probe(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y, C: float = 1.0,
                 max_iter: int = 2000) -> dict:
    """Multinomial logistic regression on standardised frozen features; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(train_x.numpy(), np.asarray(train_y))
    pred = clf.predict(test_x.numpy())
    test_y = np.asarray(test_y)
    classes = sorted(set(test_y))
    recalls = [float((pred[test_y == c] == c).mean()) for c in classes]
    return {"accuracy": float((pred == test_y).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "n_train": len(train_y), "n_test": len(test_y), "predictions": pred}
