"""Paired multimodal datasets: every sample carries several named inputs of the same scene or class.

``sensor_mnist`` / ``sensor_cifar10``
    The same image seen by two sensors: input ``image`` is the original (the old sensor: MNIST
    gray, CIFAR-10 RGB), input ``sensor`` the same image as a new sensor records it
    (``sensor: gray_edge | spectral | lowres_noise``, ``kdforge.data.sensors``).
``av_mnist``
    Spoken and written digits paired by class, as AV-MNIST does (Vielzeuf et al., ECCV-W 2018,
    with the Free Spoken Digit Dataset instead of TIDIGITS): input ``audio`` is the log-mel
    spectrogram (1 x 40 x 63: 8 kHz, 1 s centred, 256-sample FFT, hop 128) of one FSDD
    recording, input ``image`` an MNIST image of the same digit. The FSDD split is the official
    one (takes 0-4 test, 5-49 train); each recording is paired with ``pairs_per_recording``
    MNIST images of its digit from the same MNIST split, drawn without replacement with a
    generator seeded by ``pairing_seed`` (the same pairs on every run).

Few labels (sensor transition KD): ``labels_per_class: k`` keeps the labels of k training samples
per class (seeded by ``label_seed``); ``unlabelled_per_class`` keeps that many further paired
samples per class without their label (``-1``: all of them), else they are dropped. Every
training sample then carries ``extras["labelled"]`` (bool); methods that can learn from unlabelled
samples mask their supervised term with it, and the others are refused such data.
"""

from __future__ import annotations

import dataclasses
import wave
from pathlib import Path

import numpy as np
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.audio import fix_length, log_mel
from kdforge.data.catalog import DATASETS
from kdforge.data.hashing import derive_seed
from kdforge.data.sensors import apply_sensor
from kdforge.data.sources.common import channel_stats, feature_stats, info_for, missing_files_error, resolve_root
from kdforge.data.types import DatasetInfo, DataSplits, TensorData

LABELLED_KEY = "labelled"
FSDD_RATE = 8000
FSDD_TEST_TAKES = 5  # takes 0-4 are the official test set
AUDIO_SETTINGS = {"n_fft": 256, "hop_length": 128, "n_mels": 40}
_LABEL_STREAM = 31
_PAIR_STREAM = 32


# ----------------------------------------------------------------------------- few labels
def label_budget(
    train: TensorData, labels_per_class: int | None, unlabelled_per_class: int = 0, seed: int = 0
) -> TensorData:
    """The training samples kept for a few-label run, with ``extras["labelled"]``.

    Per class, in a seeded random order: the first ``labels_per_class`` keep their label, the
    next ``unlabelled_per_class`` (all the rest for -1) are kept unlabelled. None keeps everything
    labelled.
    """
    if labels_per_class is None:
        if unlabelled_per_class:
            raise ConfigError("unlabelled_per_class needs labels_per_class (how many samples keep their label)")
        return train
    if labels_per_class < 1:
        raise ConfigError(f"labels_per_class must be >= 1, got {labels_per_class}")
    if unlabelled_per_class < -1:
        raise ConfigError(f"unlabelled_per_class must be >= 0, or -1 for all, got {unlabelled_per_class}")
    labels = train.labels
    generator = torch.Generator().manual_seed(derive_seed(seed, _LABEL_STREAM))
    shuffled = torch.randperm(len(labels), generator=generator)
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]
    counts = torch.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if labels_per_class > smallest:
        raise ConfigError(
            f"labels_per_class {labels_per_class} exceeds the {smallest} training samples of the smallest class"
        )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[labels[grouped]]
    limit = len(labels) if unlabelled_per_class == -1 else labels_per_class + unlabelled_per_class
    kept = grouped[rank < limit]
    labelled = torch.zeros(len(labels), dtype=torch.bool)
    labelled[grouped[rank < labels_per_class]] = True
    order = torch.sort(kept).values
    subset = train.select(order)
    subset.extras[LABELLED_KEY] = labelled[order]
    return subset


def _paired_info(
    dataset: str, data: TensorData, class_names: list[str], name: str, stats: tuple | None = None
) -> DatasetInfo:
    values = data.images if name == data.input_name else data.extra_inputs[name]
    if values.dtype == torch.uint8:
        mean, std = stats or channel_stats(values)
        kind = "image"
    else:
        mean, std = stats or feature_stats(values)
        kind = "spectrogram" if name == "audio" else "float"
    info = info_for(dataset, tuple(values.shape[1:]), class_names, mean, std, kind)
    return dataclasses.replace(info, input_name=name)


