"""Data from anywhere: custom Datasets streamed through a DataLoader, tabular data kept as float32,
a required dataset name, eval/export reusing the run's data settings."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.config import build_config, load_config
from kdforge.core.errors import ConfigError, DataError
from kdforge.data import StreamData, TensorData, load_dataset, make_loader
from kdforge.data.augment import Augmentation

DATASET_FILE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset


    class Blobs(Dataset):
        # three well separated classes of D features; items are (x, y), read on demand
        classes = ["a", "b", "c"]

        def __init__(self, split, n, features, scale=1.0):
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            self.y = torch.arange(n) % 3
            centres = torch.eye(3, features) * 4.0
            self.x = (centres[self.y] + torch.randn(n, features, generator=g)) * scale - 2.0
            self.reads = 0

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            self.reads += 1
            return self.x[i], int(self.y[i])


    def make(split, n=60, features=5, scale=1.0):
        return Blobs(split, n, features, scale)


    def make_dict(n=30):
        return {"train": Blobs("train", n, 4), "test": Blobs("test", n, 4), "val": Blobs("test", 12, 4)}


    def make_bad(split, kind="x"):
        class Bad(Dataset):
            targets = [0, 1, 0, 1]

            def __len__(self):
                return 4

            def __getitem__(self, i):
                if kind == "raise" and i == 3:
                    raise FileNotFoundError(f"sample {i} is gone")
                if kind in ("raise", "shape"):
                    return torch.zeros(3 + (kind == "shape" and i == 3)), i % 2
                return ("text", 0) if kind == "x" else (torch.zeros(3), "cat")

        return Bad()
    """
)


@pytest.fixture()
def dataset_file(tmp_path):
    path = tmp_path / "blobs.py"
    path.write_text(DATASET_FILE)
    return path


# --------------------------------------------------------------------------- custom Datasets
def test_custom_dataset_is_streamed_with_inferred_info(dataset_file):
    splits = load_dataset(f"{dataset_file}:make", n=30, features=6, num_workers=1)
    assert isinstance(splits.train, StreamData) and isinstance(splits.test, StreamData)
    assert splits.info.num_classes == 3 and splits.info.class_names == ["a", "b", "c"]
    assert splits.info.sample_shape == (6,) and splits.info.in_channels == 6 and splits.info.kind == "stream"
    assert splits.train.labels.tolist() == [i % 3 for i in range(30)]  # read once, items in order
    assert "(streamed)" in splits.summary() and "6 features" in splits.summary()


def test_stream_loader_uses_workers_and_keeps_batch_index(dataset_file):
    splits = load_dataset(f"{dataset_file}:make", n=30, features=4, mean=[1.0], std=[2.0])
    augmentation = Augmentation(mean=splits.info.mean, std=splits.info.std)
    loader = make_loader(splits.train, 8, num_workers=2, augmentation=augmentation, seed=3, drop_last=True)
    assert len(list(loader)) == 3  # epoch 0, then epoch 1
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3 == len(loader)
    seen = torch.cat([b.index for b in batches])
    assert torch.equal(seen, loader.epoch_order()[:24])  # same seeded order as the in-memory loader
    dataset = splits.train.dataset
    for batch in batches:
        for row, position in zip(batch.image, batch.index):
            x, y = dataset[int(position)]
            assert torch.allclose(row, (x - 1.0) / 2.0)  # standardised with the given mean/std
        assert batch.targets.tolist() == [int(dataset[int(p)][1]) for p in batch.index]


def test_custom_validation_split_and_subset(dataset_file):
    splits = load_dataset(f"{dataset_file}:make", n=60, val_fraction=0.25, train_subset=30, seed=1)
    assert len(splits.val) == 15 and len(splits.train) == 30
    assert splits.train.class_counts().tolist() == [10, 10, 10]
    assert not set(splits.train.indices.tolist()) & set(splits.val.indices.tolist())
    batch = next(iter(make_loader(splits.train, 30, shuffle=False)))
    assert torch.equal(batch.image, splits.train.dataset.x[splits.train.indices])  # subset reads the right items
    with pytest.raises(ConfigError, match="smaller than the 3 classes"):
        load_dataset(f"{dataset_file}:make", n=60, train_subset=2)


