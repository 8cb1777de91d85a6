"""``leukemia-core`` command line. Bad input: one message on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leukemia_core.config import PROFILES
from leukemia_core.errors import CheckpointError, LeukemiaError


def _add_root(p):
    p.add_argument("--data-root", help="folder holding the datasets (default: $LEUKEMIA_DATA, else data/)")


def cmd_fetch(args):
    from leukemia_core.data.fetch import fetch_dataset
    from leukemia_core.data.dataroot import resolve_data_root

    root, _ = resolve_data_root(args.data_root)
    root.mkdir(parents=True, exist_ok=True)
    files = fetch_dataset(args.name, root, base_url=args.base_url, sha256=args.sha256, progress=True)
    print(f"fetched {len(files)} files of {args.name} into {root}")


def cmd_check(args):
    from leukemia_core.data.check import check_data_root
    from leukemia_core.data.dataroot import data_root

    report = check_data_root(data_root(args.data_root), args.datasets or None)
    print(report.summary())
    if args.duplicates_csv:
        report.duplicates.to_csv(args.duplicates_csv, index=False)
    return 0 if report.ok else 1


def cmd_splits(args):
    import pandas as pd

    from leukemia_core.data import load_dataset
    from leukemia_core.data.splits import SPLIT_SPECS, compute_split, read_near_duplicates, split_paths, write_split

    names = args.names or sorted(SPLIT_SPECS)
    changed = []
    for name in names:
        if name not in SPLIT_SPECS:
            raise LeukemiaError(f"no split for '{name}'; datasets with splits: {sorted(SPLIT_SPECS)}")
        table = load_dataset(name, args.data_root)
        if args.check:
            split, _, pairs = compute_split(name, table)
            committed = pd.read_csv(split_paths(name)[0])
            same = (committed.equals(split.astype(committed.dtypes.to_dict()))
                    and read_near_duplicates(name)[["a", "b"]].equals(pairs[["a", "b"]]))
            print(f"{name}: {'unchanged' if same else 'DIFFERS from the committed split'}")
            changed += [] if same else [name]
        else:
            for f in write_split(name, table):
                print(f"wrote {f}")
    return 1 if changed else 0


def cmd_pool(args):
    """Write (or ``--check``) the committed unlabelled pretraining pool."""
    import pandas as pd

    from leukemia_core.data.pretraining_pool import POOL_FILE, compute_pool, write_pool

    if args.check:
        pool, report = compute_pool(args.data_root)
        same = pool.drop(columns="path").sort_values(["dataset", "relpath"]).reset_index(drop=True).equals(
            pd.read_csv(POOL_FILE))
        print(report.to_string())
        print(f"pretraining pool: {'unchanged' if same else 'DIFFERS from the committed file'}")
        return 0 if same else 1
    for f in write_pool(args.data_root):
        print(f"wrote {f}")
    print(pd.read_csv(f).to_string(index=False))
    return 0


def cmd_train(args):
    from leukemia_core.engine import distributed

    started = distributed.init_from_env()  # under torchrun / accelerate launch
    try:
        return _train(args)
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(args):
    from leukemia_core.config import get_profile
    from leukemia_core.engine.distributed import is_main_process
    from leukemia_core.pipeline import train_classifier
    from leukemia_core.data.transforms import CLAHE

    overrides = {k: v for k, v in {"epochs": args.epochs, "image_size": args.image_size,
                                  "batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    profile = get_profile(args.profile, **overrides)
    out = Path(args.out or f"runs/{args.dataset}_{args.model or profile.model}_{profile.name}_s{args.seed}")
    results = args.results or out / "results.json"
    if (out / "model.safetensors").exists() and not (args.resume or args.overwrite):
        raise LeukemiaError(f"{out} already holds a trained model; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")
    run = train_classifier(args.dataset, args.model, profile, root=args.data_root, out_dir=out,
                           pretrained=args.pretrained, seed=args.seed,
                           classes=args.classes.split(",") if args.classes else None,
                           clahe=CLAHE(args.clahe) if args.clahe else None,
                           class_weights=args.class_weights, weighted_sampler=args.weighted_sampler,
                           results_path=results, overwrite=args.overwrite, resume=args.resume)
    m = run.test
    if not is_main_process():
        return
    print(f"test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
          f"({m['n']} images, {run.wall_time_s:.0f} s)\ncheckpoint {out}\nresults {run.results_path}")


def cmd_evaluate(args):
    """Two modes: ``--dataset NAME --split S`` (a dataset split of the data root) or
    ``--images DIR --out OUTDIR`` (any labelled folder, one subfolder per class)."""
    if (args.images is None) == (args.dataset is None):
        raise LeukemiaError("evaluate needs exactly one of --dataset NAME (a split of a dataset under the "
                            "data root, e.g. --dataset pbc --split test) or --images DIR (a labelled folder, "
                            f"one subfolder per class){'; not both' if args.images else ''}")
    if args.images is not None:
        from leukemia_core.cli.predict import cmd_evaluate_images
        return cmd_evaluate_images(args)
    only_images = [f"--{k.replace('_', '-')}" for k in ("adapt_bn", "restrict_to_shared", "strict", "overwrite")
                   if getattr(args, k)]
    if only_images:
        raise LeukemiaError(f"{', '.join(only_images)} apply to evaluate --images DIR only, not --dataset")
    if args.checkpoint is None:
        raise LeukemiaError("evaluate --dataset needs --checkpoint (model.safetensors or its run folder)")
    return _evaluate_dataset(args)


def _evaluate_dataset(args):
    from torch.utils.data import DataLoader

    from leukemia_core.data import load_dataset
    from leukemia_core.data.splits import apply_split
    from leukemia_core.data.torch_dataset import ImageTableDataset
    from leukemia_core.engine.train import evaluate
    from leukemia_core.pipeline import eval_transform, load_classifier

    net, meta = load_classifier(args.checkpoint)
    table = apply_split(load_dataset(args.dataset, args.data_root))
    table = table[(table["split"] == args.split) & table["label"].notna()]
    foreign = sorted(set(table["label"]) - set(meta["classes"]))
    if foreign:
        raise CheckpointError(f"checkpoint {args.checkpoint} was trained on classes {meta['classes']}; "
                              f"dataset '{args.dataset}' has classes {foreign} it cannot predict")
    ds = ImageTableDataset(table, meta["classes"], eval_transform(meta))
    m = evaluate(net, DataLoader(ds, batch_size=128, num_workers=args.workers), meta["classes"])
    m = {k: v for k, v in m.items() if k not in ("probs", "targets")}
    text = json.dumps(m, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"{args.dataset}/{args.split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['n']} images)")


def cmd_predict(args):
    from leukemia_core.cli.predict import cmd_predict as run

    return run(args)


def _param(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise LeukemiaError(f"--set needs NAME=VALUE (a parameter of the chapter's notebook), got '{text}'")
    return key, yaml.safe_load(value)


def cmd_run(args):
    from leukemia_core.experiments import get_experiment

    experiment = get_experiment(args.chapter)
    params = dict(_param(t) for t in args.set or [])
    seeds = params.pop("seeds", args.seeds)
    result = experiment.run(args.profile, seeds=seeds, data_root=args.data_root, out=args.out,
                            results_dir=args.results_dir, resume=args.resume, **params)
    for path in result.results:
        print(f"wrote {path}")


def cmd_pretrain(args):
    from leukemia_core.experiments.r3gan_hybrid import pretrain_encoder

    _, result, run_dir = pretrain_encoder(args.profile, data_root=args.data_root, out=args.out,
                                          resume=args.resume, seed=args.seed)
    last = result.history[-1] if result.history else {}
    print(f"FCMAE: {len(result.history)} epochs, last training loss {last.get('train_loss', float('nan')):.4f}, "
          f"monitoring loss {last.get('val_loss', float('nan')):.4f}\ncheckpoint {run_dir}")


def cmd_reference(args):
    from leukemia_core.reproducibility import reference

    if args.ref_cmd == "check":
        rows = reference.status()
        for r in rows:
            print(f"{r['status']:>9}  reference/{r['chapter']}/{r['name']}: {r['message']}")
        return 1 if any(r["status"] == "corrupt" for r in rows) else 0
    from leukemia_core.experiments import get_experiment

    experiment = get_experiment(args.chapter)
    if not hasattr(experiment, "publish_reference"):
        raise LeukemiaError(f"chapter {args.chapter} has no reference checkpoints to publish yet")
    if args.note and not args.model:
        raise LeukemiaError("--note describes one run: name it with --model")
    for folder in experiment.publish_reference(args.out, data_root=args.data_root, models=args.model,
                                               note=args.note):
        print(f"published {folder}")
    return 0


def cmd_explore(args):
    from leukemia_core.cli.explore import main as explore

    argv = [args.run, "--port", str(args.port)] + (["--data-root", args.data_root] if args.data_root else [])
    return explore(argv)


def cmd_bench(args):
    from leukemia_core.reproducibility import bench

    result = bench.run(args.what, data_root=args.data_root, out=args.out, profile=args.profile,
                       n=args.n, checkpoint=args.checkpoint)
    print(json.dumps(result, indent=2))


def cmd_results(args):
    from leukemia_core.reproducibility.registry import describe_machine, load_claims, load_registry
    from leukemia_core.reproducibility.registry import freshness as check_freshness

    claims = load_claims()
    reg = load_registry(args.results_dir, claims=claims) if args.results_dir else load_registry(claims=claims)
    for r in reg.results:
        print(f"{r.path.parent.name}/{r.name}: paper {r.paper or '-'}, seeds {r.data['seeds']}, "
              f"{describe_machine(r.data['hardware'])}, {r.data['wall_time_s']:.0f} s, git {r.data['git_sha'][:10]}")
    for p in reg.problems:
        print(f"INVALID {p}", file=sys.stderr)
    drift = []
    if args.freshness:
        fresh = check_freshness(args.profile)
        drift = fresh.problems()
        print(f"freshness of results/{args.profile}/ against git HEAD (tolerance ±{fresh.tolerance}): "
              f"{len(fresh.rows)} headline metric(s) compared, {len(drift)} drift(s), new: {fresh.new or 'none'}")
        for line in drift:
            print(f"DRIFT {line}", file=sys.stderr)
    return 1 if reg.problems or drift else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leukemia-core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch, check and split the datasets").add_subparsers(dest="data_cmd", required=True)
    f = data.add_parser("fetch", help="download a dataset's original release (or from a mirror)")
    f.add_argument("name")
    f.add_argument("--base-url", help="a mirror laid out like the data root, with SHA256SUMS")
    f.add_argument("--sha256", help="expected sha256 of the release archive, if you know it")
    _add_root(f)
    f.set_defaults(func=cmd_fetch)
    c = data.add_parser("check", help="verify SHA256SUMS, decode every image, report duplicates")
    c.add_argument("datasets", nargs="*")
    c.add_argument("--duplicates-csv", help="write the duplicate table here")
    _add_root(c)
    c.set_defaults(func=cmd_check)
    s = data.add_parser("splits", help="regenerate the committed splits (or --check them)")
    s.add_argument("names", nargs="*")
    s.add_argument("--check", action="store_true", help="only compare with the committed files")
    _add_root(s)
    s.set_defaults(func=cmd_splits)
    pl = data.add_parser("pool", help="regenerate (or --check) the unlabelled pretraining pool: training "
                                      "images only, no copy of any val/test image of any dataset")
    pl.add_argument("--check", action="store_true", help="only compare with the committed file")
    _add_root(pl)
    pl.set_defaults(func=cmd_pool)

    pt = sub.add_parser("pretrain", help="self-supervised pretraining: `fcmae`, the hybrid's ConvNeXtV2 branch "
                                         "on the unlabelled pretraining pool (resumable)")
    pt.add_argument("method", choices=["fcmae"])
    pt.add_argument("--profile", default="reference", choices=sorted(PROFILES))
    pt.add_argument("--out", help="folder for the run (default: runs/<profile>)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--resume", action="store_true", help="continue a killed run exactly")
    _add_root(pt)
    pt.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("train", help="train a classifier under a profile")
    t.add_argument("--dataset", default="pbc")
    t.add_argument("--model", help="registry or timm name (default: the profile's)")
    t.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    t.add_argument("--pretrained", action="store_true", help="offline ImageNet weights (efficientnet_lite0)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--classes", help="comma-separated subset of classes")
    t.add_argument("--epochs", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--clahe", type=float, metavar="CLIP", help="apply CLAHE with this clip limit")
    t.add_argument("--class-weights", action="store_true")
    t.add_argument("--weighted-sampler", action="store_true")
    t.add_argument("--out", help="run folder (checkpoints, predictions)")
    t.add_argument("--results", help="results JSON path (default: <out>/results.json)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--overwrite", action="store_true")
    _add_root(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split (--dataset) or on "
                       "any labelled folder, one subfolder per class (--images)")
    e.add_argument("--checkpoint", help="model.safetensors or its run folder (--images: default the reference "
                   "all-domains model, reference/06_domain_generalization/all_domains)")
    e.add_argument("--dataset", help="a dataset under the data root (e.g. pbc), evaluated on --split")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--images", metavar="DIR", help="a labelled folder DIR/<class>/<image>; class names "
                   "are matched to the model's through synonyms (leukemia_core/data/class_names.py)")
    e.add_argument("--out", help="--dataset: write the metrics JSON here; --images: the output folder "
                   "(predictions.csv, metrics.json; opens with `make explore RUN=OUTDIR`)")
    e.add_argument("--adapt-bn", action="store_true",
                   help="--images: re-estimate BatchNorm statistics on the folder (one new hospital)")
    e.add_argument("--restrict-to-shared", action="store_true",
                   help="--images: predict only among the classes the folder shares with the model")
    e.add_argument("--strict", action="store_true",
                   help="--images: stop at the first unreadable image (default: record it in the error column)")
    e.add_argument("--overwrite", action="store_true", help="--images: replace the output folder's files")
    e.add_argument("--batch-size", type=int, default=64, help="--images: images per batch")
    e.add_argument("--workers", type=int, default=0)
    _add_root(e)
    e.set_defaults(func=cmd_evaluate)

    from leukemia_core.cli.predict import add_predict_parser  # the domain-generalization chapter's predictor
    add_predict_parser(sub)
    from leukemia_core.cli.detect import add_detect_parser  # the detection chapter's detector
    add_detect_parser(sub)

    from leukemia_core.experiments import EXPERIMENTS

    rn = sub.add_parser("run", help="run a chapter's experiment headless (what its notebook trains, "
                        "evaluates and writes to results/<profile>/)")
    rn.add_argument("chapter", choices=sorted(EXPERIMENTS), metavar="CHAPTER",
                    help=f"one of {', '.join(EXPERIMENTS)}")
    rn.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    rn.add_argument("--seeds", type=int, nargs="+", help="default: the profile's seeds")
    rn.add_argument("--resume", action="store_true",
                    help="continue the interrupted training runs found under --out (exactly)")
    rn.add_argument("--out", help="checkpoints and training state (default: _build/artifacts/<profile>)")
    rn.add_argument("--results-dir", help="results registry root (default: results/)")
    rn.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="another parameter of the chapter's notebook (repeatable), e.g. --set epochs=2")
    _add_root(rn)
    rn.set_defaults(func=cmd_run)

    rf = sub.add_parser("reference", help="reference checkpoints: check them against the manifest, "
                        "or publish a chapter's finished reference runs").add_subparsers(dest="ref_cmd", required=True)
    rf.add_parser("check", help="verify every expected reference checkpoint").set_defaults(func=cmd_reference)
    rp = rf.add_parser("publish", help="copy a chapter's finished `run --profile reference` into reference/")
    rp.add_argument("chapter", choices=sorted(EXPERIMENTS), metavar="CHAPTER")
    rp.add_argument("--out", required=True, help="the --out of the reference run")
    rp.add_argument("--model", action="append", default=None, metavar="NAME",
                    help="publish only this model (repeatable; default: every finished run, which "
                         "republishes those already published)")
    rp.add_argument("--note", default=None, metavar="TEXT",
                    help="how the run was made, for the model card's command line (e.g. 'niced, paused for "
                         "40 min during a ci build: the wall time includes the pause')")
    _add_root(rp)
    rp.set_defaults(func=cmd_reference)

    x = sub.add_parser("explore", help="serve the prediction explorer (Voila) on a run folder or predictions CSV")
    x.add_argument("run")
    x.add_argument("--port", type=int, default=8866)
    _add_root(x)
    x.set_defaults(func=cmd_explore)

    b = sub.add_parser("bench", help="benchmarks (not tests): loader, train, latency, scaling; gan")
    b.add_argument("what", choices=["loader", "train", "latency", "scaling", "all", "gan", "predict"],
                   help="all: the first four; gan: R3GAN training images/s and generator samples/s; "
                   "predict: peak memory of `predict` on --n generated images (and on n/10)")
    b.add_argument("--n", type=int, default=20000, help="predict: number of generated images")
    b.add_argument("--checkpoint", help="predict: checkpoint to use (default: a tiny untrained model)")
    b.add_argument("--profile", default="full", choices=["smoke", "ci", "full"],
                   help="benchmark sizes and the chapters' image size (default: full)")
    b.add_argument("--out", help="write the benchmark JSON here (e.g. results/bench/<machine>.json)")
    _add_root(b)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("results", help="validate the results registry (results/<profile>/*.json)")
    r.add_argument("--freshness", action="store_true",
                   help="also compare results/<profile>/ with git HEAD on the headline metrics")
    r.add_argument("--profile", default="ci", choices=["smoke", "ci", "full"])
    r.add_argument("--results-dir", help="default: results/ in the repository")
    r.set_defaults(func=cmd_results)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LeukemiaError as exc:
        print(f"leukemia-core: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leukemia-core: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
