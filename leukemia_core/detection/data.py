"""Box tables for detection (BCCD VOC, TXL-PBC YOLO), checked box by box, and the
torch datasets that feed the detector and the attribute head.

Every box is checked: a zero-area box, a box outside its image or an unknown class
raises :class:`~leukemia_core.errors.DatasetError` naming the file and line. The only
way past a bad box is an explicit ``allow`` list of ``(relpath, line)`` pairs; those
boxes are listed in ``table.attrs["excluded_boxes"]``, never dropped silently.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from leukemia_core.data import load_dataset
from leukemia_core.data.torch_dataset import read_image
from leukemia_core.errors import DatasetError

CLASSES = ["WBC", "RBC", "Platelets"]
#: Tolerance (pixels) for a box edge past the image border (VOC is 1-based).
EDGE_TOL = 1.0
#: The two degenerate (zero-area) boxes of the BCCD release, by file and line of
#: their ``<object>`` tag. They are excluded explicitly and shown in the chapter.
BCCD_KNOWN_DEFECTS = (("BCCD/Annotations/BloodImage_00338.xml", 158),
                      ("BCCD/Annotations/BloodImage_00343.xml", 50))


def check_box(box, label, width: int, height: int, where: str) -> int:
    """Class index of a valid box; :class:`DatasetError` naming ``where`` otherwise."""
    if label not in CLASSES:
        raise DatasetError(f"{where}: unknown class '{label}' (expected one of {CLASSES}); "
                           "fix the label or map it to a known class")
    x0, y0, x1, y1 = map(float, box)
    if not (x1 > x0 and y1 > y0):
        raise DatasetError(f"{where}: zero-area box {[x0, y0, x1, y1]}; delete or fix this box")
    if x0 < -EDGE_TOL or y0 < -EDGE_TOL or x1 > width + EDGE_TOL or y1 > height + EDGE_TOL:
        raise DatasetError(f"{where}: box {[x0, y0, x1, y1]} lies outside the {width}x{height} "
                           "image; fix its coordinates")
    return CLASSES.index(label)


def _allowed(relpath: str, line: int, allow) -> bool:
    return any(relpath.endswith(p) and (ln is None or ln == line) for p, ln in allow)


def read_voc_checked(xml_path: Path, relpath: str = "", allow=()) -> dict:
    """Boxes (pixels, clipped to the image), class indices and the line of each
    ``<object>`` of a Pascal VOC file; bad boxes raise unless in ``allow``."""
    text = Path(xml_path).read_text()
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: cannot parse VOC XML: {exc}") from exc
    lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<object\b", text)]
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    boxes, labels, excluded = [], [], []
    for obj, line in zip(root.iter("object"), lines):
        name = obj.findtext("name", "").strip()
        bb = obj.find("bndbox")
        box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        try:
            labels.append(check_box(box, name, width, height, f"{xml_path} line {line}"))
        except DatasetError as exc:
            if not _allowed(relpath or str(xml_path), line, allow):
                raise
            excluded.append({"file": relpath or str(xml_path), "line": line, "reason": str(exc)})
            continue
        boxes.append([min(max(box[0], 0), width), min(max(box[1], 0), height),
                      min(box[2], width), min(box[3], height)])
    return {"width": width, "height": height, "boxes": boxes, "labels": labels, "excluded": excluded}


def read_yolo_checked(txt: Path, width: int, height: int) -> tuple[list, list]:
    """YOLO ``cls cx cy w h`` (normalised) as pixel boxes; bad lines raise with file and line."""
    boxes, labels = [], []
    if not Path(txt).exists():  # YOLO convention: no label file = no objects
        return boxes, labels
    for n, line in enumerate(Path(txt).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{txt} line {n}"
        if len(parts) != 5:
            raise DatasetError(f"{where}: {len(parts)} fields, expected 5 (cls cx cy w h)")
        try:
            cls = int(parts[0])
            cx, cy, w, h = map(float, parts[1:])
        except ValueError as exc:
            raise DatasetError(f"{where}: not numbers: '{line.strip()}'") from exc
        name = CLASSES[cls] if 0 <= cls < len(CLASSES) else f"id {cls}"
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        labels.append(check_box(box, name, width, height, where))
        boxes.append([max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)])
    return boxes, labels


def bccd_boxes(root, allow=BCCD_KNOWN_DEFECTS) -> pd.DataFrame:
    """BCCD images with checked boxes and the release's ImageSets split."""
    table = load_dataset("bccd", root, hashes=True)
    base = Path(table.attrs.get("root", Path(table["path"].iloc[0]).parents[2]))
    rows, excluded = [], []
    for r in table.itertuples():
        xml = Path(r.path).parent.parent / "Annotations" / f"{Path(r.path).stem}.xml"
        rel = f"BCCD/Annotations/{xml.name}"
        ann = read_voc_checked(xml, rel, allow)
        excluded += ann["excluded"]
        rows.append({"path": r.path, "relpath": r.relpath, "sha256": r.sha256, "split": r.split,
                     "width": ann["width"], "height": ann["height"], "boxes": ann["boxes"],
                     "labels": ann["labels"], "domain": "bccd", "dataset": "bccd"})
    out = pd.DataFrame(rows)
    out.attrs.update(excluded_boxes=excluded, root=str(base))
    return out


