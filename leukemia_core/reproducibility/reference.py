"""Reference checkpoints: each method trained to convergence once, committed, evaluated live.

Layout (committed; all weights together under 150 MB)::

    reference/
      MANIFEST.sha256                      sha256sum format, every file below
      <chapter>/<name>/model.safetensors   the one checkpoint format (fp16 or int8 where allowed)
      <chapter>/<name>/model_card.json     provenance, metrics, intended use, limits, licences
      <chapter>/<name>/MODEL_CARD.md       the same, for people
      <chapter>/<name>/training_log.csv    the training curves, one row per epoch

A run is trained by ``leukemia-core run <chapter> --profile reference`` (resumable, into an
ignored work folder) and published here by :func:`publish`. Every build loads it through
:func:`load_reference`, which checks the manifest first: a missing or altered file raises
:class:`~leukemia_core.errors.CheckpointError` naming the file and the fix, never a silent skip.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path

from leukemia_core.data.dataroot import REPO_ROOT
from leukemia_core.errors import CheckpointError

REFERENCE_DIR = REPO_ROOT / "reference"
MANIFEST_NAME = "MANIFEST.sha256"
FILES = ("model.safetensors", "model_card.json", "MODEL_CARD.md", "training_log.csv")
MAX_TOTAL_MB = 150.0

#: Licences of the training data, from ../shared/datasets/README.md.
DATA_LICENCES = {
    "pbc": "CC BY 4.0 (Acevedo et al. 2020)",
    "wbcatt": "MIT",
    "bccd": "MIT",
    "txl_pbc": "MIT",
    "matek_subset": "CC BY 3.0",
    "all_aria": "as published by its authors on Kaggle (cite)",
    "zheng_wbc": "GPL-3.0",
}
DATA_LICENCES |= {"aria": DATA_LICENCES["all_aria"], "matek": DATA_LICENCES["matek_subset"]}  # loader names


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path = REFERENCE_DIR) -> dict[str, str]:
    """``{relative path: sha256}`` of ``root/MANIFEST.sha256`` (empty if there is none)."""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"{path}, line {n}: not 'SHA256  path' ({line!r}); regenerate it with "
                                  "leukemia_core.reproducibility.reference.write_manifest()")
        out[rel.strip()] = digest
    return out


def write_manifest(root: Path = REFERENCE_DIR) -> Path:
    """Hash every file under ``root`` (but the manifest) into ``root/MANIFEST.sha256``."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    lines = [f"{sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]
    path = root / MANIFEST_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


def verify(folder: Path, root: Path = REFERENCE_DIR) -> None:
    """Check every file of one reference ``folder`` against the manifest; raise
    :class:`CheckpointError` naming the first file that is missing, unlisted or altered."""
    root, folder = Path(root), Path(folder)
    manifest = read_manifest(root)
    fix = ("restore it with `git checkout -- reference/` (or `git lfs pull` if the weights are LFS "
           "pointers), or retrain it: see the command in its model card")
    if not manifest:
        raise CheckpointError(f"{root / MANIFEST_NAME} is missing: the reference checkpoints cannot be "
                              f"verified; {fix}")
    for name in FILES:
        path = folder / name
        rel = path.relative_to(root).as_posix()
        if rel not in manifest:
            raise CheckpointError(f"{path} is not listed in {root / MANIFEST_NAME}; {fix}")
        if not path.exists():
            raise CheckpointError(f"reference file {path} is missing; {fix}")
        digest = sha256(path)
        if digest != manifest[rel]:
            raise CheckpointError(f"reference file {path} does not match its SHA-256 in {root / MANIFEST_NAME} "
                                  f"(found {digest[:12]}…, expected {manifest[rel][:12]}…): it was altered "
                                  f"or truncated; {fix}")


def reference_folder(chapter: str, name: str, root: Path = REFERENCE_DIR) -> Path:
    return Path(root) / chapter / name


def available(chapter: str, root: Path = REFERENCE_DIR) -> list[str]:
    """Names of the reference checkpoints of ``chapter`` listed in the manifest."""
    names = {rel.split("/")[1] for rel in read_manifest(root) if rel.startswith(f"{chapter}/")}
    return sorted(names)


