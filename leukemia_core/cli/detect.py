"""``leukemia-core detect <folder> --checkpoint det.safetensors --out boxes.json|csv``:
boxes, classes, scores and predicted attributes for every smear image of a folder."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from leukemia_core.data.records import find_images
from leukemia_core.errors import LeukemiaError
from leukemia_core.detection.data import CLASSES, load_image


def detect_folder(folder, model, attribute_values: dict, score_thresh: float = 0.3,
                  batch_size: int = 4) -> list[dict]:
    """One record per image: ``image``, ``width``, ``height`` and ``detections`` (box in
    original pixels, class, score and, for WBCs, attribute values with probabilities)."""
    paths = find_images(folder)
    short = model.config["short_side"]
    records = []
    model.eval()
    for i in range(0, len(paths), batch_size):
        batch = paths[i:i + batch_size]
        images, scales = [], []
        for p in batch:
            img, s = load_image(p, short)  # DatasetError names a corrupt file
            images.append(img.float() / 255)
            scales.append(s)
        with torch.no_grad():
            dets = model(images)
        for p, img, s, d in zip(batch, images, scales, dets):
            keep = d["scores"] >= score_thresh
            out = []
            for j in torch.where(keep)[0].tolist():
                cls = CLASSES[int(d["labels"][j])]
                rec = {"box": [round(v / s, 1) for v in d["boxes"][j].tolist()], "class": cls,
                       "score": round(float(d["scores"][j]), 4)}
                if cls == "WBC" and d["attributes"]:
                    attrs = {}
                    for name, logits in d["attributes"].items():
                        prob = logits[j].softmax(0)
                        k = int(prob.argmax())
                        names = attribute_values.get(name) or [str(v) for v in range(len(prob))]
                        attrs[name] = {"value": names[k], "prob": round(float(prob[k]), 4)}
                    rec["attributes"] = attrs
                out.append(rec)
            records.append({"image": str(p), "width": round(img.shape[-1] / s), "height": round(img.shape[-2] / s),
                            "detections": out})
    return records


def write_detections(records: list[dict], out) -> Path:
    """JSON (nested, one record per image) or CSV (one row per box; images without
    boxes get one row with empty box fields), chosen by the suffix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(records, indent=1) + "\n")
    elif out.suffix.lower() == ".csv":
        attr_names = sorted({a for r in records for d in r["detections"] for a in d.get("attributes", {})})
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "x0", "y0", "x1", "y1", "class", "score", *attr_names])
            for r in records:
                if not r["detections"]:
                    w.writerow([r["image"], "", "", "", "", "", "", *[""] * len(attr_names)])
                for d in r["detections"]:
                    attrs = d.get("attributes", {})
                    w.writerow([r["image"], *d["box"], d["class"], d["score"],
                                *[attrs[a]["value"] if a in attrs else "" for a in attr_names]])
    else:
        raise LeukemiaError(f"detect: --out must end in .json or .csv, got '{out.name}'")
    return out


def cmd_detect(args) -> int:
    from leukemia_core.detection.train import load_detector

    if Path(args.out).exists() and not args.overwrite:
        raise LeukemiaError(f"detect: {args.out} exists; pass --overwrite to replace it")
    model, values = load_detector(args.checkpoint)
    records = detect_folder(args.folder, model, values, score_thresh=args.score_thresh)
    path = write_detections(records, args.out)
    n = sum(len(r["detections"]) for r in records)
    print(f"{len(records)} images, {n} detections -> {path}")
    return 0


def add_detect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("detect", help="detect WBC/RBC/platelets (+ WBC attributes) in a folder of smears",
                              description=__doc__)
    p.add_argument("folder", help="folder of smear images (.jpg, .png, ...)")
    p.add_argument("--checkpoint", required=True, help="detector .safetensors written by the detection chapter")
    p.add_argument("--out", required=True, help="output file: .json (nested) or .csv (one row per box)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="minimum detection score (default 0.3)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_detect)
    return p
