"""Chapter 06, domain generalisation across hospitals: leave-one-domain-out over PBC, BCCD
and Zheng (Matek neutrophils as a probe), six training recipes and their SWA / TTA-BN
variants, the headline row chosen on the training domains' validation splits only, the
in-domain ceiling of that row, the combined model saved for ``leukemia-core predict``, and
``<results_dir>/<profile>/dg_*.json``.

:func:`run` is the whole protocol; the notebook ``notebooks/06_domain_generalization.py``
and ``leukemia-core run 06_domain_generalization`` both call it.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from leukemia_core import dg
from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.data.domains import CLASSES, DOMAINS, PROBE, SHARED, load_domains
from leukemia_core.data.splits import SPLITS_DIR
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.pipeline import content_hash, subsample
from leukemia_core.predict import evaluate_folder, predict_folder
from leukemia_core.reproducibility.results import session_wall_time, write_results

CHAPTER = "06_domain_generalization"
SCALE = dg.ScaleNorm()
LABELS = [CLASSES.index(c) for c in SHARED]  # macro-F1 over the shared classes
PREP = [(False, False), (True, True)]  # (scale norm, Reinhard stain norm): plain, normalised
#: rows whose recipe was designed by sweeps that saw held-out scores: shown, never the headline
DESIGNED_ON_HELDOUT = {"combined", "combined + TTA-BN"}
HEADLINE_RULE = ("highest mean validation macro-F1 on the training domains (TTA-BN rows adapted per "
                 "validation domain) among rows not designed on held-out scores")
#: Which recipe the all-domains model (the one for new hospitals) is trained with:
#: leave-one-domain-out cross-validation (Gulrajani & Lopez-Paz 2021), scored on the held-out
#: domain's training and validation images only, so that every domain's test split stays
#: untouched for the all-domains model's own test.
ALL_DOMAINS_RULE = ("highest mean LODO-CV macro-F1: each leave-one-domain-out model scored on its held-out "
                    "domain's training and validation images (never its test split; TTA-BN rows adapted to "
                    "them), among rows not designed on held-out scores")
DATASET = "lodo:pbc,bccd_crops,zheng+matek_probe"
#: Domain ids of the images (the all-domains model also trains on Matek's neutrophils).
DOMAIN_IDS = [*DOMAINS, *PROBE]
#: Model-card licence keys of the domains (reference.DATA_LICENCES).
LICENCE_KEYS = {"pbc": "pbc", "bccd": "bccd", "zheng": "zheng_wbc", "matek": "matek"}


def recipes(supcon_weight: float = 0.5) -> list[dg.Recipe]:
    """The six training recipes, ERM-BN first (the order of the table's rows)."""
    return [
        dg.Recipe("ERM-BN", swa=True),
        dg.Recipe("ERM-GN", norm="gn"),
        dg.Recipe("CB sampling + CB focal", sampler="balanced", loss="cb_focal"),
        dg.Recipe("stain aug + scale norm", stain=True, scale_norm=True, stain_norm=True),
        dg.Recipe("SupCon", supcon=supcon_weight),
        dg.Recipe("combined", scale_norm=True, stain_norm=True, supcon=supcon_weight, domain_bn=True),
    ]


def recipe_of(method: str, recipes: list[dg.Recipe]) -> dg.Recipe:
    """The recipe a table row was trained with (a row name may add ' + SWA' / ' + TTA-BN')."""
    names = {r.name: r for r in recipes}
    return names[method] if method in names else names[method.split(" + ")[0]]


def slug(method: str) -> str:
    """A row name as a file name: 'ERM-BN + TTA-BN' -> 'erm_bn_tta_bn'."""
    return method.lower().replace(" + ", "_").replace(" ", "_").replace("-", "_")


# --------------------------------------------------------------------------- data
def segmentation_check(table: pd.DataFrame, sizes: dict) -> tuple[dict, list[float], list[float]]:
    """Nucleus segmentation against Zheng's expert masks: ``(summary, ious, extent ratios)``."""
    zheng = table[table["domain"] == "zheng"]
    if sizes["small_cap"]:
        zheng = subsample(zheng, sizes["small_cap"], 0)

    def ext(a):
        return max(np.ptp(np.nonzero(a)[0]), np.ptp(np.nonzero(a)[1])) + 1 if a.any() else np.nan

    ious, ratios = [], []
    for row in zheng.itertuples():
        rgb = np.asarray(read_image(row.path))
        gt = np.asarray(Image.open(row.mask_path))
        gt = (gt[..., 0] if gt.ndim == 3 else gt) == 255
        m = dg.nucleus_mask(rgb)
        ious.append(dg.mask_iou(m, gt))
        ratios.append(ext(m) / ext(gt))
    check = {"nucleus_iou_mean": float(np.mean(ious)), "nucleus_iou_median": float(np.median(ious)),
             "extent_ratio_median": float(np.nanmedian(ratios)),
             "extent_within_20pct": float(np.nanmean(np.abs(np.array(ratios) - 1) <= 0.2)), "n": len(ious)}
    return check, ious, ratios


def image_stats(row) -> dict:
    """Size, mean colour and the nucleus's extent as a share of the side, of one image."""
    rgb = np.asarray(read_image(row.path))
    m = dg.nucleus_mask(rgb)
    ys, xs = np.nonzero(m)
    extent = (max(np.ptp(ys), np.ptp(xs)) + 1) / max(rgb.shape[:2]) if len(ys) else np.nan
    return {"domain": row.domain, "label": row.label, "width": rgb.shape[1], "R": rgb[..., 0].mean(),
            "G": rgb[..., 1].mean(), "B": rgb[..., 2].mean(), "nucleus extent / side": extent}


def shift_stats(table: pd.DataFrame, per_domain: int) -> pd.DataFrame:
    """:func:`image_stats` of ``per_domain`` images of every domain (the shifts, measured)."""
    rows = pd.concat([subsample(g, per_domain, 0) for _, g in table.groupby("domain")])
    return pd.DataFrame([image_stats(r) for r in rows.itertuples()])


def arrays(rows: pd.DataFrame, size: int, scale: bool, stain_norm: bool) -> dg.Arrays:
    """Decode and preprocess ``rows`` into uint8 tensors with class and domain indices."""
    ims = [dg.preprocess(np.asarray(read_image(p)), size, SCALE if scale else None, stain_norm)[0]
           for p in rows["path"]]
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([CLASSES.index(c) for c in rows["label"]])
    d = torch.tensor([DOMAIN_IDS.index(v) for v in rows["domain"]])
    return dg.Arrays(x, y, d)


def domain_parts(table: pd.DataFrame, sizes: dict) -> dict:
    """``(domain, role) -> rows``, role train / val / heldout (PBC: its test split; BCCD and
    Zheng: all their images), plus Matek's neutrophils (heldout: its test split, the probe;
    train / val: for the all-domains model); the profile's per-class caps."""
    def pick(domain, split):
        rows = table[(table["domain"] == domain) & (table["split"].isin(split))]
        cap = (sizes[f"pbc_{split[0]}_cap"] if domain == "pbc" and len(split) == 1 else
               None if domain == "pbc" else sizes["small_cap"])
        return subsample(rows, cap, 0).reset_index(drop=True)

    parts = {}
    for dom in DOMAINS:
        parts[dom, "train"], parts[dom, "val"] = pick(dom, ["train"]), pick(dom, ["val"])
        parts[dom, "heldout"] = pick(dom, ["test"]) if dom == "pbc" else pick(dom, ["train", "val", "test"])
    for dom in PROBE:  # test: the probe of every LODO model; train / val: the all-domains model's
        for role, split in (("heldout", "test"), ("train", "train"), ("val", "val")):
            parts[dom, role] = subsample(table[(table["domain"] == dom) & (table["split"] == split)],
                                         sizes["probe_cap"], 0).reset_index(drop=True)
    return parts


def join(cache: dict, keys, prep) -> dg.Arrays:
    a = [cache[k, prep] for k in keys]
    return dg.Arrays(torch.cat([v.x for v in a]), torch.cat([v.y for v in a]), torch.cat([v.d for v in a]))


# --------------------------------------------------------------------------- protocol
def score(model, a: dg.Arrays) -> tuple[dict, torch.Tensor]:
    """Macro-F1 (shared classes), accuracy and per-class recall of ``model`` on ``a``."""
    pred = dg.predict_probs(model, a.x).argmax(1)
    out = {"macro_f1": dg.macro_f1(a.y, pred, LABELS), "accuracy": float((pred == a.y).float().mean()),
           "n": len(a)}
    for c in CLASSES:
        if (a.y == CLASSES.index(c)).any():
            out[f"recall {c}"] = float((pred[a.y == CLASSES.index(c)] == CLASSES.index(c)).float().mean())
    return out, pred


def as_used(res: dg.TrainResult, method: str, x_target: torch.Tensor):
    """The model of a row as it is scored: SWA weights, or BN adapted to the target images."""
    model = res.swa_model if method.endswith("+ SWA") else res.model
    return dg.adapt_bn(model, x_target) if method.endswith("TTA-BN") else model


def lodo(cache, recipes, seeds, sizes, out: Path, resume: bool = False, log=print):
    """Leave one domain out, for every seed and recipe: ``(scores, trained, predictions)``.
    Each training keeps its state in ``out/dg_runs/<recipe>_without_<domain>_seed<seed>``."""
    rows, trained, predictions, cv_sets = [], {}, {}, {}
    start = time.perf_counter()
    for seed in seeds:
        for held in DOMAINS:
            train_doms = [d for d in DOMAINS if d != held]
            for recipe in recipes:
                sc = (recipe.scale_norm, recipe.stain_norm)
                tr = join(cache, [(d, "train") for d in train_doms], sc)
                va = join(cache, [(d, "val") for d in train_doms], sc)
                res = dg.train_dg(recipe, tr, va, len(CLASSES), LABELS, sizes["epochs"],
                                  batch_size=sizes["batch_size"], seed=seed, resume=resume,
                                  out_dir=out / "dg_runs" / f"{slug(recipe.name)}_without_{held}_seed{seed}")
                trained[recipe.name, held, seed] = res
                variants = {recipe.name: res.model}
                if recipe.swa:
                    variants[f"{recipe.name} + SWA"] = res.swa_model
                if recipe.norm == "bn" and recipe.name in ("ERM-BN", "combined"):
                    variants[f"{recipe.name} + TTA-BN"] = dg.adapt_bn(res.model, cache[(held, "heldout"), sc].x)
                if (held, sc) not in cv_sets:  # the held-out domain but its test split, once per preprocessing
                    cv_sets[held, sc] = join(cache, [(held, "train"), (held, "val")], sc)
                cv = cv_sets[held, sc]
                for name, model in variants.items():
                    m, pred = score(model, cache[(held, "heldout"), sc])
                    probe, _ = score(model, cache[("matek", "heldout"), sc])
                    predictions[name, held, seed] = pred
                    # selection score: the training domains' validation images, scored as the row is used
                    val_pred = (dg.predict_per_domain(res.model, va) if name.endswith("TTA-BN")
                                else dg.predict_probs(model, va.x).argmax(1))
                    cv_model = dg.adapt_bn(res.model, cv.x) if name.endswith("TTA-BN") else model
                    rows.append({"method": name, "held out": held, "seed": seed, **m,
                                 "matek neutrophil recall": probe["recall neutrophil"],
                                 "val macro-F1": dg.macro_f1(va.y, val_pred, LABELS),
                                 "LODO-CV macro-F1": dg.macro_f1(cv.y, dg.predict_probs(cv_model, cv.x).argmax(1),
                                                                 LABELS),
                                 "train s": res.train_time_s, "best epoch": res.best_epoch})
            log(f"seed {seed}, held out {held}: done at {(time.perf_counter() - start) / 60:.1f} min")
    return pd.DataFrame(rows), trained, predictions


def lodo_table(scores: pd.DataFrame) -> dict:
    """The leave-one-domain-out table, the headline row (chosen on the training domains'
    validation images) and the all-domains model's row (chosen by LODO-CV on the held-out
    domains' non-test images): ``order, per_fold, acc, lodo, val_mean, best, erm_f1,
    best_f1, cv_mean, deploy``."""
    order = list(dict.fromkeys(scores["method"]))
    per_fold = scores.pivot_table(index="method", columns="held out", values="macro_f1",
                                  aggfunc="mean").reindex(order)
    per_fold = per_fold[list(DOMAINS)]
    per_fold["mean"] = per_fold.mean(axis=1)
    acc = scores.pivot_table(index="method", columns="held out", values="accuracy", aggfunc="mean").reindex(order)
    table = pd.concat({"macro-F1": per_fold, "accuracy": acc[list(DOMAINS)]}, axis=1)
    table[("Matek", "neutrophil recall")] = scores.groupby("method")["matek neutrophil recall"].mean().reindex(order)
    table[("training domains", "val macro-F1")] = scores.groupby("method")["val macro-F1"].mean().reindex(order)
    table[("held-out domain, train + val", "LODO-CV macro-F1")] = (
        scores.groupby("method")["LODO-CV macro-F1"].mean().reindex(order))
    val_mean = table[("training domains", "val macro-F1")]
    cv_mean = table[("held-out domain, train + val", "LODO-CV macro-F1")]
    best = val_mean.drop(list(DESIGNED_ON_HELDOUT)).idxmax()  # the headline: chosen on validation only
    deploy = cv_mean.drop(list(DESIGNED_ON_HELDOUT)).idxmax()  # the all-domains model's row
    return {"order": order, "per_fold": per_fold, "acc": acc, "lodo": table, "val_mean": val_mean,
            "best": best, "erm_f1": per_fold.loc["ERM-BN", "mean"], "best_f1": per_fold.loc[best, "mean"],
            "cv_mean": cv_mean, "deploy": deploy}


def add_test_split(parts, cache, held: str, sc) -> torch.Tensor:
    """Add ``(held, "test")``, the domain's test split, to ``parts`` and (preprocessing ``sc``)
    ``cache``, sliced from its held-out arrays (no image read again); the selection mask."""
    sel = torch.tensor((parts[held, "heldout"]["split"] == "test").to_numpy())  # all of PBC's held-out rows
    parts[held, "test"] = parts[held, "heldout"][sel.numpy()].reset_index(drop=True)
    heldout = cache[(held, "heldout"), sc]
    cache[(held, "test"), sc] = dg.Arrays(heldout.x[sel], heldout.y[sel], heldout.d[sel])
    return sel


def in_domain_ceiling(parts, cache, recipe, best, predictions, seeds, sizes, out: Path, resume=False):
    """The headline row's recipe trained on each domain's own training split and tested on
    its test split, against the LODO models on the same images: ``(ceiling, per-seed rows)``.
    Adds ``(domain, "test")`` to ``parts`` and ``cache``."""
    sc = (recipe.scale_norm, recipe.stain_norm)
    rows = []
    for held in DOMAINS:
        test_keys = (held, "test")
        sel = add_test_split(parts, cache, held, sc)
        y_test = cache[test_keys, sc].y
        for seed in seeds:
            res = dg.train_dg(recipe, cache[(held, "train"), sc], cache[(held, "val"), sc], len(CLASSES),
                              LABELS, sizes["epochs"], batch_size=sizes["batch_size"], seed=seed, resume=resume,
                              out_dir=out / "dg_runs" / f"ceiling_{slug(recipe.name)}_{held}_seed{seed}")
            own, _ = score(as_used(res, best, cache[test_keys, sc].x), cache[test_keys, sc])
            row = {"domain": held, "seed": seed, "test images": own["n"], "in-domain macro-F1": own["macro_f1"],
                   "in-domain accuracy": own["accuracy"], "train s": res.train_time_s}
            for name in dict.fromkeys([best, "ERM-BN + TTA-BN", "ERM-BN"]):
                pred = predictions[name, held, seed][sel]
                row[f"cross-domain {name}"] = dg.macro_f1(y_test, pred, LABELS)
            rows.append(row)
    ceiling = pd.DataFrame(rows).groupby("domain", sort=False).mean(numeric_only=True).drop(columns="seed")
    ceiling["share of ceiling"] = ceiling[f"cross-domain {best}"] / ceiling["in-domain macro-F1"]
    ceiling.loc["mean"] = ceiling.mean()
    return ceiling, rows


def chance_level(parts, cache) -> float:
    """Mean held-out macro-F1 of a uniform random guess among the model's classes."""
    guess = np.random.default_rng(0)
    return float(np.mean([dg.macro_f1(cache[(h, "heldout"), PREP[0]].y,
                                      torch.from_numpy(guess.integers(0, len(CLASSES), len(parts[h, "heldout"]))),
                                      LABELS) for h in DOMAINS]))


# --------------------------------------------------------------------------- all-domains model
def all_domains_model(parts, cache, recipe: dg.Recipe, row: str, seeds, sizes, out: Path, resume=False):
    """Row ``row``'s recipe (:data:`ALL_DOMAINS_RULE` picks it) trained on every domain's
    training split (PBC, BCCD, Zheng and Matek's neutrophils), its epoch selected on all their
    validation splits: the model for a hospital the book has never seen. Scored on each
    domain's own test split, used as the row is (TTA-BN: adapted to each test domain).
    ``(TrainResult, per-domain rows)``."""
    sc = (recipe.scale_norm, recipe.stain_norm)
    for d in DOMAINS:
        if ((d, "test"), sc) not in cache:
            add_test_split(parts, cache, d, sc)
    res = dg.train_dg(recipe, join(cache, [(d, "train") for d in DOMAIN_IDS], sc),
                      join(cache, [(d, "val") for d in DOMAIN_IDS], sc), len(CLASSES), LABELS, sizes["epochs"],
                      batch_size=sizes["batch_size"], seed=seeds[0], resume=resume,
                      out_dir=out / "dg_runs" / f"all_domains_{slug(recipe.name)}_seed{seeds[0]}")
    rows = []
    for dom in DOMAIN_IDS:
        test = cache[(dom, "test") if dom in DOMAINS else (dom, "heldout"), sc]
        m, _ = score(as_used(res, row, test.x), test)
        rows.append({"domain": dom, "test images": m["n"], "macro-F1": m["macro_f1"] if dom in DOMAINS else np.nan,
                     "accuracy": m["accuracy"], **{k: v for k, v in m.items() if k.startswith("recall")}})
    return res, rows


#: The chapter's reference checkpoints (issue 22): ERM-BN and the headline row (whatever the
#: training domains' validation chose) without each domain, and the all-domains model.
REFERENCE_NAMES = (*(f"erm_bn_without_{d}" for d in DOMAINS), *(f"headline_without_{d}" for d in DOMAINS),
                   "all_domains")


def split_sha() -> str:
    return hashlib.sha256(b"".join((SPLITS_DIR / f"{n}.csv").read_bytes()
                                   for n in ["pbc", "bccd_crops", "zheng", "matek"])).hexdigest()


def save_models(out: Path, P: Profile, parts, trained, r, recs, seeds, all_res, size: int) -> dict[str, Path]:
    """Each of :data:`REFERENCE_NAMES` as a run folder ``<out>/dg_models/<name>/``: the weights
    as the row uses them (SWA rows: the average) in the ``dg_classifier`` checkpoint format,
    whose metadata says the row, whether it adapts BatchNorm to the target and the domains it
    trained on, and ``results.json`` (history, hashes, hardware, and for the headline the
    whole selection table) from which ``leukemia-core reference publish`` makes model cards."""
    seed, best = seeds[0], r["best"]
    val_table = r["scores"].groupby("method", sort=False)[["val macro-F1", "LODO-CV macro-F1", "macro_f1"]].mean()
    selection = {"rule": HEADLINE_RULE, "all_domains_rule": ALL_DOMAINS_RULE, "excluded": sorted(DESIGNED_ON_HELDOUT),
                 "headline": best, "all_domains": r["deploy"],
                 "rows": {m: {"val_macro_f1": float(v["val macro-F1"]), "lodo_cv_macro_f1": float(v["LODO-CV macro-F1"]),
                              "heldout_macro_f1": float(v["macro_f1"])} for m, v in val_table.iterrows()}}
    jobs = {}
    for prefix, row in (("erm_bn", "ERM-BN"), ("headline", best)):
        for held in DOMAINS:
            jobs[f"{prefix}_without_{held}"] = (row, trained[recipe_of(row, recs).name, held, seed],
                                                [d for d in DOMAINS if d != held], held)
    jobs["all_domains"] = (r["deploy"], all_res, DOMAIN_IDS, None)
    folders = {}
    for name, (row, res, train_doms, held) in jobs.items():
        recipe = recipe_of(row, recs)
        folder = out / "dg_models" / name
        model = res.swa_model if row.endswith("+ SWA") else res.model
        dg.save_dg_checkpoint(folder / "model.safetensors", model, CLASSES, size,
                              SCALE if recipe.scale_norm else None, recipe,
                              {"row": row, "adapt_bn": row.endswith("TTA-BN"), "trained_on": list(train_doms),
                               "held_out": held})
        used = pd.concat([parts[d, role] for d in train_doms for role in ("train", "val")], ignore_index=True)
        results_path = folder / "results.json"
        write_results(results_path, overwrite=True, kind="dg_training", chapter=CHAPTER, method=row,
                      model="efficientnet_lite0", dataset=DATASET if held else "all:pbc,bccd_crops,zheng,matek",
                      datasets=[LICENCE_KEYS[d] for d in train_doms], profile=P.name, seeds=[seed],
                      config={"recipe": recipe.to_dict(), "row": row, "trained_on": list(train_doms),
                              "held_out": held, "image_size": size, "seed": seed,
                              **({"selection": selection} if name.startswith("headline") or held is None else {})},
                      metrics={"best_epoch": res.best_epoch, "monitor": "val macro_f1 (training domains)"},
                      history=res.history, train_time_s=float(sum(h.get("train_time_s", 0.0) for h in res.history)),
                      wall_time_s=session_wall_time(results_path, res.history, res.train_time_s),
                      split_sha256=split_sha(), data_sha256=content_hash(used))
        folders[name] = folder
    return folders


# --------------------------------------------------------------------------- results
def lodo_summary(s: pd.DataFrame) -> dict:
    """One row's LODO folds (``scores`` rows) as the results files' ``lodo`` metrics: means
    over folds, and per held-out domain; the selection scores' means where ``s`` has them."""
    out = {"mean_macro_f1": float(s["macro_f1"].mean()), "mean_accuracy": float(s["accuracy"].mean())}
    for key, col in (("mean_val_macro_f1", "val macro-F1"), ("mean_lodo_cv_macro_f1", "LODO-CV macro-F1")):
        if col in s:
            out[key] = float(s[col].mean())
    return (out | {f"{h}_macro_f1": float(g["macro_f1"].mean()) for h, g in s.groupby("held out")}
            | {f"{h}_accuracy": float(g["accuracy"].mean()) for h, g in s.groupby("held out")})


def write_dg_results(results_dir: Path, P: Profile, sizes: dict, seeds, r: dict, recs, seg_check,
                     removed, ceiling, ceiling_rows, used, wall, all_rows) -> list[Path]:
    """One JSON per row (``dg_<row>.json``), ``dg_headline.json``,
    ``dg_in_domain_ceiling.json`` and ``dg_all_domains.json`` under ``<results_dir>/<profile>/``."""
    scores, best = r["scores"], r["best"]
    folder = results_dir / P.name

    def lodo_metrics(s):
        return {"lodo": lodo_summary(s),
                "per_fold": s.drop(columns=["method"]).to_dict(orient="records"),
                "matek_neutrophil_recall": float(s["matek neutrophil recall"].mean()),
                "segmentation_check": seg_check, "removed_duplicates": len(removed)}

    def dg_config(method):
        return {"recipe": recipe_of(method, recs).to_dict(), "variant": method, "classes": CLASSES,
                "shared": SHARED, "scale_norm": SCALE.__dict__, "lab_target": dg.LAB_TARGET,
                "heldout": "pbc: test split; bccd, zheng: all images"}

    common = {"overwrite": True, "kind": "domain_generalization", "chapter": CHAPTER,
              "paper": "umer2023imbalanced", "model": "efficientnet_lite0", "pretrained": True, "profile": P.name,
              "profile_sizes": P.to_dict() | {"chapter": sizes}, "seeds": list(seeds), "split_sha256": split_sha(),
              "data_sha256": content_hash(used), "wall_time_s": wall}
    written = []
    for method in r["order"]:
        # the combined recipe was designed by sweeps that saw held-out scores: say so in its file
        selection = ({"selected_on": "test", "selection_note": "recipe designed in sweeps scored on the "
                      "held-out domains (earlier sessions); shown, never the headline"}
                     if method in DESIGNED_ON_HELDOUT else {})
        written.append(write_results(
            folder / f"dg_{slug(method)}.json", method=method, dataset=DATASET, config=dg_config(method),
            metrics=lodo_metrics(scores[scores["method"] == method]), **selection, **common))
    written.append(write_results(
        folder / "dg_headline.json", method=best, dataset=DATASET,
        selected_on="validation", selection_rule=HEADLINE_RULE,
        config=dg_config(best) | {"candidates": [m for m in r["order"] if m not in DESIGNED_ON_HELDOUT]},
        metrics=lodo_metrics(scores[scores["method"] == best]) | {"gain_over_erm_bn": float(r["best_f1"] - r["erm_f1"])},
        **common))
    written.append(write_results(
        folder / "dg_in_domain_ceiling.json", method=f"in-domain ceiling ({best})",
        dataset="pbc,bccd_crops,zheng (each on its own splits)", selected_on="validation",
        config={"recipe": recipe_of(best, recs).to_dict(), "variant": best, "classes": CLASSES, "shared": SHARED,
                "test": "each domain's test split (PBC subsampled per class as in LODO)"},
        metrics={"in_domain_macro_f1": {d: float(ceiling.loc[d, "in-domain macro-F1"]) for d in DOMAINS},
                 "mean_in_domain_macro_f1": float(ceiling.loc["mean", "in-domain macro-F1"]),
                 "headline_method": best,
                 "cross_domain_macro_f1_same_test": {d: float(ceiling.loc[d, f"cross-domain {best}"])
                                                     for d in DOMAINS},
                 "mean_share_of_ceiling": float(ceiling.loc["mean", "share of ceiling"]),
                 "per_seed": ceiling_rows},
        **common))
    written.append(write_results(
        folder / "dg_all_domains.json", method=f"all-domains model ({r['deploy']})",
        dataset="all:pbc,bccd_crops,zheng,matek (each domain's own test split)", selected_on="validation",
        selection_rule=ALL_DOMAINS_RULE,
        config={"recipe": recipe_of(r["deploy"], recs).to_dict(), "variant": r["deploy"], "classes": CLASSES,
                "shared": SHARED, "trained_on": DOMAIN_IDS, "test": "each domain's test split; Matek: its neutrophils"},
        metrics=all_domains_metrics(all_rows) | {"headline_method": r["deploy"]}, **common))
    return written


def all_domains_metrics(rows: list[dict]) -> dict:
    """The all-domains model's per-domain rows as results metrics: macro-F1 per shared-class
    domain and their mean, accuracy per domain, Matek's neutrophil recall."""
    by = {r["domain"]: r for r in rows}
    return {"in_domain_macro_f1": {d: float(by[d]["macro-F1"]) for d in DOMAINS},
            "mean_in_domain_macro_f1": float(np.mean([by[d]["macro-F1"] for d in DOMAINS])),
            "accuracy": {d: float(by[d]["accuracy"]) for d in DOMAIN_IDS},
            "matek_neutrophil_recall": float(by["matek"]["recall neutrophil"]),
            "per_domain": rows}


def top_class(predictions: dict, seeds, method: str, held: str) -> tuple[str, float]:
    """The class a row's models predict most on a held-out domain (over seeds), and its share."""
    pred = torch.cat([predictions[method, held, s] for s in seeds])
    counts = torch.bincount(pred, minlength=len(CLASSES))
    return CLASSES[int(counts.argmax())], float(counts.max() / counts.sum())


# --------------------------------------------------------------------------- figures
def example_images(table: pd.DataFrame) -> list[tuple[str, str]]:
    """``(path, title)`` of one random image per shared class of PBC, BCCD and Zheng, and four
    Matek neutrophils (a fixed generator)."""
    rng = np.random.default_rng(0)
    shown = []
    for dom in ["pbc", "bccd", "zheng", "matek"]:
        for cls in (SHARED if dom != "matek" else ["neutrophil"] * 4):
            rows = table[(table["domain"] == dom) & (table["label"] == cls)]
            shown.append((rows.iloc[int(rng.integers(len(rows)))]["path"], f"{dom}: {cls}"))
    return shown


# --------------------------------------------------------------------------- demos
HOSPITAL_NAMES = {"neutrophil": "Segmented neutrophils", "lymphocyte": "LYMPHOCYTE",
                  "monocyte": "Monocytes", "eosinophil": "eosinophil", "basophil": "Basophil"}


def predict_demo(ckpt: Path, parts: dict) -> pd.DataFrame:
    """``predict_folder --adapt-bn`` with ``ckpt`` on a folder of BCCD crops and Matek images
    of different sizes (a temporary folder); the predictions with the true class."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "unseen"
        folder.mkdir()
        demo = pd.concat([parts["bccd", "heldout"].groupby("label").head(2), parts["matek", "heldout"].head(3)])
        for i, row in enumerate(demo.itertuples()):
            Image.open(row.path).convert("RGB").save(folder / f"{i:02d}_{row.domain}.png")
        preds = predict_folder(ckpt, folder, tmp / "predictions.csv", adapt_bn=True)
    preds["path"] = preds["path"].map(lambda p: Path(p).name)
    preds.insert(1, "true", demo["label"].tolist())
    return preds


def hospital_demo(ckpt: Path, rows: pd.DataFrame) -> dict:
    """``evaluate_folder`` on ``rows`` saved one folder per class under a hospital's own class
    names (:data:`HOSPITAL_NAMES`): ``{adapt_bn: summary}`` for False and True."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "my_hospital"
        for row in rows.itertuples():
            dest = folder / HOSPITAL_NAMES[row.label]
            dest.mkdir(parents=True, exist_ok=True)
            Image.open(row.path).convert("RGB").save(dest / f"{Path(row.path).stem}.png")
        with warnings.catch_warnings():  # without --adapt-bn the CLI warns that this model expects it
            warnings.simplefilter("ignore", UserWarning)
            return {adapt: evaluate_folder(ckpt, folder, Path(tmp) / f"eval_{adapt}", adapt_bn=adapt)
                    for adapt in (False, True)}


# --------------------------------------------------------------------------- run
def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False,
        seed: int = 0, supcon_weight: float = 0.5, log=print) -> ExperimentRun:
    """The chapter's protocol. ``seeds`` None: ``[seed]`` under a one-seed profile, else the
    profile's seeds. Writes ``<results_dir>/<profile>/dg_*.json`` and the combined model
    trained without BCCD to ``<out>/dg_combined_without_bccd/model.safetensors``; training
    state under ``<out>/dg_runs/``."""
    start = time.perf_counter()
    P = profile if isinstance(profile, Profile) else get_profile(profile)
    sizes = chapter_sizes(CHAPTER, P)
    if seeds is None:
        seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
    seeds = list(seeds)
    out, results_dir = resolve_paths(P.name, out, results_dir)
    size = sizes["image_size"]

    table, removed = load_domains(data_root)
    seg_check, ious, ratios = segmentation_check(table, sizes)
    parts = domain_parts(table, sizes)
    cache = {(k, pp): arrays(rows, size, *pp) for k, rows in parts.items() for pp in PREP}

    recs = recipes(supcon_weight)
    scores, trained, predictions = lodo(cache, recs, seeds, sizes, out, resume, log)
    r = lodo_table(scores) | {"scores": scores}
    ceiling, ceiling_rows = in_domain_ceiling(parts, cache, recipe_of(r["best"], recs), r["best"], predictions,
                                              seeds, sizes, out, resume)
    chance = chance_level(parts, cache)
    all_res, all_rows = all_domains_model(parts, cache, recipe_of(r["deploy"], recs), r["deploy"], seeds, sizes,
                                          out, resume)
    models = save_models(out, P, parts, trained, r, recs, seeds, all_res, size)

    # the combined model trained without BCCD, kept for `leukemia-core predict`
    combined = recs[-1]
    ckpt = dg.save_dg_checkpoint(out / "dg_combined_without_bccd" / "model.safetensors",
                                 trained[combined.name, "bccd", seeds[0]].model, CLASSES, size,
                                 SCALE if combined.scale_norm else None, combined)

    used = pd.concat([rows for (_, role), rows in parts.items() if role != "test"], ignore_index=True)
    wall = time.perf_counter() - start
    written = write_dg_results(results_dir, P, sizes, seeds, r, recs, seg_check, removed, ceiling,
                               ceiling_rows, used, wall, all_rows)
    objects = dict(r, P=P, sizes=sizes, seeds=seeds, table=table, removed=removed, seg_check=seg_check,
                   ious=ious, ratios=ratios, parts=parts, cache=cache, recipes=recs, trained=trained,
                   predictions=predictions, ceiling=ceiling, ceiling_rows=ceiling_rows, chance=chance,
                   ckpt=ckpt, all_domains=pd.DataFrame(all_rows).set_index("domain"), models=models, results_folder=results_dir / P.name, wall_time_s=wall)
    return ExperimentRun(CHAPTER, P.name, results=written, objects=objects)


