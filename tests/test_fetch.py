"""fetch_dataset against a local HTTP server holding real mirror files."""
from __future__ import annotations

import dataclasses
import filecmp
import functools
import hashlib
import shutil
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from leukemia_core.data import LOADERS, load_dataset
from leukemia_core.data.fetch import RELEASES, fetch_dataset, read_sums
from leukemia_core.errors import DatasetError, LeukemiaError, UnknownNameError

from conftest import real_root



MIRROR = real_root()  # conftest puts ../shared/datasets in LEUKEMIA_DATA
needs_mirror = pytest.mark.skipif(
    MIRROR is None, reason="data mirror not found (set LEUKEMIA_DATA or put it at "
                           "../shared/datasets): these tests serve real mirror files")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a ThreadingHTTPServer on a free port; shut down after."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def mirror_copy(dest: Path, prefix: str = "zheng_wbc/", keep=None) -> dict[str, str]:
    """Copy the mirror's files under ``prefix`` (optionally only ``keep``) into ``dest``."""
    sums = {p: h for p, h in read_sums(MIRROR / "SHA256SUMS").items()
            if p.startswith(prefix) and (keep is None or p in keep)}
    for p in sums:
        (dest / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MIRROR / p, dest / p)
    return sums


def write_sums(path: Path, sums: dict[str, str]) -> None:
    path.write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))


def all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@needs_mirror
def test_fetch_from_mirror_is_byte_identical(tmp_path, serve):
    srv, root = tmp_path / "srv", tmp_path / "root"
    sums = mirror_copy(srv)
    # A listed file of another dataset that the server does not have: fetching
    # zheng must not ask for it (it would 404).
    other = {"pbc/PBC_dataset_normal_DIB/basophil/not_served.jpg": "0" * 64}
    write_sums(srv / "SHA256SUMS", {**sums, **other})
    written = fetch_dataset("zheng", root, base_url=serve(srv))
    assert len(sums) == 603  # 300 images + 300 masks + csv, LICENSE, README
    assert sorted(written) == sorted(root / p for p in sums)
    for p in sums:
        assert filecmp.cmp(MIRROR / p, root / p, shallow=False), p
    assert read_sums(root / "SHA256SUMS") == sums  # only zheng's entries
    table = load_dataset("zheng", root)
    assert len(table) == 300
    assert dict(zip("zheng_wbc/" + table["relpath"], table["sha256"])).items() <= sums.items()
    # fetching again is a no-op that still returns the files
    assert sorted(fetch_dataset("zheng", root, base_url=serve(srv) + "/")) == sorted(written)


@needs_mirror
def test_hash_mismatch_raises_and_leaves_no_file(tmp_path, serve):
    srv, root = tmp_path / "srv", tmp_path / "root"
    good = "zheng_wbc/Dataset 1/001.png"
    bad = "zheng_wbc/Dataset 1/001.bmp"
    sums = mirror_copy(srv, keep={good, bad})
    data = bytearray((srv / bad).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other hash
    (srv / bad).write_bytes(bytes(data))
    write_sums(srv / "SHA256SUMS", sums)
    # A corrupt local copy from an earlier run must not survive either.
    (root / bad).parent.mkdir(parents=True)
    (root / bad).write_bytes(b"stale partial download")

    with pytest.raises(DatasetError) as err:
        fetch_dataset("zheng", root, base_url=serve(srv))
    msg = str(err.value)
    assert "hash mismatch" in msg and "001.bmp" in msg
    assert sums[bad] in msg and sha(srv / bad) in msg  # expected and actual hash
    # Only the verified file remains: no corrupt file, no pooch temp file, no SHA256SUMS.
    assert all_files(root) == {good}
    assert sha(root / good) == sums[good]


@needs_mirror
def test_mirror_without_the_dataset(tmp_path, serve):
    srv = tmp_path / "srv"
    srv.mkdir()
    write_sums(srv / "SHA256SUMS", {"pbc/x.jpg": "0" * 64})
    with pytest.raises(DatasetError, match="lists no file under 'zheng_wbc/'"):
        fetch_dataset("zheng", tmp_path / "root", base_url=serve(srv))
    with pytest.raises(LeukemiaError, match="could not download"):
        fetch_dataset("zheng", tmp_path / "root", base_url=serve(srv) + "nowhere/")


@needs_mirror
def test_release_archive_unpacks_to_public_layout(tmp_path, serve, monkeypatch):
    """The original-release path (pooch + Unzip) on a GitHub-style archive served locally."""
    srv, root = tmp_path / "srv", tmp_path / "root"
    src = tmp_path / "src"
    sums = mirror_copy(src)
    archive = srv / "segmentation_WBC-HEAD.zip"
    srv.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:  # top folder <repo>-<ref>/, extra files
        for p in sums:
            zf.write(src / p, "segmentation_WBC-abc123/" + p.removeprefix("zheng_wbc/"))
        zf.writestr("segmentation_WBC-abc123/Dataset 2/001.bmp", b"not part of Dataset 1")
    release = dataclasses.replace(RELEASES["zheng"], url=serve(srv) + archive.name,
                                  known_hash=f"sha256:{sha(archive)}")
    monkeypatch.setitem(RELEASES, "zheng", release)

    written = fetch_dataset("zheng", root)
    assert sorted(written) == sorted(root / p for p in sums)
    assert all(filecmp.cmp(src / p, root / p, shallow=False) for p in sums)
    assert not (root / "zheng_wbc" / "Dataset 2").exists()
    assert len(load_dataset("zheng", root)) == 300

    # A wrong pinned hash: DatasetError, the archive is not kept.
    root2 = tmp_path / "root2"
    with pytest.raises(DatasetError, match="hash mismatch.*expected sha256 " + "a" * 64):
        fetch_dataset("zheng", root2, sha256="a" * 64)
    assert all_files(root2) == set()


def test_unknown_name_lists_the_names(tmp_path):
    with pytest.raises(UnknownNameError) as err:
        fetch_dataset("pbc2", tmp_path)
    assert all(name in str(err.value) for name in LOADERS)


@pytest.mark.parametrize("name, needle", [("matek", "10.7937/tcia.2019.36f5o9ld"),
                                          ("aria", "kaggle.com/datasets/mehradaria/leukemia")])
def test_manual_download_gives_instructions(tmp_path, name, needle):
    with pytest.raises(LeukemiaError) as err:
        fetch_dataset(name, tmp_path)
    msg = str(err.value)
    assert type(err.value) is LeukemiaError
    assert needle in msg and f"{tmp_path.resolve()}/{RELEASES[name].folder}/" in msg
    assert "--base-url" in msg
    assert all_files(tmp_path) == set()


def test_releases_table():
    assert set(RELEASES) == set(LOADERS)
    folders = {"pbc": "pbc", "wbcatt": "wbcatt", "bccd": "bccd",
               "bccd_crops": "bccd/BCCD_cropped", "txl_pbc": "txl_pbc",
               "matek": "matek_subset", "aria": "all_aria", "zheng": "zheng_wbc"}
    for name, rel in RELEASES.items():
        assert rel.folder == folders[name]
        assert (rel.url is None) == (rel.manual is not None), name
        assert rel.known_hash is None or len(rel.known_hash.split(":")[-1]) == 64
    assert "10.17632/snkd93bnjr.1" in RELEASES["pbc"].source
