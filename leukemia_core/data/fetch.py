"""Download datasets: from their original public releases, or from a team mirror.

Two sources, one result (the dataset's public layout under the data root):

* no ``base_url``: the original release archive is downloaded with :mod:`pooch`
  into ``<root>/.downloads/`` and unpacked into ``<root>/<folder>/``. Matek (TCIA)
  and Aria (Kaggle, login) have no direct download: a :class:`LeukemiaError`
  gives the manual steps.
* ``base_url``: a mirror laid out like the shared data root (``SHA256SUMS`` at its
  top). Every file the mirror lists under the dataset's folder is downloaded with
  pooch and checked against its listed sha256; a mismatch raises
  :class:`DatasetError` and leaves no file behind (pooch downloads to a temporary
  file in the destination folder and deletes it when the hash differs).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pooch
import requests

from leukemia_core.errors import DatasetError, LeukemiaError, UnknownNameError
from leukemia_core.data.records import sha256_file

SUMS = "SHA256SUMS"
DOWNLOAD_DIR = ".downloads"  # archives of original releases, kept as pooch's cache
DOWNLOAD_WORKERS = 4  # parallel HTTP downloads from a mirror (I/O bound)


@dataclass(frozen=True)
class Release:
    """Where one dataset comes from and how its archive maps onto the data root."""

    folder: str  # dataset folder under the data root (posix, may be nested)
    source: str  # citable page / DOI of the original public release
    url: str | None = None  # direct archive URL; None = manual download only
    # sha256 of the archive at ``url``; None where it cannot be known offline.
    known_hash: str | None = None
    fname: str | None = None  # local archive name (URLs without a file name)
    archive: str = "zip"  # "zip" or "tar" (pooch.Unzip / pooch.Untar)
    # archive path (below its single top folder, if any) -> path under ``folder``
    members: dict[str, str] = field(default_factory=dict)
    optional: tuple[str, ...] = ()  # members that may be absent from the archive
    manual: str | None = None  # steps where no direct download exists ({root})
    note: str | None = None  # parts of the public layout the archive lacks ({root})
    requires: tuple[str, ...] = ()  # other datasets its loader needs


def _github(repo: str) -> str:
    # Default-branch snapshot. GitHub archives of a moving branch have no fixed
    # hash (and GitHub does not promise byte-stable archives), so known_hash=None.
    return f"https://github.com/{repo}/archive/HEAD.zip"


#: One entry per dataset name of :data:`leukemia_core.data.LOADERS`.
#: No known_hash is set: none of these archive hashes could be obtained offline when
#: this table was written (Mendeley publishes one in its file metadata; fill it in
#: from there after a first verified download). Never put a guessed hash here.
RELEASES: dict[str, Release] = {
    "pbc": Release(
        folder="pbc", source="Mendeley Data, doi:10.17632/snkd93bnjr.1 "
                             "(https://data.mendeley.com/datasets/snkd93bnjr/1)",
        url="https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
            "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded",
        known_hash=None, fname="PBC_dataset_normal_DIB.zip",
        members={"PBC_dataset_normal_DIB": "PBC_dataset_normal_DIB"},
    ),
    "wbcatt": Release(
        folder="wbcatt", source="https://github.com/apple2373/wbcatt",
        url=_github("apple2373/wbcatt"), fname="wbcatt.zip",
        members={"submission/pbc_attr_v1_train.csv": "pbc_attr_v1_train.csv",
                 "submission/pbc_attr_v1_val.csv": "pbc_attr_v1_val.csv",
                 "submission/pbc_attr_v1_test.csv": "pbc_attr_v1_test.csv",
                 "submission/re-annotation/pbc_attr_reannotations.csv":
                     "pbc_attr_reannotations.csv",
                 "LICENSE": "LICENSE"},
        optional=("LICENSE",), requires=("pbc",),
        note="WBCAtt holds attributes only; its images are PBC's: also run "
             "`leukemia-core data fetch pbc --data-root {root}`.",
    ),
    "bccd": Release(
        folder="bccd", source="https://github.com/Shenggan/BCCD_Dataset",
        url=_github("Shenggan/BCCD_Dataset"), fname="BCCD_Dataset.zip",
        members={"BCCD": "BCCD", "LICENSE": "LICENSE"}, optional=("LICENSE",),
        note="BCCD's per-image WBC subtypes (labels.csv) are not in the GitHub release: "
             "download Kaggle 'Blood Cell Images' "
             "(https://www.kaggle.com/datasets/paultimothymooney/blood-cells, login "
             "needed) and copy dataset-master/dataset-master/labels.csv to "
             "{root}/bccd/labels.csv.",
    ),
    "bccd_crops": Release(
        folder="bccd/BCCD_cropped", source="https://github.com/apple2373/BCCD",
        url=_github("apple2373/BCCD"), fname="BCCD_cropped.zip",
        members={"BCCD_cropped": "."},
    ),
    "txl_pbc": Release(
        folder="txl_pbc", source="https://github.com/lugan113/TXL-PBC_Dataset",
        url=_github("lugan113/TXL-PBC_Dataset"), fname="TXL-PBC_Dataset.zip",
        members={"TXL_PBC": "TXL_PBC", "LICENSE": "LICENSE"}, optional=("LICENSE",),
        note="txl_pbc/source_map.csv (provenance by content hash) is not part of the "
             "TXL-PBC release; it was computed for the team mirror: fetch it with "
             "`leukemia-core data fetch txl_pbc --base-url MIRROR` or copy it from the "
             "mirror into {root}/txl_pbc/.",
    ),
    "zheng": Release(
        folder="zheng_wbc", source="https://github.com/zxaoyou/segmentation_WBC",
        url=_github("zxaoyou/segmentation_WBC"), fname="segmentation_WBC.zip",
        members={"Dataset 1": "Dataset 1",
                 "Class Labels of Dataset 1.csv": "Class Labels of Dataset 1.csv",
                 "LICENSE": "LICENSE", "README.rst": "README.rst"},
        optional=("LICENSE", "README.rst"),
    ),
    "matek": Release(
        folder="matek_subset",
        source="TCIA AML-Cytomorphology_LMU, doi:10.7937/tcia.2019.36f5o9ld",
        manual="Matek-19 (AML-Cytomorphology_LMU) has no stable direct download URL: "
               "The Cancer Imaging Archive serves it through its download manager.\n"
               "  1. Open https://doi.org/10.7937/tcia.2019.36f5o9ld and download the "
               "collection's images (NBIA Data Retriever or the page's download link).\n"
               "  2. Copy the class folders you need (e.g. MYB and NGS; every TCIA "
               "abbreviation is understood) into {root}/matek_subset/, so that images "
               "lie at {root}/matek_subset/<CLASS>/*.tiff.\n"
               "  3. Check them with `leukemia-core data check matek --data-root {root}`.\n"
               "Or fetch the team mirror's copy with `--base-url MIRROR`.",
    ),
    "aria": Release(
        folder="all_aria",
        source="Kaggle, doi:10.34740/KAGGLE/DSV/2175623 "
               "(https://www.kaggle.com/datasets/mehradaria/leukemia)",
        manual="The Aria B-ALL dataset is on Kaggle (doi:10.34740/KAGGLE/DSV/2175623), "
               "which needs a login.\n"
               "  1. Sign in and download https://www.kaggle.com/datasets/mehradaria/"
               "leukemia (or `kaggle datasets download mehradaria/leukemia` with an API "
               "token).\n"
               "  2. Unzip it and copy the four class folders of 'Original' (not "
               "'Segmented'): Benign, [Malignant] early Pre-B, [Malignant] Pre-B, "
               "[Malignant] Pro-B into {root}/all_aria/.\n"
               "  3. Check them with `leukemia-core data check aria --data-root {root}`.\n"
               "Or fetch the team mirror's copy with `--base-url MIRROR`.",
    ),
}


def read_sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` file into ``{relative posix path: sha256}``."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line[:64], line[64:66], line[66:]
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest) or sep not in ("  ", " *") or not rel:
            raise DatasetError(f"{path} line {n} is not '<sha256>  <path>': {line[:80]!r}")
        out[rel] = digest.lower()
    return out


def write_sums(path: Path, sums: dict[str, str]) -> None:
    """Write ``{relpath: sha256}`` as a ``sha256sum`` file, sorted, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())), encoding="utf-8")
    os.replace(tmp, path)