# --------------------------------------------------------------------------- the reference tier
REFERENCE_USE = ("Teaching and reproducibility: the domain-generalisation chapter's models at reference scale, "
                 "evaluated live by the book. The all-domains model is what `leukemia-core predict` and "
                 "`leukemia-core evaluate` use on a new hospital's images when no --checkpoint is given. A "
                 "research artefact, not a medical device: never for diagnosis.")
REFERENCE_LIMITS = ("Five white-cell classes (neutrophil, lymphocyte, monocyte, eosinophil, basophil) in 64 px "
                    "single-cell crops. Trained on public sources only (PBC, BCCD crops, Zheng; the all-domains "
                    "model also on Matek's neutrophils), PBC's training split capped at 600 images per class; "
                    "basophils come almost only from PBC. A hospital with another stain, microscope or crop size "
                    "can score far below the chapter's numbers: measure it on a labelled sample with "
                    "`leukemia-core evaluate --images DIR` first. The leave-one-domain-out models are for "
                    "the chapter's table, not for use.")


def reference_rows(table: pd.DataFrame) -> dict:
    """The reference evaluation's rows (:func:`domain_parts` at the ``reference`` sizes):
    ``(domain, "heldout")`` the LODO test sets, ``(domain, "test")`` each domain's own test
    split (the all-domains model's; Matek: its neutrophils)."""
    parts = domain_parts(table, chapter_sizes(CHAPTER, "reference"))
    out = {(d, "heldout"): parts[d, "heldout"] for d in DOMAINS}
    out |= {(d, "test"): parts[d, "heldout"][parts[d, "heldout"]["split"] == "test"].reset_index(drop=True)
            for d in DOMAINS}
    out |= {(d, "test"): parts[d, "heldout"] for d in PROBE}
    return out


