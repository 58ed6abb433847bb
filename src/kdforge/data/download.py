"""Fetch the official dataset files, verify their MD5 checksums, unpack archives; all atomically.

Every file is streamed into a temporary file next to its destination and renamed into place only
once its checksum matches, so an interrupted or corrupted download never leaves a file that looks
complete. Archives are unpacked into a temporary folder and moved into place the same way. Each
failure is one ``DataError`` line naming what failed and where to put the files by hand.

The URL table ``DOWNLOADS`` is plain data: tests point it at ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kdforge.core.errors import ConfigError, DataError

_CHUNK = 1 << 20
TIMEOUT_S = 60.0

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_TORONTO = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, its published MD5 and the URLs to try, in order."""

    filename: str
    md5: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class DatasetDownload:
    """The files of one dataset, the folder under the root they go to, and whether to unpack them."""

    files: tuple[RemoteFile, ...]
    folder: str
    extract: bool = False


def _mirrored(mirrors: tuple[str, ...], filename: str, md5: str) -> RemoteFile:
    return RemoteFile(filename, md5, tuple(mirror + filename for mirror in mirrors))


DOWNLOADS: dict[str, DatasetDownload] = {
    "mnist": DatasetDownload(
        files=(
            _mirrored(_MNIST_MIRRORS, "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            _mirrored(_MNIST_MIRRORS, "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            _mirrored(_MNIST_MIRRORS, "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            _mirrored(_MNIST_MIRRORS, "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        folder="MNIST/raw",
    ),
    "fashion_mnist": DatasetDownload(
        files=(
            _mirrored(_FASHION_MIRRORS, "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            _mirrored(_FASHION_MIRRORS, "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            _mirrored(_FASHION_MIRRORS, "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            _mirrored(_FASHION_MIRRORS, "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        folder="FashionMNIST/raw",
    ),
    "cifar10": DatasetDownload(
        files=(_mirrored((_TORONTO,), "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        folder=".",
        extract=True,
    ),
    "cifar100": DatasetDownload(
        files=(_mirrored((_TORONTO,), "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        folder=".",
        extract=True,
    ),
}


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stream_to_temp(url: str, folder: Path) -> tuple[Path, str]:
    """Download ``url`` into a temporary file in ``folder``; return its path and MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".download-", suffix=".part", delete=False)
    temp_path = Path(handle.name)
    try:
        with handle, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                handle.write(chunk)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path, digest.hexdigest()


def fetch_file(remote: RemoteFile, folder: Path) -> Path:
    """``folder/remote.filename``, downloaded and verified unless a verified copy is already there.

    Mirrors are tried in order; the first whose bytes match the MD5 wins. If none does, raises one
    ``DataError`` line that names the file, the failure and where to put the file by hand.
    """
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / remote.filename
    if destination.is_file() and file_md5(destination) == remote.md5:
        return destination
    failures = []
    for url in remote.urls:
        try:
            temp_path, md5 = _stream_to_temp(url, folder)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            failures.append(f"{url}: {_describe(error)}")
            continue
        if md5 != remote.md5:
            temp_path.unlink(missing_ok=True)
            failures.append(f"{url}: checksum mismatch (md5 {md5}, expected {remote.md5})")
            continue
        os.replace(temp_path, destination)
        return destination
    raise DataError(
        f"could not download {remote.filename} ({'; '.join(failures)}); download it yourself and put it at "
        f"{destination} (md5 {remote.md5})"
    )


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return " ".join(str(reason if reason is not None else error).split()) or type(error).__name__


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = Path(member.name)
    unsafe = name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir())
    if unsafe:
        raise DataError(f"refusing to unpack {archive}: unsafe entry '{member.name}'")


def extract_archive(archive: Path, destination: Path) -> None:
    """Unpack a .tar.gz into ``destination``: into a temporary folder first, then move each top entry."""
    staging = Path(tempfile.mkdtemp(dir=destination, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                _check_member(archive, member)
            tar.extractall(staging, filter="data")
        for entry in staging.iterdir():
            target = destination / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(entry, target)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"could not unpack {archive} ({_describe(error)}); delete it and download again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(name: str, root: Path) -> Path:
    """Fetch (and unpack) the official files of dataset ``name`` under ``root``; returns their folder."""
    if name not in DOWNLOADS:
        raise ConfigError(f"dataset '{name}' cannot be downloaded; available: {', '.join(sorted(DOWNLOADS))}")
    spec = DOWNLOADS[name]
    folder = root / spec.folder
    for remote in spec.files:
        path = fetch_file(remote, folder)
        if spec.extract:
            extract_archive(path, folder)
    return folder