def load_card(chapter: str, name: str, root: Path = REFERENCE_DIR) -> dict:
    folder = reference_folder(chapter, name, root)
    verify(folder, root)
    return json.loads((folder / "model_card.json").read_text())


def load_reference(chapter: str, name: str, root: Path = REFERENCE_DIR):
    """``(model, meta, preprocess, card)`` of a verified reference checkpoint (see
    :func:`leukemia_core.checkpoints.load_checkpoint`); the model is in fp32 and eval mode."""
    from leukemia_core.checkpoints import load_checkpoint

    folder = reference_folder(chapter, name, root)
    verify(folder, root)
    model, meta, preprocess = load_checkpoint(folder / "model.safetensors")
    return model.float().eval(), meta, preprocess, json.loads((folder / "model_card.json").read_text())


def training_log(chapter: str, name: str, root: Path = REFERENCE_DIR):
    """The committed training curves (a DataFrame, one row per epoch)."""
    import pandas as pd

    folder = reference_folder(chapter, name, root)
    verify(folder, root)
    return pd.read_csv(folder / "training_log.csv")


def _card_markdown(card: dict) -> str:
    m = dict(card.get("metrics", {}))
    tried = m.pop("storages_tried", None)
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items())
    if tried:  # publish_smallest: every storage's scores, the kept one marked
        keys = list(next(iter(tried.values())))
        rows += ("\n\nStorage chosen by these scores (the smallest within 0.1 point of float32):\n\n"
                 f"| storage | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}\n"
                 + "\n".join(f"| {d}{' (kept)' if d == card['dtype'] else ''} | "
                              + " | ".join(f"{v[k]:.4f}" for k in keys) + " |" for d, v in tried.items()))
    data = "\n".join(f"- {d}: {lic}" for d, lic in card["data_licences"].items())
    return f"""# Reference checkpoint: {card['chapter']} / {card['name']}

{card['description']}

- **Command:** `{card['command']}`
- **Commit:** {card['git_sha']}
- **Hardware:** {card['hardware']}
- **Wall time:** {f"{card['wall_time_s'] / 3600:.2f} h" if card['wall_time_s'] else 'not recorded'} (of the session that finished the run); **training
  time:** {card.get('train_time_s', 0.0) / 3600:.2f} h (the epochs' training loops summed over every resumed
  session, validation excluded); **epochs:** {card['epochs_run']} (selected: {card['selected_epoch']})
- **Data:** {card['dataset']} (data SHA-256 {card['data_sha256'][:16]}…, split SHA-256 {card['split_sha256'][:16]}…)
- **Weights:** {card.get('dtype_note', card['dtype'])} ({card['weights_mb']:.1f} MB)

## Metrics at publication (test split)

| metric | value |
|---|---|
{rows}

## Intended use and limits

{card['intended_use']}

{card['limits']}

## Licences of the training data

{data}
"""


#: How published weights may be stored, largest first: float32 (the run's own file),
#: float16, and int8 (:func:`~leukemia_core.engine.checkpoint.encode_int8`: weight matrices and
#: kernels per output channel, the rest float16; dequantized to float32 at load).
DTYPES = ("float32", "float16", "int8")
DTYPE_NOTES = {"float32": "float32, as trained", "float16": "float16, cast from the float32 run",
               "int8": "int8 weight matrices and kernels (symmetric, one scale per output channel), float16 "
                       "biases and norms; dequantized to float32 at load"}


def finished_run(run_dir: Path, name: str, log=print) -> dict | None:
    """A run folder's ``results.json`` (written when the run finished), or None after
    reporting through ``log`` that the run is not finished and is not published."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        log(f"{name}: {run_dir} has no results.json (not finished): not published")
        return None
    return json.loads(path.read_text())


def command_line(command: str, note: str | None = None) -> str:
    """A model card's command line, with how the run was made (``note``) appended."""
    return command + (f" ({note})" if note else "")


