"""Paired multimodal data: the torch log-mel front end against librosa, av_mnist pairing and split,
sensor models, few-label budgets, views and the loader's named inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data import BatchLoader, TensorData, load_dataset
from kdforge.data.audio import SpectrogramAugmentation, log_mel, mel_filterbank
from kdforge.data.sensors import apply_sensor
from kdforge.data.sources.paired import label_budget, pair_images, read_fsdd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FSDD = SHARED / "fsdd.npz"
MNIST_ROOT = Path("/work/main/data")
needs_fsdd = pytest.mark.skipif(not FSDD.is_file(), reason="FSDD (fsdd.npz) not available")
needs_mnist = pytest.mark.skipif(not (MNIST_ROOT / "MNIST").is_dir(), reason="MNIST files not available")


def _recordings(count: int = 3) -> list[np.ndarray]:
    with np.load(FSDD) as archive:
        audio, offsets = archive["audio"], archive["offsets"]
        picks = [0, 1234, 2999][:count]
        return [audio[offsets[i] : offsets[i + 1]].astype(np.float64) / 32768.0 for i in picks]


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(8000, 256, 40).double().numpy()
    theirs = librosa.filters.mel(sr=8000, n_fft=256, n_mels=40)  # Slaney scale and area norm by default
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


@needs_fsdd
def test_log_mel_matches_librosa_on_real_recordings():
    librosa = pytest.importorskip("librosa")
    for wave in _recordings():
        ours = log_mel(torch.from_numpy(wave)[None], 8000, n_fft=256, hop_length=128, n_mels=40)[0].numpy()
        power = librosa.feature.melspectrogram(
            y=wave, sr=8000, n_fft=256, hop_length=128, n_mels=40, center=True, pad_mode="constant", power=2.0
        )
        theirs = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=80.0)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_log_mel_of_a_pure_tone_peaks_in_the_right_band():
    # hand-checkable: a 1 kHz tone puts its energy in the filter whose centre is nearest 1 kHz
    t = torch.arange(8000, dtype=torch.float64) / 8000
    mels = log_mel(torch.sin(2 * torch.pi * 1000 * t)[None], 8000)[0]
    filters = mel_filterbank(8000, 256, 40)
    expected = int(filters[:, 32].argmax())  # FFT bin 32 = 1000 Hz at 8 kHz / 256
    assert int(mels[:, 30].argmax()) == expected


@needs_fsdd
def test_fsdd_reads_the_npz_and_the_official_wav_files_alike(tmp_path):
    import wave

    packed = read_fsdd(SHARED)
    assert len(packed["waves"]) == 3000
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    names = ["george", "jackson"]
    for position in (0, 1, 50):  # speaker 0: digit 0 takes 0, 1; digit 1 take 0
        digit, speaker, take = (int(packed[key][position]) for key in ("digit", "speaker", "take"))
        with wave.open(str(recordings / f"{digit}_{names[speaker]}_{take}.wav"), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(8000)
            handle.writeframes(packed["waves"][position].astype("<i2").tobytes())
    read = read_fsdd(tmp_path)
    assert read["digit"].tolist() == [0, 0, 1] and read["take"].tolist() == [0, 1, 0]
    assert np.array_equal(read["waves"][2], packed["waves"][50])


def test_pairing_is_seeded_and_class_consistent():
    audio_digits = np.array([0, 1, 1, 2, 0])
    image_labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0, 2, 1, 0, 1, 2, 1, 0])
    first = pair_images(audio_digits, image_labels, 2, seed=5)
    again = pair_images(audio_digits, image_labels, 2, seed=5)
    other = pair_images(audio_digits, image_labels, 2, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(image_labels[first], torch.from_numpy(audio_digits)[:, None].expand(5, 2))
    assert len(set(first.flatten().tolist())) == 10  # without replacement


@needs_fsdd
@needs_mnist
def test_av_mnist_split_by_take_index_and_named_inputs():
    splits = load_dataset("av_mnist", root=MNIST_ROOT, audio_root=SHARED)
    fsdd = read_fsdd(SHARED)
    assert len(splits.train) == 2700 and len(splits.test) == 300
    assert set(fsdd["take"][splits.test.indices.numpy()]) == set(range(5))
    assert min(fsdd["take"][splits.train.indices.numpy()]) == 5
    assert np.array_equal(fsdd["digit"][splits.train.indices.numpy()], splits.train.labels.numpy())
    assert splits.info.input_names == ["image", "audio"]
    assert tuple(splits.train.extra_inputs["audio"].shape[1:]) == (1, 40, 63)
    again = load_dataset("av_mnist", root=MNIST_ROOT, audio_root=SHARED)
    assert torch.equal(again.train.images, splits.train.images)  # the same pairs every run
    audio = splits.view("audio")
    assert audio.info.input_name == "audio" and audio.info.in_channels == 1 and audio.info.image_size == (40, 63)
    assert audio.info.kind == "spectrogram" and audio.info.extra_inputs["image"].image_size == (28, 28)
    loader = BatchLoader(audio.train, 16, shuffle=False, input_augmentations={})
    batch = next(iter(loader))
    assert batch.primary == "audio" and batch.image.shape == (16, 1, 40, 63)
    assert batch.inputs["image"].shape == (16, 1, 28, 28) and batch.inputs["image"].max() <= 1.0


def _paired(n: int = 40) -> TensorData:
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8)
    return TensorData(
        images,
        torch.arange(n) % 4,
        extra_inputs={"sensor": (images // 2), "audio": torch.randn(n, 1, 3, 5)},
    )


def test_loader_serves_every_named_input_with_its_own_augmentation():
    data = _paired()
    shift = SpectrogramAugmentation(mean=(1.0,), std=(2.0,))
    loader = BatchLoader(data, 8, shuffle=False, input_augmentations={"audio": shift})
    batch = loader.make_batch(torch.arange(8))
    assert set(batch.inputs) == {"image", "sensor", "audio"} and batch.primary == "image"
    assert torch.allclose(batch.inputs["audio"], (data.extra_inputs["audio"][:8] - 1.0) / 2.0)
    assert torch.allclose(batch.inputs["sensor"], data.extra_inputs["sensor"][:8].float() / 255)
    assert torch.equal(batch.image, data.images[:8].float() / 255)


def test_select_and_view_keep_every_input():
    data = _paired()
    picked = data.select(torch.tensor([3, 1]))
    assert torch.equal(picked.extra_inputs["audio"], data.extra_inputs["audio"][[3, 1]])
    viewed = picked.view("sensor")
    assert torch.equal(viewed.images, picked.extra_inputs["sensor"])
    assert torch.equal(viewed.extra_inputs["image"], picked.images) and set(viewed.extra_inputs) == {"image", "audio"}
    with pytest.raises(DataError, match="no input 'sensr'"):
        data.view("sensr")


def test_label_budget_keeps_k_labels_per_class_and_marks_the_rest():
    data = _paired(400)
    few = label_budget(data, 3, 5, seed=1)
    assert len(few) == 4 * 8
    labelled = few.extras["labelled"]
    assert torch.bincount(few.labels[labelled]).tolist() == [3, 3, 3, 3]
    assert torch.equal(label_budget(data, 3, 5, seed=1).indices, few.indices)
    assert len(label_budget(data, 3, 0, seed=1)) == 12
    assert len(label_budget(data, 3, -1, seed=1)) == 400
    with pytest.raises(ConfigError, match="labels_per_class 101"):
        label_budget(data, 101)


def test_sensor_models_are_deterministic_and_documented_shapes():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    index = torch.arange(5)
    edge = apply_sensor("gray_edge", images, index)
    assert edge.shape == (5, 2, 8, 8) and edge.dtype == torch.uint8
    flat = torch.full((1, 1, 6, 6), 100, dtype=torch.uint8)
    assert int(apply_sensor("gray_edge", flat, index[:1])[0, 1, 2:4, 2:4].max()) == 0  # no edge inside a flat patch
    assert apply_sensor("spectral", images, index).shape == (5, 3, 8, 8)
    noisy = apply_sensor("lowres_noise", images, index, seed=3)
    assert noisy.shape == (5, 3, 4, 4)
    # a sample's noise depends on its index, not on the batch it is in
    assert torch.equal(apply_sensor("lowres_noise", images[2:3], index[2:3], seed=3), noisy[2:3])
    with pytest.raises(ConfigError, match="needs RGB"):
        apply_sensor("spectral", images[:, :1], index)
    with pytest.raises(ConfigError, match="did you mean 'gray_edge'"):
        apply_sensor("gray_egde", images, index)


def test_spectrogram_augmentation_is_keyed_by_sample():
    values = torch.randn(6, 1, 5, 12)
    augment = SpectrogramAugmentation(mean=(0.0,), std=(1.0,), time_shift=3, time_mask=4, freq_mask=2)
    index = torch.arange(6)
    out = augment(values, index, seed=1, epoch=0)
    assert torch.equal(augment(values[3:4], index[3:4], seed=1, epoch=0), out[3:4])
    assert not torch.equal(out, augment(values, index, seed=1, epoch=1))
    assert torch.equal(augment(values, index, seed=1, epoch=0, train=False), values)
