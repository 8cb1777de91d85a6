"""Chapter 03 (``03_baseline``): the plain classifiers that set the bar on PBC.

Two models, the same data, split, transforms, loop and selection rule, over seeds:

- the profile's small CNN (``convnext_atto`` under ``ci``) trained **from scratch** for the
  profile's epochs;
- EfficientNet-Lite0 **fine-tuned from ImageNet** for the chapter's ``finetune_epochs``,
  at half the profile's learning rate.

Each (model, seed) is one :func:`~leukemia_core.pipeline.train_classifier` run in
``<out>/pbc_<model>_s<seed>/`` (scratch) or ``<out>/pbc_<model>_imagenet_s<seed>/``
(fine-tuned), which later chapters (09, 10) and ``make explore`` read. The seeds of one
model are combined into ``<results_dir>/<profile>/baseline_<model>.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from leukemia_core.config import Profile, chapter_sizes, get_profile
from leukemia_core.errors import UnknownNameError
from leukemia_core.experiments import ExperimentRun, resolve_paths
from leukemia_core.pipeline import RunResult, train_classifier
from leukemia_core.reproducibility.registry import combine_seed_results, load_claims

CHAPTER = "03_baseline"
SCRATCH = "ConvNeXt-Atto (scratch)"
PRETRAINED = "EfficientNet-Lite0 (ImageNet, fine-tuned)"


def settings(profile: str | Profile = "ci", seed: int = 0, scratch_model: str | None = None,
             pretrained_model: str = "efficientnet_lite0", epochs: int | None = None,
             finetune_epochs: int | None = None, image_size: int | None = None,
             train_per_class: int | None = None) -> dict:
    """The chapter's parameters with every ``None`` replaced by the profile's value:
    ``profile`` (a :class:`Profile`, ``image_size`` and the chapter's ``train_per_class``
    cap applied as its ``max_train_per_class``), ``scratch_model``, ``epochs`` (scratch),
    ``finetune_epochs``, ``pretrained_model`` and ``seed``."""
    overrides = {"image_size": image_size} if image_size else {}
    if isinstance(profile, Profile):
        P = profile.replace(**overrides) if overrides else profile
    else:
        P = get_profile(profile, **overrides)
    sizes = chapter_sizes(CHAPTER, P)
    cap = train_per_class or sizes["train_per_class"]
    if cap:
        P = P.replace(max_train_per_class=cap)
    return dict(profile=P, seed=seed, scratch_model=scratch_model or P.model, pretrained_model=pretrained_model,
                epochs=epochs or P.epochs, finetune_epochs=finetune_epochs or sizes["finetune_epochs"])


def describe(cfg: dict) -> str:
    """One line: the sizes a run with these :func:`settings` trains with."""
    P = cfg["profile"]
    return (f"profile {P.name}: {P.image_size}px, batch {P.batch_size}, {cfg['epochs']} epochs from scratch, "
            f"{cfg['finetune_epochs']} fine-tuning; per-class caps train={P.max_train_per_class} "
            f"eval={P.max_eval_per_class}")


def resolve_seeds(seeds, seed: int, P: Profile) -> list[int]:
    """``seeds`` as given; ``None``: the ``seed`` parameter if the profile trains one seed,
    else the profile's seeds."""
    if seeds is None:
        seeds = [seed] if len(P.seeds) == 1 else list(P.seeds)
    return [int(s) for s in seeds]


def model_specs(cfg: dict) -> dict[str, dict]:
    """Display name -> what :func:`train_classifier` gets (model, profile, pretrained) and
    the run folder's stem under ``out``."""
    P = cfg["profile"]
    return {
        SCRATCH: dict(model=cfg["scratch_model"], profile=P.replace(epochs=cfg["epochs"]), pretrained=False,
                      folder=f"pbc_{cfg['scratch_model']}"),
        PRETRAINED: dict(model=cfg["pretrained_model"], profile=P.replace(epochs=cfg["finetune_epochs"], lr=P.lr / 2),
                         pretrained=True, folder=f"pbc_{cfg['pretrained_model']}_imagenet"),
    }