def txl_boxes(root) -> pd.DataFrame:
    """TXL-PBC images with checked boxes, TXL split, source domain and source file."""
    table = load_dataset("txl_pbc", root, hashes=True)
    rows = []
    for r in table.itertuples():
        txt = Path(r.path).parent.parent.parent / "labels" / r.split / f"{Path(r.path).stem}.txt"
        boxes, labels = read_yolo_checked(txt, r.width, r.height)
        rows.append({"path": r.path, "relpath": r.relpath, "sha256": r.sha256, "split": r.split,
                     "width": r.width, "height": r.height, "boxes": boxes, "labels": labels,
                     "domain": r.domain, "dataset": "txl_pbc", "source_path": r.source_path})
    return pd.DataFrame(rows)


def link_sources(bccd: pd.DataFrame, txl: pd.DataFrame) -> pd.DataFrame:
    """Add ``bccd_split``: the BCCD split of a TXL image copied from BCCD (else None).

    A TXL image whose BCCD source is in BCCD val/test must not train a model tested on
    BCCD; a TXL test image whose source is in BCCD train is contaminated for a model
    trained on BCCD train. Both are marked here and handled by the caller.
    """
    split_of = dict(zip(bccd["relpath"], bccd["split"]))
    txl = txl.copy()
    txl["bccd_split"] = [split_of.get(p) if isinstance(p, str) else None for p in txl["source_path"]]
    return txl


def link_wbcatt(txl: pd.DataFrame, wbcatt: pd.DataFrame) -> pd.DataFrame:
    """Add ``wbcatt_heldout``: the TXL image is a copy of a PBC cell that WBCAtt holds in
    its validation or test split, or of a near-duplicate of one (PBC's committed clusters).

    The attribute head is validated and tested on those cells through the detector's
    features, so a detector trained on such an image would have seen them: the caller
    keeps these images out of detector training."""
    from leukemia_core.data.near_duplicates import clusters
    from leukemia_core.data.splits import read_near_duplicates

    held = set(wbcatt.loc[wbcatt["wbcatt_split"].isin(["val", "test"]), "relpath"])
    pairs = read_near_duplicates("pbc")
    cluster = clusters(sorted(set(pairs["a"]) | set(pairs["b"]) | held), pairs)
    held_clusters = set(cluster[sorted(held)])
    txl = txl.copy()
    txl["wbcatt_heldout"] = [isinstance(p, str) and (p in held or cluster.get(p) in held_clusters)
                             for p in txl["source_path"]]
    return txl


def load_image(path, short_side: int) -> tuple[torch.Tensor, float]:
    """RGB uint8 tensor resized so its shorter side is ``short_side``, and the scale used."""
    im = read_image(path)
    scale = short_side / min(im.size)
    im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), scale


