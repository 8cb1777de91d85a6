"""BCCD: VOC boxes with the image-level WBC subtype, and its single-WBC crops."""
from __future__ import annotations

import csv
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from leukemia_core.data.dataroot import dataset_dir
from leukemia_core.errors import DatasetError
from leukemia_core.data.records import list_images, make_table

FOLDER = "bccd"
BOX_CLASSES = ["WBC", "RBC", "Platelets"]
SPLITS = ("train", "val", "test")


def parse_voc(xml_path: Path) -> dict:
    """Boxes (xmin, ymin, xmax, ymax in pixels), their class names and the image size."""
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"BCCD: cannot parse {xml_path}: {exc}") from exc
    size = tree.find("size")
    boxes, labels = [], []
    for obj in tree.iter("object"):
        name = obj.findtext("name", "").strip()
        if name not in BOX_CLASSES:
            raise DatasetError(f"BCCD: {xml_path} has unknown object class '{name}'")
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(name)
    return {"width": int(size.findtext("width")), "height": int(size.findtext("height")),
            "boxes": boxes, "box_labels": labels}


def read_subtypes(csv_path: Path) -> dict[int, tuple[str, list[str]]]:
    """Image index -> (status, subtypes). Status is 'single', 'same_class_cells',
    'multi_class' or 'blank'; only 'single' and 'same_class_cells' give a label."""
    out = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            tokens = [t.strip().lower() for t in (row["Category"] or "").split(",") if t.strip()]
            if not tokens:
                status = "blank"
            elif len(tokens) == 1:
                status = "single"
            elif len(set(tokens)) == 1:
                status = "same_class_cells"
            else:
                status = "multi_class"
            out[int(row["Image"])] = (status, tokens)
    return out


def load_bccd(root: Path, hashes: bool = True):
    """One row per smear image with its boxes, VOC split and WBC subtype.

    ``label`` is the WBC subtype only where ``labels.csv`` names one class
    (``subtype_status`` single / same_class_cells); blank and multi-class rows keep
    ``label`` empty and list their tokens in ``subtypes``: nothing is guessed.
    """
    base = dataset_dir(root, "bccd", FOLDER)
    voc = dataset_dir(root, "bccd", f"{FOLDER}/BCCD")
    split_of = {}
    for split in SPLITS:
        for stem in (voc / "ImageSets/Main" / f"{split}.txt").read_text().split():
            split_of[stem] = split
    subtypes = read_subtypes(base / "labels.csv")
    rows = []
    for img in list_images(voc / "JPEGImages"):
        ann = voc / "Annotations" / f"{img.stem}.xml"
        if not ann.exists():
            raise DatasetError(f"BCCD: {img} has no annotation {ann}")
        index = int(img.stem.rsplit("_", 1)[1])
        status, tokens = subtypes.get(index, ("absent", []))
        rows.append({"path": img, "label": tokens[0] if status in ("single", "same_class_cells") else None,
                     "domain": "bccd", "split": split_of.get(img.stem), "subtype_status": status,
                     "subtypes": tokens, **parse_voc(ann)})
    table = make_table(rows, "bccd", base, hashes=hashes)
    unused = sorted(set(subtypes) - {int(Path(p).stem.rsplit("_", 1)[1]) for p in table["path"]})
    table.attrs["labels_without_image"] = unused
    if unused:
        warnings.warn(f"BCCD: {len(unused)} rows of labels.csv have no image in the release "
                      f"(indices {unused[:5]}...); they are listed in table.attrs['labels_without_image']",
                      stacklevel=2)
    return table


def load_bccd_crops(root: Path, hashes: bool = True):
    """The single-WBC crops of ``BCCD_cropped/<Class>/``; ``source_image`` groups crops."""
    base = dataset_dir(root, "bccd", FOLDER)
    crops = dataset_dir(root, "bccd_crops", f"{FOLDER}/BCCD_cropped")
    rows = []
    for cls_dir in sorted(p for p in crops.iterdir() if p.is_dir()):
        for path in list_images(cls_dir):
            rows.append({"path": path, "label": cls_dir.name.lower(), "domain": "bccd",
                         "source_image": path.stem.rsplit("_", 1)[0]})
    return make_table(rows, "bccd_crops", base, hashes=hashes)