def publish(run_dir: Path, chapter: str, name: str, *, description: str, command: str,
            intended_use: str, limits: str, metrics: dict, results: dict, dtype: str = "float32",
            root: Path = REFERENCE_DIR, check_budget: bool = True) -> Path:
    """Copy a finished run's weights (stored as ``dtype``, one of :data:`DTYPES`), its
    training log and a model card into ``root/<chapter>/<name>/`` and rewrite the manifest.
    ``results`` is the run's results JSON (data and split hashes, history, hardware, wall
    time); ``metrics`` the test metrics of the published weights (measured on those weights).
    ``check_budget``: fail if all weights under ``root`` exceed :data:`MAX_TOTAL_MB` (off only
    for :func:`publish_smallest`'s trial publications)."""
    import pandas as pd
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from leukemia_core.engine.checkpoint import checkpoint_file, encode_int8

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {DTYPES}")
    src = checkpoint_file(Path(run_dir))
    folder = reference_folder(chapter, name, root)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "model.safetensors"
    if dtype == "float32":
        shutil.copyfile(src, dst)
    else:
        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
        state = load_file(str(src))
        tensors = (encode_int8(state) if dtype == "int8"
                   else {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()})
        save_file(tensors, str(dst), metadata=meta)
    history = results.get("history") or []
    pd.DataFrame(history).to_csv(folder / "training_log.csv", index=False)
    selected = max(history, key=lambda h: h.get("val_macro_f1", float("-inf")), default={}).get("epoch")
    hw = results.get("hardware", {})
    card = {
        "schema": "leukemia-core/model-card/v1", "chapter": chapter, "name": name, "description": description,
        "command": command, "git_sha": results.get("git_sha"),
        "hardware": ", ".join(f"{k}={v}" for k, v in hw.items() if not isinstance(v, (dict, list))) or "unknown",
        "wall_time_s": float(results.get("wall_time_s") or 0.0),
        "train_time_s": float(sum(h.get("train_time_s", 0.0) for h in history)), "epochs_run": len(history),
        "selected_epoch": selected, "dataset": results.get("dataset"),
        "data_sha256": results.get("data_sha256", ""), "split_sha256": results.get("split_sha256", ""),
        "profile": results.get("profile"), "config": results.get("config"),
        "dtype": dtype, "dtype_note": DTYPE_NOTES[dtype], "weights_mb": dst.stat().st_size / 1e6,
        "metrics": metrics, "intended_use": intended_use, "limits": limits,
        "data_licences": {d: DATA_LICENCES.get(d, "see ../shared/datasets/README.md")
                          for d in (results.get("datasets") or
                                    ([results.get("dataset")] if results.get("dataset") else []))},
        "published": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (folder / "MODEL_CARD.md").write_text(_card_markdown(card))
    write_manifest(root)
    total = sum(p.stat().st_size for p in Path(root).rglob("*.safetensors")) / 1e6
    if check_budget and total > MAX_TOTAL_MB:
        raise CheckpointError(f"the reference weights under {root} total {total:.0f} MB, over the "
                              f"{MAX_TOTAL_MB:.0f} MB budget: publish this one smaller (reference.publish_smallest) or drop another")
    return folder


#: Issue 18: weights are published in fp16 when every score they give stays within 0.1 point
#: (0.001) of the fp32 weights'; the same rule admits int8 storage (:data:`DTYPES`).
FP16_TOLERANCE = 0.001


def publish_smallest(run_dir: Path, chapter: str, name: str, score, *, root: Path = REFERENCE_DIR,
                     **card) -> Path:
    """Publish a finished run in the smallest of :data:`DTYPES` that scores as the float32
    weights do.

    ``score()`` evaluates the checkpoint as published at that moment (it is called after a
    float32, a float16 and an int8 publish) and returns ``{metric: value}``; a key ``n`` (a
    count) is carried but not compared. The smallest storage whose every other metric is
    within :data:`FP16_TOLERANCE` of the float32 one is kept (int8, else float16, else
    float32); the card's metrics are the kept weights' scores plus ``fp32_<metric>``, and
    ``storages_tried`` (every storage's scores). ``card``: :func:`publish`'s keyword
    arguments but ``metrics`` and ``dtype``."""
    scores = {}
    for dtype in DTYPES:
        publish(run_dir, chapter, name, metrics={}, dtype=dtype, root=root, check_budget=False, **card)
        scores[dtype] = dict(score())
    compared = [k for k in scores["float32"] if k != "n"]
    if not compared:
        raise ValueError(f"{chapter}/{name}: score() returned no metric to compare the storages by")
    within = [d for d in DTYPES if all(abs(scores[d][k] - scores["float32"][k]) <= FP16_TOLERANCE for k in compared)]
    kept = within[-1]  # float32 is always within
    metrics = {**scores[kept], **{f"fp32_{k}": scores["float32"][k] for k in compared},
               "storages_tried": {d: {k: scores[d][k] for k in compared} for d in DTYPES}}
    return publish(run_dir, chapter, name, metrics=metrics, dtype=kept, root=root, **card)


#: Under ``smoke`` a chapter evaluates its reference checkpoints on the first this-many test
#: images of every class (or source): it checks the path in seconds. Every other profile
#: evaluates on the whole test split, which is what ``results/reference/`` holds and what the
#: freshness check compares; a capped evaluation is written under ``<results>/smoke/`` instead.
SMOKE_TEST_PER_CLASS = 6


def test_per_class(profile) -> int | None:
    """The test images per class a chapter's reference evaluation uses under ``profile`` (a
    name or a Profile): :data:`SMOKE_TEST_PER_CLASS` under smoke, None (all) otherwise."""
    name = getattr(profile, "name", profile)
    return SMOKE_TEST_PER_CLASS if name == "smoke" else None


def capped_note(profile: str, per_class: int, unit: str = "class") -> str:
    """The sentence a chapter shows above a capped reference evaluation (``unit``: what the
    cap counts per, class or source)."""
    return (f"*Under `{profile}` the reference checkpoints are evaluated on the first {per_class} test images of "
            f"every {unit} only: a check that the path works, not their result. Every other profile evaluates "
            "them on the whole test split.*")


def evaluations_dir(results_dir, per_class: int | None) -> Path:
    """Where reference evaluations go: ``<results_dir>/reference`` for whole-split ones,
    ``<results_dir>/smoke/reference`` for capped ones (never compared, git-ignored)."""
    results_dir = Path(results_dir) if results_dir is not None else REPO_ROOT / "results"
    return results_dir / "reference" if per_class is None else results_dir / "smoke" / "reference"


def first_per_class(table, column: str, per_class: int | None):
    """The first ``per_class`` rows of every value of ``column`` (table order, so the same
    rows every time); the table itself when ``per_class`` is None. Keeps ``attrs``."""
    if per_class is None:
        return table
    out = table.groupby(column, sort=False).head(per_class)
    out.attrs = dict(table.attrs)
    return out


def evaluate_classifier(chapter: str, name: str, data_root=None, results_dir=None,
                        root: Path = REFERENCE_DIR, batch_size: int = 128, num_workers: int = 0,
                        per_class: int | None = None) -> Path:
    """Evaluate a verified reference classifier live on its dataset's committed test split
    (the checkpoint's own preprocessing) and write ``<results_dir>/reference/<chapter
    prefix>_<name>.json``. The weights are fixed, so every build must reproduce the committed
    file within ``freshness.reference_tolerance`` of results/claims.yaml. ``per_class``:
    only the first so many test images per class (:func:`test_per_class`), written under
    :func:`evaluations_dir` instead."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from leukemia_core.data import load_dataset
    from leukemia_core.data.prepare import content_hash
    from leukemia_core.data.splits import apply_split, split_paths
    from leukemia_core.data.torch_dataset import ImageTableDataset
    from leukemia_core.data.transforms import eval_transform_from
    from leukemia_core.engine.train import evaluate
    from leukemia_core.reproducibility.results import write_results

    start = time.perf_counter()
    model, meta, _, card = load_reference(chapter, name, root)
    table = apply_split(load_dataset(card["dataset"], data_root))
    test = table[(table["split"] == "test") & table["label"].isin(meta["classes"])]
    test = first_per_class(test, "label", per_class).reset_index(drop=True)
    ds = ImageTableDataset(test, meta["classes"], eval_transform_from(meta["preprocess"]))
    m = evaluate(model, DataLoader(ds, batch_size=batch_size, num_workers=num_workers), meta["classes"],
                 device=torch.device("cpu"))
    m = {k: v for k, v in m.items() if k not in ("probs", "targets")}
    prefix = chapter.split("_", 1)[1] if "_" in chapter else chapter
    return write_results(
        evaluations_dir(results_dir, per_class) / f"{prefix}_{name}.json", overwrite=True,
        kind="reference_evaluation", chapter=chapter, reference=name, dataset=card["dataset"],
        model=meta.get("model"), profile="reference", seeds=[card.get("config", {}).get("seed", 0)]
        if isinstance(card.get("config"), dict) else [0],
        config={"checkpoint": f"reference/{chapter}/{name}/model.safetensors",
                "checkpoint_sha256": read_manifest(root)[f"{chapter}/{name}/model.safetensors"],
                "dtype": card["dtype"], "preprocess": meta["preprocess"]},
        metrics={"test": m}, split_file=str(split_paths(card["dataset"])[0].relative_to(REPO_ROOT)),
        split_sha256=sha256(split_paths(card["dataset"])[0]), data_sha256=content_hash(test),
        training={"wall_time_s": card["wall_time_s"], "epochs_run": card["epochs_run"],
                  "selected_epoch": card["selected_epoch"], "git_sha": card["git_sha"],
                  "hardware": card["hardware"]},
        wall_time_s=time.perf_counter() - start)


#: The reference checkpoints each chapter shows (issue 18), by the name of the results file
#: the chapter writes for the same model under ``ci``.
EXPECTED = {
    "03_baseline": ("convnext_atto", "efficientnet_lite0"),
    # leukemia_core.experiments.hierarchy.reference_models (a test keeps the two equal)
    "04_hierarchy": ("flat_efficientnet_lite0", "multilevel_efficientnet_lite0", "pooled_efficientnet_lite0",
                     "level1_efficientnet_lite0", "level2_efficientnet_lite0", "level3_efficientnet_lite0",
                     "level4_efficientnet_lite0", "scratch_flat_convnext_atto", "scratch_flat_vit_tiny_patch16_224"),
    # leukemia_core.experiments.vision_language.reference_names
    "05_vision_language": ("vl_lite0_minilm", "vl_without_monocyte"),
    # leukemia_core.experiments.domain_generalization.REFERENCE_NAMES (issue 22)
    "06_domain_generalization": ("erm_bn_without_pbc", "erm_bn_without_bccd", "erm_bn_without_zheng",
                                 "headline_without_pbc", "headline_without_bccd", "headline_without_zheng",
                                 "all_domains"),
    # leukemia_core.experiments.r3gan_hybrid.FCMAE_REFERENCE (issue 19; the R3GAN and hybrid follow)
    "08_r3gan_hybrid": ("fcmae_convnextv2_atto",),
}


#: The command that trains a reference checkpoint, where it is not the chapter's
#: ``leukemia-core run <chapter> --profile reference``.
TRAIN_COMMANDS = {("08_r3gan_hybrid", "fcmae_convnextv2_atto"): "leukemia-core pretrain fcmae --profile reference --out DIR"}


def check(chapter: str, name: str, root: Path = REFERENCE_DIR) -> dict:
    """``{"chapter", "name", "status", "message"}``: status ``verified``, ``missing`` (not
    trained or not published yet) or ``corrupt`` (a file fails the manifest)."""
    folder = reference_folder(chapter, name, root)
    row = {"chapter": chapter, "name": name}
    listed = f"{chapter}/{name}/model.safetensors" in read_manifest(root)
    if not listed and not folder.exists():
        train = TRAIN_COMMANDS.get((chapter, name), f"leukemia-core run {chapter} --profile reference --out DIR")
        return {**row, "status": "missing",
                "message": f"reference/{chapter}/{name} is not published yet: train it with `{train}` "
                           f"(resumable: `--resume`), then `leukemia-core reference publish {chapter} --out DIR`"}
    try:
        verify(folder, root)
    except CheckpointError as exc:
        return {**row, "status": "corrupt", "message": str(exc)}
    return {**row, "status": "verified", "message": f"reference/{chapter}/{name}: every file matches the manifest"}


def status(root: Path = REFERENCE_DIR) -> list[dict]:
    """:func:`check` of every expected reference checkpoint (the build report lists them)."""
    return [check(chapter, name, root) for chapter, names in EXPECTED.items() for name in names]
