"""Check a data root: checksums, image decoding, exact duplicate files."""
from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageFile

from leukemia_core.errors import DataRootError, LeukemiaError, UnknownNameError
from leukemia_core.data import LOADERS
from leukemia_core.data.fetch import RELEASES, SUMS, read_sums
from leukemia_core.data.records import sha256_files

DUPLICATE_COLUMNS = ["sha256", "dataset", "relpath", "label", "group_size",
                     "cross_dataset", "cross_class"]
#: Threads for hashing and decoding (PIL and hashlib release the GIL).
WORKERS = 2


def find_duplicates(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per file sharing its sha256 with another file, within or across datasets.

    ``cross_class`` is True when a group carries more than one (non-empty) label. A
    file listed by two tables at the same ``path`` (e.g. WBCAtt rows are PBC files)
    is one file, not a duplicate. Missing hashes are computed. Sorted by sha256,
    dataset, relpath.
    """
    parts = []
    for name, table in tables.items():
        t = table.copy()
        if "sha256" not in t or t["sha256"].isna().any():
            t["sha256"] = sha256_files(t["path"], workers=WORKERS)
        t["dataset"] = name
        parts.append(t[["sha256", "dataset", "relpath", "label"]
                       + (["path"] if "path" in t else [])])
    if not parts:
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    df = pd.concat(parts, ignore_index=True)
    if "path" in df:
        df = df.drop_duplicates("path").drop(columns="path")
    groups = df.groupby("sha256")
    df["group_size"] = groups["relpath"].transform("size")
    df = df[df["group_size"] > 1].copy()
    groups = df.groupby("sha256")
    df["cross_dataset"] = groups["dataset"].transform("nunique") > 1
    df["cross_class"] = groups["label"].transform(lambda s: s.dropna().nunique()) > 1
    return (df[DUPLICATE_COLUMNS].sort_values(["sha256", "dataset", "relpath"], kind="stable")
            .reset_index(drop=True))


def _decode(path: str) -> str | None:
    """None if the image decodes fully, else the error."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(exc).__name__}: {exc}"


@dataclass
class CheckReport:
    """Result of :func:`check_data_root`; ``ok`` ignores duplicates (reported only)."""

    root: str
    datasets: list[str]
    n_files: int = 0  # images decoded
    counts: dict[str, int] = field(default_factory=dict)  # images per dataset
    checksum_failures: list[tuple[str, str]] = field(default_factory=list)  # (relpath, detail)
    missing: list[str] = field(default_factory=list)  # listed in SHA256SUMS, absent
    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    load_errors: list[tuple[str, str]] = field(default_factory=list)  # (dataset, error)
    notes: list[str] = field(default_factory=list)  # loader warnings (not failures)
    duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DUPLICATE_COLUMNS))
    n_checksummed: int = 0  # files verified against SHA256SUMS (0: no SHA256SUMS)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.checksum_failures or self.missing or self.undecodable
                    or self.load_errors)

    def duplicate_groups(self) -> pd.DataFrame:
        """One row per duplicate group: size, datasets, labels, paths."""
        d = self.duplicates
        if d.empty:
            return pd.DataFrame(columns=["sha256", "group_size", "cross_dataset",
                                         "cross_class", "datasets", "labels", "files"])
        files = d["dataset"] + ":" + d["relpath"]
        return (d.assign(files=files).groupby("sha256", sort=True)
                .agg(group_size=("group_size", "first"), cross_dataset=("cross_dataset", "first"),
                     cross_class=("cross_class", "first"),
                     datasets=("dataset", lambda s: sorted(set(s))),
                     labels=("label", lambda s: sorted(set(s.dropna()))),
                     files=("files", list)).reset_index())

    def summary(self) -> str:
        """A short human-readable report."""
        lines = [f"data root {self.root}: {'OK' if self.ok else 'PROBLEMS FOUND'} "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  {name:<11} {n:>6} images" for name, n in self.counts.items()]
        lines.append(f"  checksums: {self.n_checksummed} files verified against {SUMS}, "
                     f"{len(self.checksum_failures)} changed, {len(self.missing)} missing"
                     if self.n_checksummed or self.missing else f"  checksums: no {SUMS}")
        for rel, detail in self.checksum_failures[:10]:
            lines.append(f"    changed: {rel} ({detail})")
        for rel in self.missing[:10]:
            lines.append(f"    missing: {rel}")
        lines.append(f"  decoding: {self.n_files} images, {len(self.undecodable)} undecodable")
        for path, err in self.undecodable[:10]:
            lines.append(f"    {path}: {err}")
        for name, err in self.load_errors:
            lines.append(f"  cannot load {name}: {err}")
        lines += [f"  note: {n}" for n in self.notes]
        g = self.duplicate_groups()
        lines.append(f"  exact duplicates: {len(g)} groups ({len(self.duplicates)} files): "
                     f"{int((~g['cross_dataset']).sum())} within one dataset, "
                     f"{int(g['cross_dataset'].sum())} across datasets, "
                     f"{int(g['cross_class'].sum())} across classes")
        within = g.loc[~g["cross_dataset"].astype(bool), "datasets"].str[0].value_counts()
        if len(within):
            within = within.sort_index()
            lines.append("    within: " + ", ".join(f"{k} {v}" for k, v in within.items()))
        for _, row in g[g["cross_class"]].iterrows():
            lines.append(f"    cross-class {'/'.join(row['labels'])}: {', '.join(row['files'])}")
        if self.ok and len(g):
            lines.append("  (duplicates are reported, not failures: deduplicate by sha256 "
                         "before splitting or evaluating)")
        return "\n".join(lines)


def check_data_root(root: Path, datasets: list[str] | None = None,
                    workers: int = WORKERS) -> CheckReport:
    """Verify ``root/SHA256SUMS`` (if present), decode every image, find duplicates.

    ``datasets=None`` checks every dataset whose folder exists under ``root``; named
    datasets must exist. With names, only their folders' SHA256SUMS entries count.
    """
    start = time.perf_counter()
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataRootError(f"data root {root} does not exist; point --data-root or "
                            "LEUKEMIA_DATA at a folder holding the datasets")
    selected = datasets is not None
    if datasets is None:
        datasets = [n for n in LOADERS if (root / RELEASES[n].folder).is_dir()]
    unknown = [n for n in datasets if n not in LOADERS]
    if unknown:
        raise UnknownNameError(f"unknown dataset(s) {unknown}; choose from {sorted(LOADERS)}")
    report = CheckReport(root=str(root), datasets=list(datasets))

    # 1. checksums: each listed file is hashed once; the hashes are reused below.
    known: dict[str, str] = {}
    if (root / SUMS).exists():
        sums = read_sums(root / SUMS)
        folders = [RELEASES[n].folder + "/" for n in datasets]
        if "wbcatt" in datasets:
            folders.append(RELEASES["pbc"].folder + "/")  # WBCAtt's images are PBC's
        if selected:
            sums = {p: h for p, h in sums.items() if p.startswith(tuple(folders))}
        present = {p: h for p, h in sums.items() if (root / p).is_file()}
        report.missing = sorted(set(sums) - set(present))
        paths = [str(root / p) for p in present]
        for (rel, expected), path, actual in zip(present.items(), paths,
                                                 sha256_files(paths, workers=workers)):
            known[path] = actual
            if actual != expected:
                report.checksum_failures.append((rel, f"expected {expected}, found {actual}"))
        report.checksum_failures.sort()
        report.n_checksummed = len(present)

    # 2. load the record tables (no hashing yet), then decode every image once.
    tables = {}
    for name in datasets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tables[name] = LOADERS[name](root, hashes=False)
            except LeukemiaError as exc:
                report.load_errors.append((name, str(exc)))
        report.notes += [f"{name}: {w.message}" for w in caught]
    images = {}
    for name, t in tables.items():
        report.counts[name] = len(t)
        cols = [c for c in ("path", "mask_path") if c in t]
        for col in cols:
            images.update(dict.fromkeys(t[col].dropna()))
    images = sorted(images)
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whatever the caller set
    try:
        with ThreadPoolExecutor(workers) as pool:
            errors = list(pool.map(_decode, images))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    report.undecodable = [(p, e) for p, e in zip(images, errors) if e]
    report.n_files = len(images)

    # 3. duplicates, reusing the hashes computed for the checksums.
    todo = sorted({p for t in tables.values() for p in t["path"] if p not in known})
    known.update(zip(todo, sha256_files(todo, workers=workers)))
    for t in tables.values():
        t["sha256"] = t["path"].map(known)
    report.duplicates = find_duplicates(tables)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["CheckReport", "check_data_root", "find_duplicates"]