def train_models(specs: dict[str, dict], seeds: list[int], out: Path, data_root=None,
                 resume: bool = False) -> dict[str, list[RunResult]]:
    """Every model of ``specs`` over ``seeds`` (model by model, seed by seed), each in its
    own run folder ``<out>/<folder>_s<seed>/`` with its ``results.json``."""
    all_runs: dict[str, list[RunResult]] = {name: [] for name in specs}
    for name, spec in specs.items():
        for s in seeds:
            run_dir = Path(out) / f"{spec['folder']}_s{s}"
            all_runs[name].append(train_classifier(
                "pbc", spec["model"], spec["profile"], root=data_root, seed=s, pretrained=spec["pretrained"],
                out_dir=run_dir, results_path=run_dir / "results.json", overwrite=True, resume=resume,
                progress=False))
    return all_runs


def run(profile="ci", seeds=None, data_root=None, out=None, results_dir=None, resume=False, *,
        seed: int = 0, scratch_model: str | None = None, pretrained_model: str = "efficientnet_lite0",
        epochs: int | None = None, finetune_epochs: int | None = None,
        image_size: int | None = None, train_per_class: int | None = None) -> ExperimentRun:
    """Train both baselines over the seeds and register one results JSON per model,
    ``<results_dir>/<profile>/baseline_<model>.json`` (all seeds combined).

    ``objects``: ``settings`` (see :func:`settings`), ``seeds``, ``specs``, ``all_runs``
    (name -> one :class:`~leukemia_core.pipeline.RunResult` per seed), ``runs`` (name ->
    the first seed's run, for the figures), ``mean_acc`` / ``mean_f1`` (name -> mean test
    accuracy / macro-F1 over seeds), ``best_name`` (the better model by mean test
    accuracy), ``summary`` (:func:`summary_table`) and ``registered`` (the results JSONs)."""
    cfg = settings(profile, seed, scratch_model, pretrained_model, epochs, finetune_epochs, image_size,
                   train_per_class)
    P = cfg["profile"]
    out, results_dir = resolve_paths(P.name, out, results_dir)
    seeds = resolve_seeds(seeds, seed, P)
    specs = model_specs(cfg)
    all_runs = train_models(specs, seeds, out, data_root=data_root, resume=resume)
    registered = [combine_seed_results([r.results_path for r in all_runs[name]],
                                       results_dir / P.name / f"baseline_{spec['model']}.json",
                                       chapter=CHAPTER, paper="pbc_baseline", method=name)
                  for name, spec in specs.items()]
    mean_acc = {name: sum(r.test["accuracy"] for r in rs) / len(rs) for name, rs in all_runs.items()}
    mean_f1 = {name: sum(r.test["macro_f1"] for r in rs) / len(rs) for name, rs in all_runs.items()}
    objects = dict(settings=cfg, profile=P, seeds=seeds, specs=specs, all_runs=all_runs,
                   runs={name: rs[0] for name, rs in all_runs.items()},  # figures show the first seed
                   mean_acc=mean_acc, mean_f1=mean_f1, best_name=max(mean_acc, key=mean_acc.get),
                   summary=summary_table(all_runs), registered=registered, out=out)
    return ExperimentRun(CHAPTER, P.name, results=registered, objects=objects)


# --------------------------------------------------------------------------- tables for the text
def mean_std(values) -> str:
    """``"mean ± std"`` as percentages (the mean alone for one value)."""
    s = pd.Series(list(values), dtype=float)
    return f"{s.mean():.2%}" + (f" ± {s.std():.2%}" if len(s) > 1 else "")


def summary_table(all_runs: dict[str, list[RunResult]]) -> pd.DataFrame:
    """One row per model: test metrics as mean ± std over seeds, and the first seed's
    test-set size, epochs run, training time and normalisation source."""
    return pd.DataFrame([{
        "model": name, "seeds": len(rs),
        "test accuracy": mean_std(r.test["accuracy"] for r in rs),
        "test macro-F1": mean_std(r.test["macro_f1"] for r in rs),
        "balanced accuracy": mean_std(r.test["balanced_accuracy"] for r in rs),
        "test images": rs[0].test["n"], "epochs run": len(rs[0].fit.history),
        "train time per seed (min)": f"{sum(h['train_time_s'] for h in rs[0].fit.history) / 60:.1f}",
        "normalisation": rs[0].data.norm_source,
    } for name, rs in all_runs.items()]).set_index("model")


def top_confusions(run: RunResult, n: int = 5) -> pd.DataFrame:
    """The ``n`` most frequent (true, predicted) pairs off the diagonal of ``run``'s test
    confusion matrix, with their image counts."""
    classes = run.data.classes
    cm = pd.DataFrame(run.test["confusion_matrix"], index=classes, columns=classes)
    pairs = cm.stack().rename("images").rename_axis(["true", "predicted"]).reset_index()
    return pairs[pairs["true"] != pairs["predicted"]].sort_values("images", ascending=False).head(n)