def _assemble(
    dataset: str,
    train: TensorData,
    test: TensorData,
    class_names: list[str],
    primary_stats: tuple | None,
) -> DataSplits:
    """DataSplits whose info describes every input (statistics from the kept training samples)."""
    primary = _paired_info(dataset, train, class_names, train.input_name, primary_stats)
    extras = {name: _paired_info(dataset, train, class_names, name) for name in train.extra_inputs}
    info = dataclasses.replace(primary, extra_inputs=extras)
    return DataSplits(train=train, val=None, test=test, info=info)


# ----------------------------------------------------------------------------- two sensors
def _sensor_splits(
    dataset: str,
    base: DataSplits,
    sensor: str,
    noise_std: float,
    labels_per_class: int | None,
    unlabelled_per_class: int,
    label_seed: int,
) -> DataSplits:
    if noise_std < 0:
        raise ConfigError(f"noise_std must be >= 0, got {noise_std}")
    parts = {}
    for split, data, stream in (("train", base.train, 0), ("test", base.test, 1)):
        if not isinstance(data, TensorData):
            raise DataError(f"{dataset}: the base dataset must be held in memory")
        reading = apply_sensor(sensor, data.images, data.indices, derive_seed(stream, 7), noise_std)
        parts[split] = TensorData(
            data.images,
            data.labels,
            name=f"{dataset}/{split}",
            indices=data.indices,
            extra_inputs={"sensor": reading},
        )
    train = label_budget(parts["train"], labels_per_class, unlabelled_per_class, label_seed)
    stats = (base.info.mean, base.info.std)
    return _assemble(dataset, train, parts["test"], base.info.class_names, stats)


@DATASETS.register("sensor_mnist")
def sensor_mnist(
    root=None,
    download: bool = False,
    sensor: str = "gray_edge",
    noise_std: float = 8.0,
    labels_per_class: int | None = None,
    unlabelled_per_class: int = 0,
    label_seed: int = 0,
) -> DataSplits:
    """MNIST seen by two sensors: inputs ``image`` (the original) and ``sensor`` (gray_edge, lowres_noise)."""
    base = DATASETS.get("mnist")(root=root, download=download)
    return _sensor_splits("sensor_mnist", base, sensor, noise_std, labels_per_class, unlabelled_per_class, label_seed)


@DATASETS.register("sensor_cifar10")
def sensor_cifar10(
    root=None,
    download: bool = False,
    sensor: str = "gray_edge",
    noise_std: float = 8.0,
    labels_per_class: int | None = None,
    unlabelled_per_class: int = 0,
    label_seed: int = 0,
) -> DataSplits:
    """CIFAR-10 seen by two sensors: inputs ``image`` (RGB) and ``sensor`` (gray_edge, spectral, lowres_noise)."""
    base = DATASETS.get("cifar10")(root=root, download=download)
    return _sensor_splits("sensor_cifar10", base, sensor, noise_std, labels_per_class, unlabelled_per_class, label_seed)