@pytest.mark.parametrize(
    ("kind", "problem"), [("raise", "reading item 3 failed: FileNotFoundError"), ("shape", "differ")]
)
def test_errors_inside_loader_workers_are_one_line(dataset_file, kind, problem):
    splits = load_dataset(f"{dataset_file}:make_bad", kind=kind)
    with pytest.raises(DataError, match=problem) as caught:
        list(make_loader(splits.train, 4, num_workers=1, shuffle=False))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_custom_dict_of_splits_and_its_own_validation(dataset_file):
    splits = load_dataset(f"{dataset_file}:make_dict", n=24)
    assert len(splits.train) == 24 and len(splits.val) == 12 and splits.info.sample_shape == (4,)
    with pytest.raises(ConfigError, match="own validation split"):
        load_dataset(f"{dataset_file}:make_dict", val_fraction=0.2)


@pytest.mark.parametrize(
    ("spec", "options", "problem"),
    [
        ("{file}:absent", {}, "has no 'absent'"),
        ("no_such_module_xyz:make", {}, "cannot import"),
        ("{file}:make", {"colour": 1}, "cannot be called with"),
        ("{file}:make_bad", {"kind": "x"}, "holds a str as x"),
        ("{file}:make_bad", {"kind": "y"}, "has label 'cat'"),
        ("{file}:make", {"num_classes": 2}, "labels reach 2 but there are 2 classes"),
        ("{file}:make", {"mean": [0, 0]}, "has 2 values"),
    ],
)
def test_custom_dataset_mistakes_are_one_line(dataset_file, spec, options, problem):
    with pytest.raises((ConfigError, DataError)) as caught:
        load_dataset(spec.format(file=dataset_file), **options)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def _train(config, out):
    from kdforge.engine.trainer import Trainer

    trainer = Trainer(config, out)
    trainer.fit()
    return trainer, json.loads((out / "summary.json").read_text())