def _eval_sets(meta: dict, rows: dict, cache: dict, per_class: int | None) -> dict[str, dg.Arrays]:
    """``{domain: images}`` a reference checkpoint is scored on, preprocessed as its metadata
    says: its held-out domain (a LODO model) or every domain's own test split (all-domains)."""
    from leukemia_core.reproducibility import reference

    pre, held = meta["preprocess"], meta["dg"].get("held_out")
    keys = [(held, "heldout")] if held else [(d, "test") for d in DOMAIN_IDS]
    prep = (pre["image_size"], bool(pre.get("scale_norm")), bool(pre.get("stain_norm")))
    out = {}
    for key in keys:
        if (key, prep, per_class) not in cache:
            part = reference.first_per_class(rows[key], "label", per_class).reset_index(drop=True)
            cache[key, prep, per_class] = (arrays(part, *prep), part)
        out[key[0]] = cache[key, prep, per_class][0]
    return out


def _checkpoint_scores(model, meta: dict, sets: dict[str, dg.Arrays]) -> dict[str, dict]:
    """:func:`score` of a reference checkpoint on each of its sets, used as its row is (a
    TTA-BN row: BatchNorm re-estimated on each set's own images first)."""
    adapt = meta["dg"].get("adapt_bn", False)
    return {d: score(dg.adapt_bn(model, a.x) if adapt else model, a)[0] for d, a in sets.items()}