def _update_sums(root: Path, replaced: list[str], new: dict[str, str]) -> None:
    """In ``root/SHA256SUMS``, drop entries at or under the ``replaced`` paths, add ``new``."""
    path = root / SUMS
    if not path.exists() and not new:
        return
    sums = read_sums(path) if path.exists() else {}
    sums = {p: h for p, h in sums.items()
            if not any(p == r or p.startswith(r + "/") for r in replaced)}
    write_sums(path, {**sums, **new})


@contextmanager
def _quiet_pooch():
    """Silence pooch's per-file INFO lines (thousands of files)."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


def _retrieve(url: str, known_hash: str | None, dest: Path, progress: bool = False,
              processor=None) -> Path:
    """pooch.retrieve into ``dest``; HTTP and hash errors become LeukemiaErrors."""
    try:
        pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent,
                       processor=processor, progressbar=progress)
        return dest
    except ValueError as exc:
        if "does not match the known hash" not in str(exc):
            raise
        expected = known_hash.split(":")[-1]
        got = re.search(r"but got ([0-9a-fA-F]+)", str(exc))
        if dest.is_file() and sha256_file(dest) != expected:
            dest.unlink()  # a corrupt local copy pooch tried to replace: no bad file stays
        raise DatasetError(
            f"hash mismatch for {dest} (from {url}): expected sha256 {expected}, "
            f"got {got.group(1) if got else 'another hash'}. The download was deleted. "
            "The source copy is corrupt or its SHA256SUMS is out of date: fix the "
            "source (or the known hash), then fetch again.") from exc
    except requests.RequestException as exc:
        raise LeukemiaError(f"could not download {url}: {exc}. Check the URL / "
                            "--base-url and the network, then fetch again.") from exc


def fetch_dataset(name: str, root: Path, base_url: str | None = None,
                  sha256: str | None = None, progress: bool = False) -> list[Path]:
    """Download dataset ``name`` into data root ``root``; return the files written.

    ``sha256`` pins the original release archive (overrides ``known_hash``; ignored
    with ``base_url``, where each file's hash comes from the mirror's SHA256SUMS).
    ``root/SHA256SUMS`` is updated with the fetched files' hashes (mirror) or cleared
    of the dataset's stale entries (original release).
    """
    if name not in RELEASES:
        raise UnknownNameError(f"unknown dataset '{name}'; choose one of {sorted(RELEASES)}")
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    with _quiet_pooch():
        if base_url:
            return _fetch_mirror(name, root, base_url, progress)
        return _fetch_release(name, root, sha256, progress)


def _fetch_mirror(name: str, root: Path, base_url: str, progress: bool) -> list[Path]:
    rel = RELEASES[name]
    base = base_url.rstrip("/") + "/"
    with tempfile.TemporaryDirectory() as tmp:
        sums = read_sums(_retrieve(base + SUMS, None, Path(tmp) / SUMS))
    wanted = {p: h for p, h in sums.items() if p.startswith(rel.folder + "/")}
    if not wanted:
        raise DatasetError(f"{base}{SUMS} lists no file under '{rel.folder}/': is "
                           f"{base_url} a mirror that holds dataset '{name}'?")
    for p in wanted:
        parts = PurePosixPath(p).parts
        if PurePosixPath(p).is_absolute() or ".." in parts:
            raise DatasetError(f"{base}{SUMS} lists an unsafe path {p!r}; refusing it")
    targets = {p: root.joinpath(*PurePosixPath(p).parts) for p in wanted}
    new_dirs = sorted({d for t in targets.values() for d in [t.parent, *t.parent.parents]
                       if d.is_relative_to(root) and d != root and not d.exists()},
                      key=lambda d: len(d.parts), reverse=True)

    def one(p: str) -> Path:
        return _retrieve(base + quote(p), f"sha256:{wanted[p]}", targets[p])

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(wanted), desc=f"fetch {name}", unit="file")
    written, errors = [], []
    with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
        for fut in [pool.submit(one, p) for p in sorted(wanted)]:
            try:
                written.append(fut.result())
            except LeukemiaError as exc:
                errors.append(exc)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    if errors:
        for d in new_dirs:  # folders this call created and left empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        more = f" (and {len(errors) - 1} more failed files)" if len(errors) > 1 else ""
        raise type(errors[0])(f"{errors[0]}{more}") from errors[0]
    _update_sums(root, [rel.folder], wanted)
    return sorted(written)


def _fetch_release(name: str, root: Path, sha256: str | None, progress: bool) -> list[Path]:
    rel = RELEASES[name]
    if rel.url is None:
        raise LeukemiaError(f"dataset '{name}' needs a manual download "
                            f"({rel.source}):\n{rel.manual.format(root=root)}")
    known = f"sha256:{sha256.split(':')[-1]}" if sha256 else rel.known_hash
    cache = root / DOWNLOAD_DIR
    extract = cache / f"{name}.extract"
    shutil.rmtree(extract, ignore_errors=True)
    unpack = (pooch.Unzip if rel.archive == "zip" else pooch.Untar)(extract_dir=extract.name)
    _retrieve(rel.url, known, cache / (rel.fname or f"{name}.{rel.archive}"), progress, unpack)
    try:
        top = extract
        entries = [p for p in top.iterdir() if p.name != "__MACOSX"]
        first = PurePosixPath(next(iter(rel.members))).parts[0]
        if not (top / first).exists() and len(entries) == 1 and entries[0].is_dir():
            top = entries[0]  # GitHub archives wrap everything in <repo>-<ref>/
        dest = root.joinpath(*PurePosixPath(rel.folder).parts)
        written, replaced = [], []
        for src_rel, dst_rel in rel.members.items():
            src = top / src_rel
            if not src.exists():
                if src_rel in rel.optional:
                    continue
                raise DatasetError(f"the {name} archive from {rel.url} lacks '{src_rel}'; "
                                   "the release layout changed: update RELEASES in "
                                   "leukemia_core/data/fetch.py")
            target = dest / dst_rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            replaced.append(target.relative_to(root).as_posix())
            shutil.move(str(src), str(target))
            files = [target] if target.is_file() else sorted(
                p for p in target.rglob("*") if p.is_file())
            for p in files:
                if p.name == ".DS_Store" or p.name.startswith("._"):
                    p.unlink()  # stray macOS files
                else:
                    written.append(p)
    finally:
        shutil.rmtree(extract, ignore_errors=True)
    _update_sums(root, replaced, {})  # mirror hashes no longer describe these files
    if rel.note:
        warnings.warn(rel.note.format(root=root), stacklevel=3)
    return sorted(written)