def test_recipe_with_a_dataset_file_next_to_it_trains_streamed(tmp_path, dataset_file, monkeypatch, capsys):
    """A file spec relative to the recipe, DataLoader workers, CRD (keys on Batch.index), the bank refused."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "blobs.py").write_text(DATASET_FILE)
    (folder / "teacher.yaml").write_text(
        "data: {name: 'blobs.py:make', options: {n: 90, features: 7}, augment: false, num_workers: 1}\n"
        "student: {name: mlp, kwargs: {hidden: [32]}}\n"
        "train: {epochs: 4, batch_size: 15, optimizer: {name: adam, lr: 0.01, weight_decay: 0}, progress: none}\n"
    )
    monkeypatch.chdir(tmp_path)  # blobs.py is only found relative to the recipe
    trainer, summary = _train(load_config(folder / "teacher.yaml"), tmp_path / "teacher")
    assert isinstance(trainer.data.train, StreamData)
    assert summary["final"]["test"]["top1"] > 80.0  # three separable blobs; chance is 33%
    teacher_file = tmp_path / "teacher" / "checkpoints" / "model_last.pt"
    from kdforge.cli import main

    capsys.readouterr()
    assert main(["eval", str(teacher_file), "--json"]) == 0  # the recorded options: 7 features, 90 samples
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["images"] == 90 and evaluated["top1"] == pytest.approx(summary["final"]["test"]["top1"])
    student = load_config(
        folder / "teacher.yaml",
        [
            f"teachers.0.checkpoint={teacher_file}",
            "method.name=crd",
            "method.num_negatives=32",
            "teacher_bank.enabled=true",
            f"teacher_bank.directory={tmp_path / 'bank'}",
            "train.epochs=1",
            "train.progress=auto",
            "data.num_workers=0",
        ],
    )
    trainer, summary = _train(student, tmp_path / "student")
    assert summary["status"] == "finished" and trainer.bank is None
    assert "teacher_bank ignored" in capsys.readouterr().out
    assert not (tmp_path / "bank").exists()


def test_teacher_bank_refuses_streamed_data_in_one_line(dataset_file):
    from kdforge.engine.bank import TeacherBank, TeacherBankError

    splits = load_dataset(f"{dataset_file}:make", n=9)
    with pytest.raises(TeacherBankError, match="streamed from a Dataset") as caught:
        TeacherBank(None, [torch.nn.Linear(5, 3)], [None], splits.train, "blobs", None, 0)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- tabular data
@pytest.mark.parametrize(("name", "features", "classes"), [("wine", 13, 3), ("breast_cancer", 30, 2)])
def test_bundled_tables_are_float32_standardised_on_train(name, features, classes):
    splits = load_dataset(name, val_fraction=0.2, seed=0)
    assert splits.train.images.dtype == torch.float32 and splits.train.images.shape[1] == features
    assert splits.info.num_classes == classes and splits.info.sample_shape == (features,)
    mean = splits.train.images.double().mean(0)
    assert splits.info.mean == pytest.approx(mean.tolist(), rel=1e-5)  # fitted on the carved training split
    full = load_dataset(name)
    assert splits.info.mean != full.info.mean
    batch = next(iter(make_loader(splits.train, len(splits.train), augmentation=Augmentation.for_dataset(splits.info))))
    assert batch.image.shape == (len(splits.train), features)
    assert batch.image.mean(0).abs().max() < 1e-4 and (batch.image.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_npz_tabular_keeps_negative_floats_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float64) * 1000 - 5  # negative, large, not 8-bit
    y = np.arange(40) % 2
    np.savez(tmp_path / "t.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    splits = load_dataset("npz", path=str(tmp_path / "t.npz"))
    assert splits.train.images.dtype == torch.float32
    assert torch.allclose(splits.train.images, torch.as_tensor(x, dtype=torch.float32))
    assert splits.info.sample_shape == (3,) and splits.info.in_channels == 3
    rows = ["f1,f2,kind"] + [f"{a:.3f},{b:.3f},{'cat' if k else 'dog'}" for (a, b, _), k in zip(x, y)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    table = load_dataset("csv", path=str(tmp_path / "t.csv"), test_fraction=0.25)
    assert table.info.class_names == ["cat", "dog"] and len(table.test) == 10 and len(table.train) == 30
    assert table.train.images.dtype == torch.float32 and table.info.sample_shape == (2,)
    (tmp_path / "bad.csv").write_text("f1,label\n1.0,0\nabc,1\n")
    with pytest.raises(DataError, match="line 3 holds 'abc'"):
        load_dataset("csv", path=str(tmp_path / "bad.csv"))
    with pytest.raises(ConfigError, match="augment: false"):
        from kdforge.config import DataConfig
        from kdforge.engine.build import build_augmentation

        build_augmentation(DataConfig(name="wine", augment={"crop_padding": 2}), load_dataset("wine").info)


def test_mlp_takes_rows_of_features():
    from kdforge.models import create

    model = create("mlp", num_classes=3, in_channels=13, input_size=(1, 1), hidden=[8])
    assert model(torch.randn(4, 13)).shape == (4, 3)
    assert model(torch.randn(4, 13, 1, 1)).shape == (4, 3)
    with pytest.raises(ConfigError, match="built for inputs"):
        model(torch.randn(4, 12))


def test_tabular_teacher_to_student_kd_through_the_cli(tmp_path, monkeypatch, capsys):
    """kdforge train: teacher MLP, then student MLP by KD on wine; eval and int8 export reuse the run."""
    from kdforge.cli import main

    monkeypatch.chdir(tmp_path)
    common = (
        "data: {name: wine, augment: false}\n"
        "train: {epochs: 30, batch_size: 16, optimizer: {name: adam, lr: 0.01, weight_decay: 0}, "
        "scheduler: {name: constant}, progress: none}\n"
    )
    (tmp_path / "teacher.yaml").write_text(common + "student: {name: mlp, kwargs: {hidden: [64, 64]}}\n")
    assert main(["train", "teacher.yaml", "--out", "runs/teacher"]) == 0
    (tmp_path / "student.yaml").write_text(
        common + "student: {name: mlp, kwargs: {hidden: [8]}}\n"
        "teachers: [{checkpoint: runs/teacher/checkpoints/model_last.pt}]\n"
        "method: {name: kd, temperature: 4, kd_weight: 0.9, ce_weight: 0.1}\n"
        "teacher_bank: {enabled: true, directory: bank}\n"  # float rows in memory: the bank applies
    )
    assert main(["train", "student.yaml", "--out", "runs/student"]) == 0
    assert len(list((tmp_path / "bank").glob("*/static.pt"))) == 1
    summary = json.loads((tmp_path / "runs/student/summary.json").read_text())
    top1 = summary["final"]["test"]["top1"]
    assert top1 > 80.0  # chance is 33.3% on wine's three classes
    capsys.readouterr()
    model_file = "runs/student/checkpoints/model_last.pt"
    assert main(["eval", model_file, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "wine" and result["top1"] == pytest.approx(top1)


def test_eval_reuses_the_runs_root_and_points_at_root_when_missing(tmp_path, monkeypatch, capsys):
    from kdforge.cli import main
    from kdforge.engine.trainer import Trainer

    folder = tmp_path / "table"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 60), ("test", 30)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 3)) + y[:, None] * 3
        rows = ["a,b,c,label"] + [f"{r[0]},{r[1]},{r[2]},{k}" for r, k in zip(x, y)]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    config = build_config(
        {
            "data": {"name": "csv", "root": str(folder), "augment": False, "val_fraction": 0.25},
            "student": {"name": "mlp", "kwargs": {"hidden": [8]}},
            "train": {"epochs": 3, "batch_size": 20, "optimizer": {"name": "adam", "lr": 0.02}, "progress": "none"},
        }
    )
    Trainer(config, tmp_path / "run").fit()
    model_file = tmp_path / "run" / "checkpoints" / "model_last.pt"
    from kdforge.core.checkpoint import read_model_file
    from kdforge.engine.build import recorded_augmentation, recorded_data_config

    record = read_model_file(model_file)
    cfg = recorded_data_config(record, model_file)
    assert cfg.root == str(folder) and cfg.val_fraction == 0.0
    refitted = load_dataset("csv", root=folder).info  # statistics of all 60 rows, not the run's 45
    fitted = recorded_augmentation(record, cfg, refitted)
    assert fitted.mean == tuple(record["dataset"]["mean"]) and fitted.mean != refitted.mean
    monkeypatch.chdir(tmp_path / "run")  # the recorded root, not ./data, is used
    assert main(["eval", str(model_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 30
    (folder / "test.csv").rename(folder / "moved.csv")
    assert main(["eval", str(model_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--root" in error and "data.download" not in error and "\n" not in error
    assert main(["export", str(model_file), "--int8", "--out", str(tmp_path / "m.int8.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert "--root" in error and "data.download" not in error
    (folder / "moved.csv").rename(folder / "test.csv")
    assert main(["export", str(model_file), "--int8", "--out", str(tmp_path / "m.int8.onnx"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["calibration_images"] > 0 and exported["int8_agreement"] > 0.8


def test_missing_mnist_in_eval_points_at_root(tmp_path, capsys):
    from kdforge.cli import main
    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.models import create

    model = create("mlp", num_classes=10, in_channels=1, input_size=(28, 28))
    record = model_record(
        model, name="mlp", kwargs={}, num_classes=10, in_channels=1, input_size=(28, 28), dataset={"name": "mnist"}
    )
    atomic_save(record, tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--root", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert "mnist: dataset files not found" in error and "pass --root" in error and "data.download" not in error


# --------------------------------------------------------------------------- a dataset is required
@pytest.mark.parametrize("recipe", [{"student": {"name": "mlp"}}, {"data": {"seed": 1}, "student": {"name": "mlp"}}])
def test_a_recipe_without_a_dataset_is_refused(recipe):
    with pytest.raises(ConfigError) as caught:
        build_config(recipe)
    message = str(caught.value)
    assert "data.name" in message and "kdforge list datasets" in message and "\n" not in message
    assert build_config(recipe, ["data.name=wine"]).data.name == "wine"


def test_list_datasets_names_the_tables_and_the_factory_form(capsys):
    from kdforge.cli import main

    assert main(["list", "datasets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("wine", "breast_cancer", "iris", "csv")) and "'module:function'" in listed


# --------------------------------------------------------------------------- bad data files
def _idx_header_only(path, ndim_bytes):
    path.write_bytes(bytes([0, 0, 0x08, 3]) + ndim_bytes)


def test_truncated_idx_header_is_one_line(tmp_path):
    from kdforge.data.sources.idx import read_idx

    _idx_header_only(tmp_path / "short", b"\x00\x00")  # 3 dimensions declared, 2 bytes of them present
    with pytest.raises(DataError, match="truncated.*header") as caught:
        read_idx(tmp_path / "short")
    assert "\n" not in str(caught.value)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage-not-deflate")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_cifar_string_labels_are_one_line(tmp_path):
    import pickle

    from kdforge.data.sources.cifar import _read_batch

    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]}, handle)
    with pytest.raises(DataError, match="class indices") as caught:
        _read_batch(tmp_path / "data_batch_1", "labels")
    assert "\n" not in str(caught.value)
    (tmp_path / "garbage").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(DataError, match="cannot read CIFAR pickle"):
        _read_batch(tmp_path / "garbage", "labels")


def test_truncated_or_corrupt_npz_and_bad_options(tmp_path):
    x = np.zeros((4, 2), np.float32)
    np.savez(tmp_path / "good.npz", x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    for name in ("cut.npz", "noise.npz"):
        with pytest.raises(DataError, match="cannot read.*intact np.savez archive") as caught:
            load_dataset("npz", path=str(tmp_path / name))
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="must be a file path"):
        load_dataset("npz", path=123)
    np.savez(tmp_path / "text.npz", x_train=x, y_train=np.array(["a", "b", "a", "b"]), x_test=x, y_test=np.arange(4))
    with pytest.raises(DataError, match="class indices"):
        load_dataset("npz", path=str(tmp_path / "text.npz"))
    np.save(tmp_path / "single.npy", x)
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match="np.savez"):
        load_dataset("npz", path=str(tmp_path / "single.npz"))


def test_imagefolder_broken_image_is_one_line(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        noise = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / split / "a" / "0.png")
    data = (tmp_path / "train" / "a" / "0.png").read_bytes()
    (tmp_path / "train" / "a" / "1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decode") as caught:
        load_dataset("imagefolder", root=tmp_path)
    assert "\n" not in str(caught.value)


def test_train_subset_smaller_than_the_classes_is_refused():
    with pytest.raises(ConfigError, match="train_subset 5 is smaller than the 10 classes of 'digits'") as caught:
        load_dataset("digits", train_subset=5)
    assert "\n" not in str(caught.value)
    assert load_dataset("digits", train_subset=10).train.class_counts(10).tolist() == [1] * 10


def test_in_memory_tensor_data_accepts_float_features_only_as_float32():
    assert TensorData(torch.zeros(3, 5), torch.zeros(3)).is_float
    with pytest.raises(DataError, match="float32 features"):
        TensorData(torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3))


# --------------------------------------------------------------------------- real files, streamed
REAL_DATA = Path(os.environ.get("KDFORGE_DATA", Path(__file__).parents[1] / "data"))
MEMMAP_DATASET = textwrap.dedent(
    """
    import gzip
    from pathlib import Path

    import numpy as np
    import torch
    from torch.utils.data import Dataset


    class MemmapMNIST(Dataset):
        # images stay on disk (np.memmap over the un-gzipped IDX file); one item is read per index
        def __init__(self, raw, cache, split):
            prefix = "train" if split == "train" else "t10k"
            images = Path(cache) / f"{prefix}-images"
            if not images.is_file():
                images.write_bytes(gzip.decompress((Path(raw) / f"{prefix}-images-idx3-ubyte.gz").read_bytes()))
            self.images = np.memmap(images, dtype=np.uint8, mode="r", offset=16).reshape(-1, 1, 28, 28)
            labels = gzip.decompress((Path(raw) / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
            self.targets = np.frombuffer(labels, dtype=np.uint8, offset=8).astype(np.int64)

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.from_numpy(np.array(self.images[i])), int(self.targets[i])


    def make(split, raw, cache):
        return MemmapMNIST(raw, cache, split)
    """
)


def test_real_mnist_streamed_from_a_memmap_dataset(tmp_path):
    """Official MNIST files behind a user's Dataset: uint8 items, random crops, workers, a subset."""
    raw = REAL_DATA / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files are absent from {raw} (set KDFORGE_DATA)")
    (tmp_path / "memmap_mnist.py").write_text(MEMMAP_DATASET)
    config = build_config(
        {
            "data": {
                "name": f"{tmp_path / 'memmap_mnist.py'}:make",
                "options": {"raw": str(raw), "cache": str(tmp_path), "mean": 0.1307, "std": 0.3081},
                "augment": {"crop_padding": 2},
                "train_subset": 2000,
                "num_workers": 2,
            },
            "student": {"name": "mlp", "kwargs": {"hidden": [64]}},
            "train": {"epochs": 1, "batch_size": 50, "optimizer": {"name": "adam", "lr": 0.003}, "progress": "none"},
        }
    )
    trainer, summary = _train(config, tmp_path / "run")
    assert trainer.info.sample_shape == (1, 28, 28) and trainer.info.num_classes == 10
    assert len(trainer.data.train) == 2000 and trainer.data.train.class_counts(10).tolist() == [200] * 10
    assert summary["final"]["test"]["top1"] > 75.0  # 10,000 official test images; chance is 10%


def test_a_suite_finds_a_dataset_file_beside_it(tmp_path, monkeypatch):
    from kdforge.suite import load_suite, plan

    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "blobs.py").write_text(DATASET_FILE)
    (folder / "s.yaml").write_text(
        "name: s\nseeds: [0]\nbase: {data: {name: 'blobs.py:make', augment: false}, train: {epochs: 1}}\n"
        "pairs: [{student: {name: mlp}}]\nmethods: {ce: {method: {name: ce}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    spec, where = load_suite(folder / "s.yaml")
    (run,) = plan(spec, where, tmp_path / "out")
    assert run.recipe["data"]["name"] == f"{(folder / 'blobs.py').resolve()}:make"
    assert build_config(run.recipe).data.name == run.recipe["data"]["name"]