def _own_scores(per_set: dict[str, dict]) -> dict:
    """What publish_smallest compares storages by: macro-F1 and accuracy per set."""
    out = {}
    for d, m in per_set.items():
        out[f"{d}_accuracy"] = m["accuracy"]
        if d in DOMAINS:
            out[f"{d}_macro_f1"] = m["macro_f1"]
    return out | {"n": sum(m["n"] for m in per_set.values())}


def publish_reference(out, data_root=None, root=None, log=print, models=None, note: str | None = None) -> list[Path]:
    """Publish the finished ``reference`` run under ``out`` (``leukemia-core run
    06_domain_generalization --profile reference --out OUT``): every model of
    :data:`REFERENCE_NAMES` from ``<out>/dg_models/<name>/`` into
    ``reference/06_domain_generalization/<name>/``, each in the smallest storage whose live
    scores stay within 0.1 point of float32
    (:func:`~leukemia_core.reproducibility.reference.publish_smallest`). ``models``: only
    these names; ``note``: how the run was made, appended to the card's command line."""
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    unknown = set(models or ()) - set(REFERENCE_NAMES)
    if unknown:
        from leukemia_core.errors import UnknownNameError

        raise UnknownNameError(f"no reference model {sorted(unknown)} in {CHAPTER}; choose from {list(REFERENCE_NAMES)}")
    table, _ = load_domains(data_root)
    rows, cache, published = reference_rows(table), {}, []
    for name in REFERENCE_NAMES:
        if models and name not in models:
            continue
        run_dir = Path(out) / "dg_models" / name
        results = reference.finished_run(run_dir, name, log)
        if results is None:
            continue
        cfg = results["config"]
        where = (f"without {cfg['held_out']} (trained on {', '.join(cfg['trained_on'])}, tested on {cfg['held_out']})"
                 if cfg["held_out"] else f"trained on every domain ({', '.join(cfg['trained_on'])})")
        common = dict(description=f"EfficientNet-Lite0 (ImageNet, fine-tuned), row '{cfg['row']}' of the "
                                  f"domain-generalisation table, {where}, {cfg['image_size']} px, seed {cfg['seed']}.",
                      command=reference.command_line(
                          f"leukemia-core run {CHAPTER} --profile reference --out {out} [--resume]", note),
                      intended_use=REFERENCE_USE, limits=REFERENCE_LIMITS, results=results, root=root)

        def score(name=name) -> dict:
            model, meta, _, _ = reference.load_reference(CHAPTER, name, root)
            return _own_scores(_checkpoint_scores(model, meta, _eval_sets(meta, rows, cache, None)))

        published.append(reference.publish_smallest(run_dir, CHAPTER, name, score, **common))
    return published