class BoxDataset(torch.utils.data.Dataset):
    """Images (decoded and resized once) with boxes; optional ``patch`` per row
    (x0, y0, x1, y1 in original pixels) travels with the flips.

    Returns ``(image float [0,1] CHW, target)`` with ``boxes``, ``labels``, ``patch``
    (whole image when the row has none) and ``index``.
    """

    def __init__(self, table: pd.DataFrame, short_side: int, train: bool = False):
        self.table = table.reset_index(drop=True)
        self.train = train
        self.images, self.targets = [], []
        for r in self.table.itertuples():
            img, s = load_image(r.path, short_side)
            h, w = img.shape[-2:]
            patch = getattr(r, "patch", None)
            patch = [0, 0, r.width, r.height] if patch is None or not len(patch) else list(patch)
            self.images.append(img)
            self.targets.append({
                "boxes": torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4) * s,
                "labels": torch.tensor(r.labels, dtype=torch.int64),
                "patch": torch.tensor([patch], dtype=torch.float32) * s, "size": (h, w)})
        self.augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        t = self.targets[i]
        img = tv_tensors.Image(self.images[i])
        boxes = tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=t["size"])
        patch = tv_tensors.BoundingBoxes(t["patch"], format="XYXY", canvas_size=t["size"])
        if self.train:
            img, boxes, patch = self.augment(img, boxes, patch)
        return img.as_subclass(torch.Tensor).float() / 255, {
            "boxes": boxes.as_subclass(torch.Tensor), "labels": t["labels"],
            "patch": patch.as_subclass(torch.Tensor)[0], "index": i}


def collate(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------- attributes
def attribute_table(root, txl: pd.DataFrame | None = None) -> pd.DataFrame:
    """WBCAtt cells with one box each, keeping WBCAtt's own train/val/test split.

    * ``source="pbc"``: the PBC single-cell image, box = the whole image (a full-cell box);
    * ``source="txl_pbc"``: a TXL-PBC image copied from that PBC cell (joined through
      ``source_map.csv``), box = its annotated WBC nearest the image centre. TXL images
      whose annotation has no WBC are listed in ``attrs["txl_without_wbc_box"]``.
    """
    from leukemia_core.data.wbcatt import ATTRIBUTES

    cells = load_dataset("wbcatt", root, hashes=False)
    rows, no_wbc = [], []
    for r in cells.itertuples():
        with Image.open(r.path) as im:
            w, h = im.size
        rows.append({"path": r.path, "relpath": r.relpath, "source": "pbc", "wbcatt_split": r.wbcatt_split,
                     "txl_split": None, "label": r.label, "box": [0.0, 0.0, float(w), float(h)],
                     **{a: getattr(r, a) for a in ATTRIBUTES}})
    if txl is not None:
        by_path = cells.set_index("relpath")
        for r in txl[txl["source_path"].isin(by_path.index)].itertuples():
            wbc = [b for b, lab in zip(r.boxes, r.labels) if lab == CLASSES.index("WBC")]
            if not wbc:  # the TXL annotation has no WBC here: listed, not guessed
                no_wbc.append(r.relpath)
                continue
            cx, cy = r.width / 2, r.height / 2
            box = min(wbc, key=lambda b: ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2)
            cell = by_path.loc[r.source_path]
            rows.append({"path": r.path, "relpath": r.relpath, "source": "txl_pbc",
                         "wbcatt_split": cell["wbcatt_split"], "txl_split": r.split, "label": cell["label"],
                         "box": list(box), **{a: cell[a] for a in ATTRIBUTES}})
    out = pd.DataFrame(rows)
    out.attrs.update(attributes=list(ATTRIBUTES), txl_without_wbc_box=no_wbc)
    return out


def attribute_values(table: pd.DataFrame, attributes: list[str]) -> dict[str, list[str]]:
    """Value names per attribute, from the training split (sorted)."""
    train = table[table["wbcatt_split"] == "train"]
    return {a: sorted(train[a].dropna().unique()) for a in attributes}


def encode_attributes(table: pd.DataFrame, values: dict[str, list[str]]) -> torch.Tensor:
    """[n, n_attributes] value indices; a value unseen in training raises."""
    cols = []
    for a, names in values.items():
        unknown = set(table[a]) - set(names)
        if unknown:
            raise DatasetError(f"WBCAtt: attribute '{a}' has values {sorted(unknown)} not seen in training")
        cols.append(table[a].map({v: i for i, v in enumerate(names)}).to_numpy())
    return torch.tensor(np.stack(cols, axis=1), dtype=torch.int64)
