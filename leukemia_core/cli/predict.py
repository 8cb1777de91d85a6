"""``leukemia-core predict`` and ``leukemia-core evaluate --images``: the domain-generalization
chapter's predictor on any folder of images (the work is in :mod:`leukemia_core.predict`)."""
from __future__ import annotations

from pathlib import Path

from leukemia_core.errors import LeukemiaError
from leukemia_core.predict import _summary, evaluate_folder, predict_folder


#: The model ``predict`` and ``evaluate --images`` use without ``--checkpoint``: the
#: domain-generalisation chapter's all-domains reference model (issue 22).
DEFAULT_REFERENCE = ("06_domain_generalization", "all_domains")


def checkpoint_or_default(checkpoint, root=None) -> Path:
    """``checkpoint``, or the verified all-domains reference model when it is None; a clear
    error when that model is not published or fails the manifest. ``root``: the reference
    folder (default: the repository's ``reference/``)."""
    if checkpoint is not None:
        return Path(checkpoint)
    from leukemia_core.reproducibility import reference

    root = reference.REFERENCE_DIR if root is None else Path(root)
    chk = reference.check(*DEFAULT_REFERENCE, root=root)
    if chk["status"] != "verified":
        raise LeukemiaError(f"no --checkpoint given and the default model cannot be used: {chk['message']}. "
                            "Pass --checkpoint model.safetensors (or its run folder).")
    path = reference.reference_folder(*DEFAULT_REFERENCE, root=root) / "model.safetensors"
    shown = path.relative_to(reference.REPO_ROOT) if path.is_relative_to(reference.REPO_ROOT) else path
    print(f"no --checkpoint: using the reference all-domains model {shown} (its model card: MODEL_CARD.md beside it)")
    return path


def cmd_predict(args):
    """``leukemia-core predict --images DIR [--checkpoint CKPT] --out CSV [--overwrite] [--strict]``."""
    table = predict_folder(checkpoint_or_default(args.checkpoint), args.images, args.out, overwrite=args.overwrite,
                           adapt_bn=getattr(args, "adapt_bn", False), strict=getattr(args, "strict", False),
                           batch_size=getattr(args, "batch_size", 64), num_workers=getattr(args, "workers", 0),
                           progress=True)
    print(_summary(len(table), int(table["error"].notna().sum()), args.out))


def add_predict_parser(subparsers):
    pr = subparsers.add_parser("predict", help="class probabilities for a folder of single-cell "
                               "images (any size; the checkpoint's own preprocessing)")
    pr.add_argument("--images", required=True, help="folder of images (searched recursively)")
    pr.add_argument("--checkpoint", help="model.safetensors or its run folder (default: the reference "
                    "all-domains model, reference/06_domain_generalization/all_domains)")
    pr.add_argument("--out", required=True, help="CSV to write")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--adapt-bn", action="store_true",
                    help="re-estimate BatchNorm statistics on the folder's images (one new hospital)")
    pr.add_argument("--strict", action="store_true",
                    help="stop at the first unreadable image (default: record it in the error column)")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    pr.set_defaults(func=cmd_predict)
    return pr


def cmd_evaluate_images(args):
    """``leukemia-core evaluate --images DIR --checkpoint CKPT --out OUTDIR``: prints the class
    mapping used, the summary and the metrics; writes OUTDIR/predictions.csv and metrics.json."""
    if not args.out:
        raise LeukemiaError("evaluate --images needs --out OUTDIR (a folder for predictions.csv and "
                            "metrics.json)")
    m = evaluate_folder(checkpoint_or_default(args.checkpoint), args.images, args.out, adapt_bn=args.adapt_bn,
                        restrict_to_shared=args.restrict_to_shared, strict=args.strict,
                        overwrite=args.overwrite, batch_size=args.batch_size, num_workers=args.workers,
                        progress=True)
    out = Path(args.out)
    print("class mapping (folder -> model):")
    for c, target in m["mapping"].items():
        print(f"  {c!r} -> {target if target else '(not a class of the model: predicted, left out of the metrics)'}"
              f"  [{m['counts'][c]} images]")
    if m["images_outside_class_folders"]:
        print(f"  {len(m['images_outside_class_folders'])} image(s) directly in {args.images} have no class "
              "folder and were not read")
    print(_summary(m["n_images"], m["n_unreadable"], out / "predictions.csv"))
    if m["macro_f1"] is None:
        print("no readable image of a shared class: no metrics")
    else:
        print(f"macro-F1 {m['macro_f1']:.4f} over {len(m['shared_classes'])} shared classes "
              f"({', '.join(m['shared_classes'])}), accuracy {m['accuracy']:.4f} ({m['n_scored']} images)"
              + (", argmax restricted to them" if m["restrict_to_shared"] else ""))
        for c, v in m["per_class"].items():
            print(f"  {c}: recall {v['recall']:.3f}  precision {v['precision']:.3f}  ({v['support']} images)")
    print(f"wrote {out / 'predictions.csv'} and {out / 'metrics.json'}; browse them with "
          f"`make explore RUN={out}`")