def _lodo_payload(per_fold: list[dict]) -> dict:
    """Reference LODO folds as the chapter's own ``lodo`` metrics (same keys)."""
    return {"lodo": lodo_summary(pd.DataFrame(per_fold)), "per_fold": per_fold}


def evaluate_reference(data_root=None, results_dir=None, root=None, per_class: int | None = None) -> dict:
    """Verify every reference checkpoint of the chapter against the manifest and evaluate it
    live: the LODO models on their held-out domain, the all-domains model on every domain's
    own test split. Writes ``<results_dir>/reference/dg_erm_bn.json``, ``dg_headline.json``
    (the LODO layout of the chapter's own files) and ``dg_all_domains.json``; ``per_class``:
    the first so many images per class of every set only, written under
    :func:`~leukemia_core.reproducibility.reference.evaluations_dir`.

    ``{"rows": [one per checkpoint and set], "checks": [...], "cards": {name: card},
    "groups": {"erm_bn" | "headline" | "all_domains": metrics or None}}``; a missing or corrupt
    checkpoint is a row with its message, never skipped."""
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    _, results_dir = resolve_paths("reference", None, results_dir)
    folder = reference.evaluations_dir(results_dir, per_class)
    table = rows = None
    cache, out_rows, checks, cards, groups = {}, [], [], {}, {}
    manifest = reference.read_manifest(root)
    group_of = {n: ("all_domains" if n == "all_domains" else n.rsplit("_without_", 1)[0]) for n in REFERENCE_NAMES}
    per_group: dict[str, list] = {g: [] for g in dict.fromkeys(group_of.values())}
    for name in REFERENCE_NAMES:
        chk = reference.check(CHAPTER, name, root)
        checks.append(chk)
        if chk["status"] != "verified":
            out_rows.append({"checkpoint": name, "status": chk["status"], "message": chk["message"]})
            per_group[group_of[name]].append(None)
            continue
        start = time.perf_counter()
        if table is None:
            table, _ = load_domains(data_root)
            rows = reference_rows(table)
        model, meta, _, card = reference.load_reference(CHAPTER, name, root)
        cards[name] = card
        per_set = _checkpoint_scores(model, meta, _eval_sets(meta, rows, cache, per_class))
        for d, m in per_set.items():
            out_rows.append({"checkpoint": name, "status": "verified", "row": meta["dg"]["row"], "domain": d,
                             "set": "held out" if meta["dg"].get("held_out") else "own test split",
                             "test images": m["n"], "macro-F1": m["macro_f1"] if d in DOMAINS else np.nan,
                             "accuracy": m["accuracy"], "wall s": time.perf_counter() - start})
        per_group[group_of[name]].append((name, meta, card, per_set))
    for group, items in per_group.items():
        if any(i is None for i in items):
            groups[group] = None
            continue
        names = [i[0] for i in items]
        row = items[0][1]["dg"]["row"]
        keys = [(d, "test") for d in DOMAIN_IDS] if group == "all_domains" else [(d, "heldout") for d in DOMAINS]
        used = pd.concat([reference.first_per_class(rows[k], "label", per_class) for k in keys], ignore_index=True)
        if group == "all_domains":
            per_set = items[0][3]
            metrics = all_domains_metrics([{"domain": d, "test images": m["n"],
                                            "macro-F1": m["macro_f1"] if d in DOMAINS else np.nan,
                                            "accuracy": m["accuracy"],
                                            **{k: v for k, v in m.items() if k.startswith("recall")}}
                                           for d, m in per_set.items()]) | {"headline_method": row}
        else:
            metrics = _lodo_payload([{"held out": d, **m} for _, meta, _, ps in items for d, m in ps.items()])
            if group == "headline":
                metrics["headline_method"] = row
        groups[group] = metrics
        write_results(folder / f"dg_{group}.json", overwrite=True, kind="reference_evaluation", chapter=CHAPTER,
                      paper="umer2023imbalanced", reference=names, method=row, model="efficientnet_lite0",
                      dataset=DATASET if group != "all_domains" else "all:pbc,bccd_crops,zheng,matek",
                      profile="reference", seeds=[int(items[0][2].get("config", {}).get("seed", 0))],
                      **({"selected_on": "validation",
                          "selection_rule": HEADLINE_RULE + " (in the reference run)"} if group != "erm_bn" else {}),
                      config={"checkpoints": {n: {"sha256": manifest[f"{CHAPTER}/{n}/model.safetensors"],
                                                  "dtype": cards[n]["dtype"]} for n in names},
                              "preprocess": items[0][1]["preprocess"], "adapt_bn": items[0][1]["dg"].get("adapt_bn"),
                              "classes": CLASSES, "shared": SHARED},
                      metrics=metrics, split_sha256=split_sha(), data_sha256=content_hash(used),
                      training={n: {k: cards[n].get(k) for k in ("wall_time_s", "train_time_s", "epochs_run",
                                                                 "selected_epoch", "git_sha", "hardware")}
                                for n in names},
                      wall_time_s=float(sum(r.get("wall s", 0.0) for r in out_rows if r.get("checkpoint") in names)))
    return {"rows": out_rows, "checks": checks, "cards": cards, "groups": groups}


