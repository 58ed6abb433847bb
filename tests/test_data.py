"""Tests of kdforge.data: every source on small files written here in the official formats, downloads
served from file:// URLs, deterministic augmentation, splits and the loader. Real-data tests (marked
``shared_data``) materialize ../shared/data into the official formats and skip when it is absent."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data import (
    DATASETS,
    DOWNLOADS,
    Augmentation,
    Batch,
    BatchLoader,
    DatasetInfo,
    TensorData,
    default_augmentation,
    load_dataset,
)
from kdforge.data.augment import crop_pixel_index
from kdforge.data.download import DatasetDownload, RemoteFile, fetch_file
from kdforge.data.hashing import (
    mix64,
    mix64_int,
    random_below,
    sample_keys,
    to_signed64,
)
from kdforge.data.sources.common import channel_stats
from kdforge.data.splits import balanced_quota, balanced_subset, stratified_split

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
MATERIALIZE = SHARED_DATA.parent / "tools" / "materialize_datasets.py"


# --------------------------------------------------------------------------- writers (official formats)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """An IDX file: magic 0x0000 08 ndim (2051 for 3-D uint8 images, 2049 for labels), then big-endian dims."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def random_images(rng: np.random.Generator, count: int, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)


def write_mnist_files(folder: Path, gz: bool = True, train: int = 30, test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": random_images(rng, train, 28, 28),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": random_images(rng, test, 28, 28),
        "t10k-labels-idx1-ubyte": np.arange(test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


class Python2StylePickler(pickle._Pickler):
    """Writes bytes with the Python 2 'str' opcodes, as the official (Python 2) CIFAR pickles do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_as_str8(self, value: bytes) -> None:
        size = len(value)
        opcode = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(opcode + value)
        self.memoize(value)

    dispatch[bytes] = save_as_str8


def dump_cifar_pickle(path: Path, content: dict, style: str) -> None:
    """style: 'str' (Python 3 str keys), 'bytes' (bytes keys and names) or 'py2' (Python 2 opcodes)."""
    if style in ("bytes", "py2"):
        content = {key.encode(): _encode_names(value) for key, value in content.items()}
    with open(path, "wb") as handle:
        if style == "py2":
            Python2StylePickler(handle, protocol=2).dump(content)
        else:
            pickle.dump(content, handle, protocol=2 if style == "str" else pickle.DEFAULT_PROTOCOL)


def _encode_names(value):
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [name.encode() for name in value]
    return value


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """Official row layout: 1024 red, 1024 green, 1024 blue values per image."""
    return np.ascontiguousarray(images.reshape(len(images), -1))


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(folder: Path, style: str = "str", per_batch: int = 4, test: int = 6) -> dict:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    train_images = random_images(rng, 5 * per_batch, 3, 32, 32)
    train_labels = np.arange(5 * per_batch) % 10
    for number in range(5):
        part = slice(number * per_batch, (number + 1) * per_batch)
        content = {
            "batch_label": f"training batch {number + 1} of 5",
            "data": cifar_rows(train_images[part]),
            "labels": [int(v) for v in train_labels[part]],
        }
        dump_cifar_pickle(folder / f"data_batch_{number + 1}", content, style)
    test_images = random_images(rng, test, 3, 32, 32)
    dump_cifar_pickle(
        folder / "test_batch",
        {"data": cifar_rows(test_images), "labels": [int(v) for v in np.arange(test) % 10]},
        style,
    )
    dump_cifar_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072}, style)
    return {"train_images": train_images, "train_labels": train_labels, "test_images": test_images}


def write_cifar100(folder: Path, style: str = "str", train: int = 40, test: int = 10) -> dict:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for split, count in (("train", train), ("test", test)):
        fine = np.arange(count) % 100
        images = random_images(rng, count, 3, 32, 32)
        content = {
            "data": cifar_rows(images),
            "fine_labels": [int(v) for v in fine],
            "coarse_labels": [int(v) // 5 for v in fine],
            "filenames": [f"{i}.png" for i in range(count)],
        }
        dump_cifar_pickle(folder / split, content, style)
        result[split] = (images, fine)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    dump_cifar_pickle(folder / "meta", meta, style)
    return result


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def info_for(name: str = "test", channels: int = 3) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        num_classes=10,
        in_channels=channels,
        image_size=(32, 32),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        class_names=[str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------- registry and options


def test_registry_lists_every_source():
    assert DATASETS.names() == [
        "av_mnist", "breast_cancer", "cifar10", "cifar100", "csv", "diabetes", "digits", "fashion_mnist",
        "imagefolder", "iris", "mnist", "npz", "retrieval_cifar10", "retrieval_mnist", "rotated_mnist",
        "seg3d_mnist", "seg_mnist", "sensor_cifar10", "sensor_mnist", "wine",
    ]  # fmt: skip


def test_unknown_dataset_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'mnist'"):
        load_dataset("mnst")
    with pytest.raises(ConfigError, match="label_type"):
        load_dataset("cifar100", label_typ="coarse")


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)


def test_mnist_reads_gzipped_idx_in_torchvision_layout(tmp_path):
    arrays = write_mnist_files(tmp_path / "MNIST" / "raw")
    splits = load_dataset("mnist", tmp_path)
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(splits.test.labels, torch.arange(10))
    assert splits.val is None
    info = splits.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, (28, 28))
    assert info.mean == (0.1307,) and info.std == (0.3081,)


def test_mnist_reads_plain_idx_files_directly_in_root(tmp_path):
    arrays = write_mnist_files(tmp_path, gz=False)
    splits = load_dataset("mnist", tmp_path)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


def test_fashion_mnist_layout_names_and_stats(tmp_path):
    write_mnist_files(tmp_path / "FashionMNIST" / "raw")
    splits = load_dataset("fashion_mnist", tmp_path)
    assert splits.info.class_names[0] == "T-shirt/top" and splits.info.class_names[9] == "Ankle boot"
    assert splits.info.mean == (0.2860,) and splits.info.std == (0.3530,)


def test_idx_bad_magic_and_truncation_are_data_errors(tmp_path):
    write_mnist_files(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x01\x02" + labels.read_bytes()[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset("mnist", tmp_path)
    write_mnist_files(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_missing_mnist_error_names_folders_files_and_remedy(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and str(tmp_path) in message
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert name in message
    assert "download: true" in message and "materialize_datasets.py" in message


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("style", ["str", "bytes", "py2"])
def test_cifar10_reads_official_pickles(tmp_path, style):
    written = write_cifar10(tmp_path / "cifar-10-batches-py", style=style)
    splits = load_dataset("cifar10", tmp_path)
    assert splits.train.images.shape == (20, 3, 32, 32)
    assert torch.equal(splits.train.images, torch.from_numpy(written["train_images"]))  # row layout R, G, B planes
    assert torch.equal(splits.train.labels, torch.from_numpy(written["train_labels"]))
    assert torch.equal(splits.test.images, torch.from_numpy(written["test_images"]))
    assert splits.info.class_names == CIFAR10_NAMES
    assert splits.info.mean == (0.4914, 0.4822, 0.4465) and splits.info.std == (0.2470, 0.2435, 0.2616)


def test_cifar10_root_may_be_the_batches_folder(tmp_path):
    write_cifar10(tmp_path)
    assert len(load_dataset("cifar10", tmp_path).test) == 6


@pytest.mark.parametrize("style", ["str", "bytes"])
def test_cifar100_fine_and_coarse_labels(tmp_path, style):
    written = write_cifar100(tmp_path / "cifar-100-python", style=style)
    fine = load_dataset("cifar100", tmp_path)
    assert fine.info.num_classes == 100 and fine.info.class_names[3] == "fine3"
    assert torch.equal(fine.train.labels, torch.from_numpy(written["train"][1]))
    assert torch.equal(fine.train.images, torch.from_numpy(written["train"][0]))
    coarse = load_dataset("cifar100", tmp_path, label_type="coarse")
    assert coarse.info.num_classes == 20 and coarse.info.class_names[-1] == "coarse19"
    assert torch.equal(coarse.test.labels, torch.from_numpy(written["test"][1] // 5))
    assert coarse.info.mean == (0.5071, 0.4865, 0.4409)
    with pytest.raises(ConfigError, match="fine' or 'coarse"):
        load_dataset("cifar100", tmp_path, label_type="medium")


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump_cifar_pickle(folder / "test_batch", {"data": Fraction(1, 2), "labels": [0]}, "str")
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", tmp_path)


def test_missing_cifar_errors_name_files_and_remedy(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "batches.meta" in message and "materialize_datasets.py" in message
    with pytest.raises(DataError, match=r"cifar-100-python.*train, test, meta.*cifar-100-python\.tar\.gz"):
        load_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------- npz


def _npz_images(rng, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Images in ``layout`` and the same images as N x C x H x W."""
    channels = 1 if layout == "nhw" else 3
    nchw = random_images(rng, 8, channels, 6, 5)
    stored = {"nhw": nchw[:, 0], "nhwc": nchw.transpose(0, 2, 3, 1), "nchw": nchw}[layout]
    return stored, nchw


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts_are_detected(tmp_path, layout):
    rng = np.random.default_rng(3)
    x_train, expected = _npz_images(rng, layout)
    x_test, _ = _npz_images(rng, layout)
    path = tmp_path / "set.npz"
    np.savez(
        path,
        x_train=x_train,
        y_train=np.arange(8) % 4,
        x_test=x_test,
        y_test=np.arange(8) % 4,
        class_names=np.array(["a", "b", "c", "d"]),
    )
    splits = load_dataset("npz", path=path)
    assert torch.equal(splits.train.images, torch.from_numpy(expected))
    assert splits.info.class_names == ["a", "b", "c", "d"] and splits.info.num_classes == 4
    mean, std = channel_stats(splits.train.images)
    assert splits.info.mean == pytest.approx(mean) and len(mean) == expected.shape[1]
    assert load_dataset("npz", root=path).info.in_channels == expected.shape[1]


def test_npz_scales_unit_floats_and_rejects_bad_values(tmp_path):
    path = tmp_path / "set.npz"
    unit = np.linspace(0, 1, 4 * 3 * 3).reshape(4, 3, 3).astype(np.float32)
    np.savez(path, x_train=unit, y_train=np.arange(4), x_test=unit, y_test=np.arange(4))
    splits = load_dataset("npz", path=path)
    assert splits.train.images.max() == 255 and splits.info.num_classes == 4
    np.savez(path, x_train=unit * 300, y_train=np.arange(4), x_test=unit, y_test=np.arange(4))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", path=path)
    np.savez(path, x_train=np.full((4, 3, 3), 300), y_train=np.arange(4), x_test=unit, y_test=np.arange(4))
    with pytest.raises(DataError, match="0..255"):
        load_dataset("npz", path=path)


def test_npz_ambiguous_layout_needs_the_layout_option(tmp_path):
    path = tmp_path / "set.npz"
    images = np.zeros((2, 3, 8, 3), dtype=np.uint8)  # axis 1 and axis 3 could both be channels
    np.savez(path, x_train=images, y_train=np.arange(2), x_test=images, y_test=np.arange(2))
    with pytest.raises(DataError, match="ambiguous.*layout="):
        load_dataset("npz", path=path)
    assert load_dataset("npz", path=path, layout="nhwc").train.images.shape == (2, 3, 3, 8)


def test_npz_missing_file_and_keys(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", path=tmp_path / "absent.npz")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match="lacks y_train, x_test, y_test"):
        load_dataset("npz", path=tmp_path / "partial.npz")


# --------------------------------------------------------------------------- imagefolder


def _write_folder(root: Path, rgb: bool = True) -> None:
    rng = np.random.default_rng(4)
    shape = (5, 7, 3) if rgb else (5, 7)
    for split, count in (("train", 3), ("test", 1)):
        for name in ("dog", "cat"):
            for number in range(count):
                write_png(root / split / name / f"{number}.png", random_images(rng, 1, *shape)[0])


def test_imagefolder_reads_sorted_classes(tmp_path):
    _write_folder(tmp_path)
    splits = load_dataset("imagefolder", tmp_path)
    assert splits.info.class_names == ["cat", "dog"]
    assert splits.train.images.shape == (6, 3, 5, 7)
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    from PIL import Image

    first = np.array(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.equal(splits.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_imagefolder_detects_grayscale(tmp_path):
    _write_folder(tmp_path, rgb=False)
    assert load_dataset("imagefolder", tmp_path).info.in_channels == 1
    assert load_dataset("imagefolder", tmp_path, grayscale=False).info.in_channels == 3


def test_imagefolder_size_mismatch_names_the_file(tmp_path):
    _write_folder(tmp_path)
    odd = tmp_path / "train" / "dog" / "odd.png"
    write_png(odd, np.zeros((6, 7, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"odd\.png is 7x6"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_unknown_test_class_and_missing_folders(tmp_path):
    _write_folder(tmp_path)
    write_png(tmp_path / "test" / "bird" / "0.png", np.zeros((5, 7, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="bird"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset("imagefolder", tmp_path / "empty")


# --------------------------------------------------------------------------- digits


def test_digits_loads_with_fixed_stratified_split():
    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.test)) == (1297, 500)
    assert splits.train.images.shape[1:] == (1, 8, 8) and int(splits.train.images.max()) == 255
    all_counts = splits.train.class_counts(10) + splits.test.class_counts(10)
    proportional = all_counts.double() * 500 / 1797
    assert torch.all((splits.test.class_counts(10) - proportional).abs() < 1)
    assert torch.equal(load_dataset("digits").test.indices, splits.test.indices)
    assert splits.info.mean == pytest.approx(channel_stats(splits.train.images)[0])
    assert not set(splits.train.indices.tolist()) & set(splits.test.indices.tolist())


# --------------------------------------------------------------------------- splits and subsets


def test_stratified_split_is_proportional_disjoint_and_seeded():
    labels = torch.arange(1000) % 10
    labels[:100] = 0  # class 0 is larger
    kept, held = stratified_split(labels, 0.2, seed=7)
    assert len(held) == 200 and len(kept) == 800
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(1000))
    counts = torch.bincount(labels[held], minlength=10)
    expected = torch.bincount(labels, minlength=10).double() * 0.2
    assert torch.all((counts.double() - expected).abs() <= 1)
    assert torch.equal(stratified_split(labels, 0.2, seed=7)[1], held)
    assert not torch.equal(stratified_split(labels, 0.2, seed=8)[1], held)
    with pytest.raises(ConfigError):
        stratified_split(labels, 1.5, seed=0)


def test_balanced_subset_counts():
    labels = torch.arange(50000) % 10  # CIFAR-10 sized
    subset = balanced_subset(labels, 10000, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [1000] * 10
    assert torch.equal(subset, torch.sort(subset).values) and len(torch.unique(subset)) == 10000
    assert torch.equal(balanced_quota(torch.tensor([2, 50, 50]), 30), torch.tensor([2, 14, 14]))
    assert torch.equal(balanced_quota(torch.tensor([10, 10, 10]), 11), torch.tensor([4, 4, 3]))
    with pytest.raises(ConfigError):
        balanced_subset(labels, 60000, seed=0)


def test_load_dataset_carves_val_then_subset():
    splits = load_dataset("digits", val_fraction=0.2, train_subset=500, seed=3)
    assert len(splits.val) == round(0.2 * 1297) and len(splits.train) == 500
    assert splits.train.class_counts(10).tolist() == [50] * 10
    assert not set(splits.train.indices.tolist()) & set(splits.val.indices.tolist())
    assert splits.val.name == "digits/val"
    again = load_dataset("digits", val_fraction=0.2, train_subset=500, seed=3)
    assert torch.equal(again.train.indices, splits.train.indices)


# --------------------------------------------------------------------------- downloads (offline)


def _served(tmp_path: Path, name: str, payload: bytes) -> tuple[str, str]:
    source = tmp_path / "server" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(payload)
    return source.as_uri(), hashlib.md5(payload).hexdigest()


def test_fetch_file_verifies_checksum(tmp_path):
    url, md5 = _served(tmp_path, "file.bin", b"official bytes")
    path = fetch_file(RemoteFile("file.bin", md5, (url,)), tmp_path / "out")
    assert path.read_bytes() == b"official bytes"
    Path(url.removeprefix("file://")).unlink()  # a verified copy is not fetched again
    assert fetch_file(RemoteFile("file.bin", md5, (url,)), tmp_path / "out") == path


def test_fetch_file_checksum_mismatch_leaves_nothing(tmp_path):
    url, _ = _served(tmp_path, "file.bin", b"tampered bytes")
    with pytest.raises(DataError) as caught:
        fetch_file(RemoteFile("file.bin", "0" * 32, (url,)), tmp_path / "out")
    message = str(caught.value)
    assert "checksum mismatch" in message and str(tmp_path / "out" / "file.bin") in message and "\n" not in message
    assert list((tmp_path / "out").iterdir()) == []


def test_fetch_file_network_failure_and_mirror_fallback(tmp_path):
    dead = (tmp_path / "nowhere" / "file.bin").as_uri()
    with pytest.raises(DataError, match=r"could not download file\.bin .*put it at"):
        fetch_file(RemoteFile("file.bin", "0" * 32, (dead,)), tmp_path / "out")
    url, md5 = _served(tmp_path, "file.bin", b"good")
    assert fetch_file(RemoteFile("file.bin", md5, (dead, url)), tmp_path / "out").read_bytes() == b"good"


def test_mnist_download_end_to_end(tmp_path, monkeypatch):
    arrays = write_mnist_files(tmp_path / "server")
    served = [tmp_path / "server" / f"{name}.gz" for name in arrays]
    files = tuple(RemoteFile(path.name, md5_of(path), (path.as_uri(),)) for path in served)
    monkeypatch.setitem(DOWNLOADS, "mnist", DatasetDownload(files=files, folder="MNIST/raw"))
    splits = load_dataset("mnist", tmp_path / "root", download=True)
    assert len(splits.train) == 30 and (tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()


def test_cifar10_download_unpacks_verified_archive(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    remote = RemoteFile(archive.name, md5_of(archive), (archive.as_uri(),))
    monkeypatch.setitem(DOWNLOADS, "cifar10", DatasetDownload(files=(remote,), folder=".", extract=True))
    splits = load_dataset("cifar10", tmp_path / "root", download=True)
    assert len(splits.train) == 20
    leftovers = [p.name for p in (tmp_path / "root").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    bad = RemoteFile(archive.name, "f" * 32, (archive.as_uri(),))
    monkeypatch.setitem(DOWNLOADS, "cifar10", DatasetDownload(files=(bad,), folder=".", extract=True))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "other", download=True)


def test_official_download_table():
    assert DOWNLOADS["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert DOWNLOADS["cifar100"].files[0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert DOWNLOADS["mnist"].files[0].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert DOWNLOADS["fashion_mnist"].files[0].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    for spec in DOWNLOADS.values():
        assert all(url.endswith(remote.filename) for remote in spec.files for url in remote.urls)


# --------------------------------------------------------------------------- counter-based hash


def test_tensor_hash_matches_reference_splitmix64():
    values = [0, 1, 2**63 - 1, -1, -(2**63), 123456789, -987654321]
    mixed = mix64(torch.tensor(values, dtype=torch.int64))
    assert mixed.tolist() == [to_signed64(mix64_int(v)) for v in values]
    assert mix64_int(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64 first output for seed 0


def test_random_below_is_in_range_and_roughly_uniform():
    keys = sample_keys(torch.arange(20000), seed=1, epoch=2)
    draws = random_below(keys, 0, 9)
    assert int(draws.min()) == 0 and int(draws.max()) == 8
    counts = torch.bincount(draws, minlength=9).double()
    assert float(counts.min()) > 0.9 * 20000 / 9


# --------------------------------------------------------------------------- augmentation


def _cifar_like(count: int = 64, seed: int = 5) -> torch.Tensor:
    return torch.from_numpy(random_images(np.random.default_rng(seed), count, 3, 32, 32))


def test_augmentation_is_a_function_of_seed_epoch_index():
    augment = Augmentation.for_dataset(info_for(), crop_padding=4, horizontal_flip=True)
    images, index = _cifar_like(), torch.arange(100, 164)
    whole = augment(images, index, seed=3, epoch=1)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = augment(images[order], index[order], seed=3, epoch=1)
    assert torch.equal(shuffled, whole[order])
    single = augment(images[10:11], index[10:11], seed=3, epoch=1)
    assert torch.equal(single, whole[10:11])
    assert not torch.equal(augment(images, index, seed=3, epoch=2), whole)
    assert not torch.equal(augment(images, index, seed=4, epoch=1), whole)


def test_crop_index_equals_slice_of_padded_image():
    images, padding = _cifar_like(4), 4
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top, left = torch.tensor([0, 8, 3, 5]), torch.tensor([8, 0, 6, 2])
    flip = torch.tensor([False, True, False, True])
    pixel_index = crop_pixel_index(top, left, flip, (32, 32), 40)
    crops = padded.reshape(4, 3, -1).gather(2, pixel_index[:, None].expand(4, 3, -1)).view(4, 3, 32, 32)
    for b in range(4):
        expected = padded[b, :, top[b] : top[b] + 32, left[b] : left[b] + 32]
        assert torch.equal(crops[b], expected.flip(-1) if flip[b] else expected)


def test_augmented_crop_matches_hashed_offsets():
    augment = Augmentation(crop_padding=4, horizontal_flip=True, mean=(0.0,), std=(1.0,))
    images, index = _cifar_like(32), torch.arange(32)
    result = augment.crop_and_flip(images, index, seed=9, epoch=0)
    keys = sample_keys(index, 9, 0)
    top, left, flip = random_below(keys, 0, 9), random_below(keys, 1, 9), random_below(keys, 2, 2)
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for b in range(32):
        expected = padded[b, :, top[b] : top[b] + 32, left[b] : left[b] + 32]
        assert torch.equal(result[b], expected.flip(-1) if flip[b] else expected)
    assert 0 < int(flip.sum()) < 32 and len(torch.unique(top)) > 3


def test_flip_only_is_exact():
    augment = Augmentation(horizontal_flip=True, mean=(0.0,), std=(1.0,))
    images = _cifar_like(200)
    result = augment.crop_and_flip(images, torch.arange(200), seed=0, epoch=0)
    same = (result == images).flatten(1).all(1)
    flipped = (result == images.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 60 < int(flipped.sum()) < 140


def test_normalization_and_eval_mode():
    augment = Augmentation(crop_padding=4, horizontal_flip=True, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    images = _cifar_like(8)
    result = augment(images, torch.arange(8), seed=0, epoch=0, train=False)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    assert result.dtype == torch.float32
    assert torch.allclose(result, (images.float() / 255 - mean) / std, atol=1e-5)
    with pytest.raises(ConfigError):
        Augmentation(mean=(0.1, 0.2), std=(0.5,))


def test_default_augmentation_choices():
    cifar = default_augmentation(info_for("cifar100"))
    assert (cifar.crop_padding, cifar.horizontal_flip) == (4, True)
    mnist = default_augmentation(info_for("mnist", channels=1))
    assert (mnist.crop_padding, mnist.horizontal_flip, mnist.mean) == (0, False, (0.5,))


# --------------------------------------------------------------------------- loader


def _tensor_data(count: int = 10) -> TensorData:
    return TensorData(_cifar_like(count), torch.arange(count) % 3, name="toy/train")


def test_loader_covers_every_sample_once_per_epoch():
    loader = BatchLoader(_tensor_data(10), 4, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and isinstance(batches[0], Batch)
    seen = torch.cat([batch.index for batch in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert batches[0].image.dtype == torch.float32 and batches[0].index.dtype == torch.int64
    assert torch.equal(batches[0].targets, torch.arange(10)[batches[0].index] % 3)
    assert torch.equal(torch.cat([b.index for b in loader]), seen)  # same epoch, same order
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b.index for b in loader]), seen)


def test_loader_drop_last_and_unshuffled_order():
    loader = BatchLoader(_tensor_data(10), 4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert torch.cat([b.index for b in loader]).tolist() == list(range(8))
    batch = next(iter(BatchLoader(_tensor_data(10), 10, shuffle=False)))
    assert torch.allclose(batch.image, _tensor_data(10).images.float() / 255, atol=1e-5)


@pytest.mark.parametrize("count, world_size", [(10, 3), (12, 4), (2, 3)])
def test_loader_shards_are_disjoint_and_cover(count, world_size):
    shards = []
    for rank in range(world_size):
        loader = BatchLoader(_tensor_data(count), 2, seed=5, rank=rank, world_size=world_size)
        loader.set_epoch(2)
        shards.append(torch.cat([b.index for b in loader]).tolist())
    per_rank = -(-count // world_size)
    assert all(len(shard) == per_rank for shard in shards)
    everything = [i for shard in shards for i in shard]
    assert set(everything) == set(range(count))
    assert len(everything) - len(set(everything)) == per_rank * world_size - count  # only the padding repeats


def test_loader_augments_with_its_seed_and_epoch_and_moves_to_device():
    data = _tensor_data(10)
    augment = Augmentation(crop_padding=2, horizontal_flip=True, mean=(0.5,), std=(0.5,))
    loader = BatchLoader(data, 3, seed=11, augmentation=augment, device="cpu")
    loader.set_epoch(4)
    for batch in loader:
        expected = augment(data.images[batch.index], batch.index, seed=11, epoch=4)
        assert torch.equal(batch.image, expected) and batch.image.device.type == "cpu"
    evaluation = BatchLoader(data, 5, shuffle=False, augmentation=augment, train=False)
    first = next(iter(evaluation))
    assert torch.allclose(first.image, (data.images[:5].float() / 255 - 0.5) / 0.5, atol=1e-5)


def test_loader_validates_arguments():
    with pytest.raises(ConfigError):
        BatchLoader(_tensor_data(), 0)
    with pytest.raises(ConfigError):
        BatchLoader(_tensor_data(), 2, rank=2, world_size=2)


# --------------------------------------------------------------------------- real data (../shared/data)


def _shared_data_present() -> bool:
    needed = [SHARED_DATA / "mnist.npz", SHARED_DATA / "cifar10_jpeg_bytes.npz", MATERIALIZE]
    return all(path.is_file() for path in needed)


@pytest.fixture(scope="module", autouse=True)
def materialize_jobs(request, tmp_path_factory):
    """Starts writing MNIST and CIFAR-10 in the official formats (the shared script, two processes)
    when the first test of this file runs, so the unit tests overlap with it. Only when a selected
    test needs ``materialized`` and ../shared/data exists; unfinished jobs are stopped at the end."""
    wanted = any("materialized" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if not wanted or not _shared_data_present():
        yield None
        return
    root = tmp_path_factory.mktemp("official")
    jobs = [
        subprocess.Popen(
            [sys.executable, str(MATERIALIZE), str(root), "--only", only],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for only in ("mnist", "cifar10")
    ]
    yield root, jobs
    for job in jobs:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.fixture(scope="module")
def materialized(materialize_jobs):
    """The root holding MNIST/raw and cifar-10-batches-py, once the shared script has finished."""
    if materialize_jobs is None:
        pytest.skip("../shared/data is absent")
    root, jobs = materialize_jobs
    for job in jobs:
        output, _ = job.communicate(timeout=1800)  # generous: a loaded machine is slow, not broken
        assert job.returncode == 0, output.decode()
    return root


@pytest.mark.shared_data
def test_real_mnist_from_official_files(materialized):
    splits = load_dataset("mnist", materialized)
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    mean, std = channel_stats(splits.train.images)
    assert mean[0] == pytest.approx(0.1307, abs=1e-4) and std[0] == pytest.approx(0.3081, abs=1e-4)
    assert splits.train.class_counts(10).sum() == 60000


@pytest.mark.shared_data
def test_real_cifar10_from_official_pickles(materialized):
    splits = load_dataset("cifar10", materialized, train_subset=10000, val_fraction=0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10000, 5000, 10000)
    assert splits.train.class_counts(10).tolist() == [1000] * 10
    assert splits.val.class_counts(10).tolist() == [500] * 10
    assert splits.info.class_names[0] == "airplane"
    mean, _ = channel_stats(splits.test.images)
    assert mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)


@pytest.mark.shared_data
def test_real_mnist_npz_directly():
    if not (SHARED_DATA / "mnist.npz").is_file():
        pytest.skip("../shared/data is absent")
    splits = load_dataset("npz", path=SHARED_DATA / "mnist.npz")
    assert (len(splits.train), len(splits.test), splits.info.in_channels) == (60000, 10000, 1)
    assert splits.info.mean[0] == pytest.approx(0.1307, abs=1e-4)