# ----------------------------------------------------------------------------- spoken digits
def _read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as handle:
            if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
                raise DataError(f"{path}: expected mono 16-bit PCM (FSDD's format)")
            if handle.getframerate() != FSDD_RATE:
                raise DataError(f"{path}: sample rate {handle.getframerate()} Hz, FSDD's is {FSDD_RATE}")
            return np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    except (OSError, EOFError, wave.Error) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def read_fsdd(folder: Path) -> dict[str, object]:
    """FSDD recordings as ``{"waves": [int16 arrays], "digit", "speaker", "take"}`` (numpy arrays).

    Reads ``fsdd.npz`` (keys ``audio``, ``offsets``, ``digit``, ``speaker``, ``index``) or the
    official ``recordings/{digit}_{speaker}_{take}.wav`` files, from ``folder``,
    ``folder/free-spoken-digit-dataset`` or ``folder/recordings``.
    """
    candidates = [folder, folder / "free-spoken-digit-dataset", folder / "fsdd"]
    for candidate in candidates:
        packed = candidate / "fsdd.npz"
        if packed.is_file():
            with np.load(packed, allow_pickle=False) as archive:
                audio, offsets = archive["audio"], archive["offsets"]
                waves = [audio[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
                return {
                    "waves": waves,
                    "digit": archive["digit"].astype(np.int64),
                    "speaker": archive["speaker"].astype(np.int64),
                    "take": archive["index"].astype(np.int64),
                }
        recordings = candidate / "recordings" if (candidate / "recordings").is_dir() else candidate
        files = sorted(recordings.glob("*_*_*.wav"))
        if files:
            rows = []
            for path in files:
                digit, speaker, take = path.stem.split("_", 2)
                if digit.isdigit() and take.isdigit():
                    rows.append((int(digit), speaker, int(take), path))
            rows.sort(key=lambda row: (row[1], row[0], row[2]))
            speakers = sorted({row[1] for row in rows})
            return {
                "waves": [_read_wav(row[3]) for row in rows],
                "digit": np.array([row[0] for row in rows], dtype=np.int64),
                "speaker": np.array([speakers.index(row[1]) for row in rows], dtype=np.int64),
                "take": np.array([row[2] for row in rows], dtype=np.int64),
            }
    raise missing_files_error(
        "av_mnist",
        candidates,
        "fsdd.npz or recordings/{digit}_{speaker}_{take}.wav",
        "clone https://github.com/Jakobovski/free-spoken-digit-dataset into audio_root",
    )


def spectrograms(waves: list[np.ndarray], seconds: float = 1.0) -> torch.Tensor:
    """float32 N x 1 x 40 x frames log-mel spectrograms of int16 recordings (DC offset removed)."""
    length = int(round(seconds * FSDD_RATE))
    batch = []
    for samples in waves:
        signal = torch.from_numpy(samples.astype(np.float64) / 32768.0)
        batch.append(fix_length(signal - signal.mean(), length))
    return log_mel(torch.stack(batch), FSDD_RATE, **AUDIO_SETTINGS).unsqueeze(1)


def pair_images(audio_digits: np.ndarray, image_labels: torch.Tensor, per_recording: int, seed: int) -> torch.Tensor:
    """For each recording, ``per_recording`` positions of distinct images of its digit (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.empty(len(audio_digits), per_recording, dtype=torch.int64)
    for digit in range(10):
        recordings = np.flatnonzero(audio_digits == digit)
        pool = torch.nonzero(image_labels == digit).flatten()
        needed = len(recordings) * per_recording
        if needed > len(pool):
            raise ConfigError(f"pairs_per_recording {per_recording} needs {needed} images of digit {digit}")
        picked = pool[torch.randperm(len(pool), generator=generator)[:needed]]
        chosen[torch.from_numpy(recordings)] = picked.view(len(recordings), per_recording)
    return chosen


@DATASETS.register("av_mnist")
def av_mnist(
    root=None,
    download: bool = False,
    audio_root: str | None = None,
    pairs_per_recording: int = 1,
    pairing_seed: int = 0,
    labels_per_class: int | None = None,
    unlabelled_per_class: int = 0,
    label_seed: int = 0,
) -> DataSplits:
    """Spoken (FSDD) and written (MNIST) digits paired by class: inputs ``image`` and ``audio``."""
    if pairs_per_recording < 1:
        raise ConfigError(f"pairs_per_recording must be >= 1, got {pairs_per_recording}")
    mnist = DATASETS.get("mnist")(root=root, download=download)
    fsdd = read_fsdd(resolve_root(audio_root if audio_root is not None else root))
    mels = spectrograms(fsdd["waves"])  # type: ignore[arg-type]
    digits: np.ndarray = fsdd["digit"]  # type: ignore[assignment]
    takes: np.ndarray = fsdd["take"]  # type: ignore[assignment]
    parts = {}
    for split, images, stream in (("train", mnist.train, 0), ("test", mnist.test, 1)):
        recordings = np.flatnonzero(takes >= FSDD_TEST_TAKES if split == "train" else takes < FSDD_TEST_TAKES)
        pairs = pair_images(
            digits[recordings], images.labels, pairs_per_recording, derive_seed(pairing_seed, _PAIR_STREAM, stream)
        )  # type: ignore[index]
        audio_rows = torch.from_numpy(recordings).repeat_interleave(pairs_per_recording)
        image_rows = pairs.flatten()
        parts[split] = TensorData(
            images.images[image_rows],
            images.labels[image_rows],
            name=f"av_mnist/{split}",
            indices=audio_rows,  # positions in the FSDD recording list
            extra_inputs={"audio": mels[audio_rows]},
        )
    train = label_budget(parts["train"], labels_per_class, unlabelled_per_class, label_seed)
    return _assemble("av_mnist", train, parts["test"], mnist.info.class_names, (mnist.info.mean, mnist.info.std))