#: Issue 22's targets for the reference tier, fixed before any reference run.
TARGET_MEAN_F1 = 0.75
TARGET_GAIN = 0.10


def reference_findings(ref: dict) -> dict:
    """The reference section's sentences and tables from :func:`evaluate_reference`'s output:
    ``sentences`` (``lodo``, ``all_domains``), ``selection`` (the reference run's own table of
    validation and held-out macro-F1 per row, from the headline card) and ``folds``."""
    g, out = ref["groups"], {"sentences": {}, "selection": None, "folds": None}
    missing = lambda group: "not available: " + ", ".join(  # noqa: E731
        f"`{r['checkpoint']}` ({r['status']})" for r in ref["rows"] if r["status"] != "verified" and
        (r["checkpoint"] == group or r["checkpoint"].startswith(group + "_without"))) + " (how to make them: above)."
    if g.get("erm_bn") and g.get("headline"):
        h, e = g["headline"]["lodo"], g["erm_bn"]["lodo"]
        row = g["headline"]["headline_method"]
        gain = h["mean_macro_f1"] - e["mean_macro_f1"]
        met_f1, met_gain = h["mean_macro_f1"] >= TARGET_MEAN_F1, gain >= TARGET_GAIN
        folds = pd.DataFrame({name: {d: m[f"{d}_macro_f1"] for d in DOMAINS} | {"mean": m["mean_macro_f1"]}
                              for name, m in ((f"{row} (headline)", h), ("ERM-BN", e))}).T
        out["folds"] = folds
        out["sentences"]["lodo"] = (
            f"Reference models, held-out macro-F1 (each model tested on the domain it never saw): the headline row "
            f"**{row}**, chosen by the training domains' validation macro-F1 in the reference run, reaches a mean of "
            f"{h['mean_macro_f1']:.3f} (" + ", ".join(f"{d} {h[f'{d}_macro_f1']:.3f}" for d in DOMAINS)
            + f"); ERM-BN {e['mean_macro_f1']:.3f}"
            + (" (the validation rule chose ERM-BN itself, so the two rows are the same models)"
               if row == "ERM-BN" else f", a difference of {100 * gain:+.1f} points")
            + f". The issue's targets: a mean of at least {TARGET_MEAN_F1:.2f}, "
            + ("**met**" if met_f1 else "**not met**")
            + f"; at least {100 * TARGET_GAIN:+.0f} points over ERM-BN, " + ("**met**." if met_gain else "**not met**."))
    else:
        out["sentences"]["lodo"] = "The reference leave-one-domain-out models are " + missing(
            "headline" if not g.get("headline") else "erm_bn")
    a = g.get("all_domains")
    sel_card = ref["cards"].get("all_domains") or {}
    cv_estimate = (((sel_card.get("config") or {}).get("selection") or {}).get("rows", {})
                   .get(a["headline_method"] if a else None, {}).get("heldout_macro_f1"))
    if a:
        out["sentences"]["all_domains"] = (
            f"The all-domains model (row {a['headline_method']}, chosen by LODO-CV in the reference run) on each "
            f"domain's own test split: macro-F1 "
            + ", ".join(f"{d} {a['in_domain_macro_f1'][d]:.3f}" for d in DOMAINS)
            + f" (mean {a['mean_in_domain_macro_f1']:.3f}); Matek neutrophils recalled "
            f"{a['matek_neutrophil_recall']:.1%}. These domains were in its training data, so these are in-domain "
            f"numbers; the estimate for a hospital it has never seen is its recipe's leave-one-domain-out score"
            + (f", {cv_estimate:.3f} mean held-out macro-F1 in the reference run (same recipe, one domain left out "
               f"each time)." if cv_estimate is not None else "."))
    else:
        out["sentences"]["all_domains"] = "The all-domains model is " + missing("all_domains")
    card = ref["cards"].get(f"headline_without_{next(iter(DOMAINS))}") or ref["cards"].get("all_domains")
    sel = (card or {}).get("config", {}).get("selection")
    if sel:
        out["selection"] = pd.DataFrame(sel["rows"]).T.rename(columns={
            "val_macro_f1": "training domains' val macro-F1 (headline rule)",
            "lodo_cv_macro_f1": "LODO-CV macro-F1 (all-domains rule)",
            "heldout_macro_f1": "held-out macro-F1 (reference run)"})
    return out