def worst_errors(run: RunResult, n: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(wrong, worst)``: ``run``'s misclassified test images and the ``n`` most confident
    of them."""
    wrong = run.predictions[run.predictions["label"] != run.predictions["pred"]]
    return wrong, wrong.sort_values("confidence", ascending=False).head(n)


def anchors_table(res: ExperimentRun) -> pd.DataFrame:
    """The published PBC / BloodMNIST numbers (``results/claims.yaml``) and this run's mean
    test accuracy of each model."""
    P = res["profile"]
    return pd.DataFrame([
        {"result": a["statement"], "accuracy": a["value"], "source": a["source"]}
        for a in load_claims()["papers"]["pbc_baseline"]["anchors"]
    ] + [{"result": f"this book, {name} ({P.image_size} px, {P.name} profile)",
          "accuracy": res["mean_acc"][name], "source": f"measured above, mean of {len(rs)} seed(s)"}
         for name, rs in res["all_runs"].items()])


def comparison_text(res: ExperimentRun) -> tuple[str, str]:
    """Two sentences for the takeaways: the gap in macro-F1 between the models against the
    spread over seeds, and whether any model is near chance (a bullet, or one that says
    both are well above it)."""
    P, seeds, cfg = res["profile"], res["seeds"], res["settings"]
    all_runs, mean_f1, best_name = res["all_runs"], res["mean_f1"], res["best_name"]
    K = len(res["runs"][SCRATCH].data.classes)
    other_name = next(n for n in res["mean_acc"] if n != best_name)
    gap = mean_f1[best_name] - mean_f1[other_name]
    spread = [pd.Series([r.test["macro_f1"] for r in rs]).std() for rs in all_runs.values()] if len(seeds) > 1 else []
    if spread:
        gap_text = (f"the gap in macro-F1 to {other_name} ({gap:+.3f}) is "
                    + ("larger than" if abs(gap) > max(spread) else "within")
                    + f" the seed-to-seed spread (standard deviation up to {max(spread):.3f} over {len(seeds)} seeds)")
    else:
        gap_text = (f"its macro-F1 differs from {other_name}'s by {gap:+.3f}, on one seed: "
                    "the spread over seeds is not measured here (the `full` profile trains three)")
    near = [n for n in mean_f1 if mean_f1[n] < 2 / K]  # below twice the chance level
    chance_text = (
        f"- **Near chance:** {' and '.join(near)} {'is' if len(near) == 1 else 'are'} below twice the chance level of "
        f"{1 / K:.1%} in macro-F1. The {P.name} profile trains on at most {P.max_train_per_class or 'all'} images per "
        f"class for {cfg['epochs']} epoch(s) at {P.image_size} px: it tests the code path, not the method. Run the "
        "`ci` or `full` profile for a real baseline.\n" if near else
        f"- Both models score above twice the chance level of {1 / K:.1%} ({K} classes) in macro-F1.\n")
    return gap_text, chance_text


# --------------------------------------------------------------------------- reference tier
def reference_rows(data_root=None, results_dir=None, root=None, per_class: int | None = None) -> dict:
    """The chapter's reference checkpoints (issue 18), each verified against the manifest and
    evaluated live on the PBC test split (``<results_dir>/reference/baseline_<model>.json``;
    ``per_class``: the first so many test images per class only, see
    :func:`~leukemia_core.reproducibility.reference.test_per_class`).

    ``{"rows": [...], "logs": {label: training history}, "checks": [reference.check rows]}``;
    a missing or corrupt checkpoint is a row with its message, never skipped."""
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    _, results_dir = resolve_paths("reference", None, results_dir)
    labels = {"convnext_atto": SCRATCH, "efficientnet_lite0": PRETRAINED}
    rows, logs, checks = [], {}, []
    for name in reference.EXPECTED[CHAPTER]:
        chk = reference.check(CHAPTER, name, root)
        checks.append(chk)
        row = {"model": labels.get(name, name), "reference": f"reference/{CHAPTER}/{name}", "status": chk["status"]}
        if chk["status"] == "verified":
            data = json.loads(reference.evaluate_classifier(CHAPTER, name, data_root, results_dir, root,
                                                            per_class=per_class).read_text())
            test, train = data["metrics"]["test"], data["training"]
            row.update({"test accuracy": test["accuracy"], "test macro-F1": test["macro_f1"],
                        "test images": test["n"], "epochs": train["epochs_run"],
                        "training (h)": train["wall_time_s"] / 3600, "hardware": train["hardware"]})
            logs[labels.get(name, name)] = reference.training_log(CHAPTER, name, root).to_dict("records")
        rows.append(row)
    return {"rows": rows, "logs": logs, "checks": checks}


def reference_text(ref: dict, mean_acc: dict, profile: str) -> str:
    """The takeaway on the reference checkpoints, from :func:`reference_rows` and this
    build's mean test accuracy per model (``mean_acc``)."""
    rows = {r["model"]: r for r in ref["rows"]}
    ok = [m for m in (PRETRAINED, SCRATCH) if rows.get(m, {}).get("status") == "verified"]
    missing = [m for m in (PRETRAINED, SCRATCH) if m not in ok]
    text = ("At convergence (the reference checkpoints: every training image, the sizes in their model cards), "
            "test accuracy " + ", ".join(f"{m} {rows[m]['test accuracy']:.1%}" for m in ok) + "." if ok else "")
    if len(ok) == 2:
        gap_ref = 100 * (rows[PRETRAINED]["test accuracy"] - rows[SCRATCH]["test accuracy"])
        gap_ci = 100 * (mean_acc[PRETRAINED] - mean_acc[SCRATCH])
        text += (f" ImageNet initialisation is {gap_ref:+.1f} points ahead of training from scratch there, "
                 f"{gap_ci:+.1f} under this build's `{profile}` runs.")
    if missing:
        text += f" Not available: {', '.join(missing)} ({', '.join(rows.get(m, {}).get('status', 'missing') for m in missing)})."
    return text.strip()


REFERENCE_USE = ("Teaching and reproducibility: the chapter's baseline at convergence, evaluated live by the "
                 "book. A research artefact, not a medical device: never for diagnosis.")
REFERENCE_LIMITS = ("Trained on PBC (one hospital, one scanner, CellaVision DM96, healthy donors, 8 normal "
                    "cell classes) at 128 px with this book's split: no leukemic cells, no other stain, "
                    "scanner or magnification. Expect lower accuracy elsewhere (see the "
                    "domain-generalization chapter).")


def publish_reference(out, data_root=None, root=None, seed: int = 0, log=print,
                      commands: dict[str, str] | None = None, models=None, note: str | None = None) -> list[Path]:
    """Publish the finished ``reference`` runs under ``out`` (``leukemia-core run
    03_baseline --profile reference --out OUT``) into ``reference/03_baseline/<model>/``:
    in the smallest storage (int8, fp16, fp32) whose live test metrics are within 0.1
    point of the fp32 weights' (:func:`~leukemia_core.reproducibility.reference.publish_smallest`).
    A run without its ``results.json`` (not finished) is reported through
    ``log`` and left out. ``commands`` (model -> command line) records, in the
    model card, a run started otherwise than by ``leukemia-core run``. ``models`` (model
    names, e.g. ``["convnext_atto"]``): publish only these; None: every finished run.
    ``note``: how the runs were made (niced, paused), appended to the card's command line."""
    import tempfile

    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    cfg = settings("reference", seed)
    published = []
    specs = model_specs(cfg)
    unknown = set(models or ()) - {spec["model"] for spec in specs.values()}
    if unknown:
        raise UnknownNameError(f"no reference model {sorted(unknown)} in {CHAPTER}; choose from "
                               f"{sorted(spec['model'] for spec in specs.values())}")
    for label, spec in specs.items():
        if models and spec["model"] not in models:
            continue
        run_dir = Path(out) / f"{spec['folder']}_s{seed}"
        results = reference.finished_run(run_dir, label, log)
        if results is None:
            continue
        common = dict(description=f"{label}, PBC 8 classes, {cfg['profile'].image_size} px, seed {seed}.",
                      command=(commands or {}).get(spec["model"], reference.command_line(
                          f"leukemia-core run {CHAPTER} --profile reference --out {out} [--resume]", note)),
                      intended_use=REFERENCE_USE, limits=REFERENCE_LIMITS, results=results, root=root)

        def score(model=spec["model"]) -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                test = json.loads(reference.evaluate_classifier(CHAPTER, model, data_root, tmp, root)
                                  .read_text())["metrics"]["test"]
            return {k: test[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "n")}

        published.append(reference.publish_smallest(run_dir, CHAPTER, spec["model"], score, **common))
    return published
