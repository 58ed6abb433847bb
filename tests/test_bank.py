"""The teacher bank on the bundled digits: replay equals a live teacher, keys, top-k, errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.core.checkpoint import atomic_save, model_record
from kdforge.core.errors import KDForgeError
from kdforge.data import Augmentation, BatchLoader, load_dataset
from kdforge.engine.bank import TeacherBank, TeacherBankError, default_bank_directory, file_digest
from kdforge.methods import METHODS, Step
from kdforge.models import create

SEED = 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", train_subset=200)


@pytest.fixture(scope="module")
def augmentation(digits):
    info = digits.info
    return Augmentation(crop_padding=1, horizontal_flip=True, mean=info.mean, std=info.std)


def make_teacher(name, path, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = create(name, num_classes=10, in_channels=1, input_size=(8, 8))
    if scale != 1.0:  # spread the logits so that float16 rounding is visible
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(scale)
    atomic_save(model_record(model, name=name, kwargs={}, num_classes=10, in_channels=1, input_size=(8, 8)), path)
    return model.eval()


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("teachers") / "lenet.pt"
    return make_teacher("lenet", path, seed=0, scale=1.5), path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("teachers") / "mlp.pt"
    return make_teacher("mlp", path, seed=1, scale=2.0), path


def count_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def bank_of(tmp_path, teachers, digits, augmentation, **kwargs):
    models = [t for t, _ in teachers]
    files = [f for _, f in teachers]
    options = {"seed": SEED, "batch_size": 64, **kwargs}
    return TeacherBank(tmp_path, models, files, digits.train, digits.info.name, augmentation, **options)


def live_batches(digits, augmentation, epoch, batch_size=32):
    loader = BatchLoader(digits.train, batch_size, shuffle=True, seed=SEED, augmentation=augmentation)
    loader.set_epoch(epoch)
    return list(loader)


def test_replay_equals_live_teacher_over_epochs(tmp_path, digits, augmentation, lenet):
    teacher, _ = lenet
    bank = bank_of(tmp_path, [lenet], digits, augmentation)
    for epoch in range(3):
        bank.ensure_epoch(epoch)
        for batch in live_batches(digits, augmentation, epoch)[:3]:
            with torch.inference_mode():
                live = teacher(batch.image)
            replay = bank.lookup(epoch, batch.index)
            assert replay.shape == (1, len(batch), 10) and replay.dtype == torch.float32
            torch.testing.assert_close(replay[0], live, rtol=1e-3, atol=1e-3)
            # nothing but the float16 rounding (half an ulp) separates them
            assert ((replay[0] - live).abs() <= live.abs() * 2**-11 + 1e-5).all()
    # the augmentation really differs between epochs, and so do the stored logits
    first, second = bank.raw(0)["logits"], bank.raw(1)["logits"]
    assert not torch.equal(first, second)
    assert bank.stored_epochs() == [0, 1, 2]
    meta = json.loads((bank.path / "metadata.json").read_text())
    assert meta["epochs"] == [0, 1, 2] and meta["num_classes"] == 10 and meta["num_samples"] == 200
    assert meta["teachers"][0]["digest"] == file_digest(lenet[1])
    assert meta["bytes_per_epoch"] == 200 * 1 * 10 * 2


def test_kd_loss_with_bank_equals_live_teacher(tmp_path, digits, augmentation, lenet):
    teacher, _ = lenet
    bank = bank_of(tmp_path, [lenet], digits, augmentation)
    torch.manual_seed(0)
    student = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    distiller = METHODS.get("kd")(student, [teacher])
    distiller.train()
    for epoch in (0, 4):
        bank.ensure_epoch(epoch)
        for batch in live_batches(digits, augmentation, epoch)[:2]:
            live = distiller(batch, Step(epoch=epoch, epochs=5)).loss
            batch.extras["teacher_logits"] = bank.lookup(epoch, batch.index)
            replayed = distiller(batch, Step(epoch=epoch, epochs=5)).loss
            torch.testing.assert_close(replayed, live, rtol=1e-2, atol=1e-3)
            replayed.backward()  # the stored logits do not break the student's backward pass


def test_key_identity(tmp_path, digits, augmentation, lenet, mlp):
    base = bank_of(tmp_path, [lenet], digits, augmentation)
    same = bank_of(tmp_path, [lenet], digits, augmentation)
    assert base.key == same.key and base.path == tmp_path / base.key
    info = digits.info
    other_subset = load_dataset("digits", train_subset=200, seed=1)
    assert not torch.equal(other_subset.train.indices, digits.train.indices)
    variants = {
        "seed": bank_of(tmp_path, [lenet], digits, augmentation, seed=SEED + 1),
        "top_k": bank_of(tmp_path, [lenet], digits, augmentation, top_k=3),
        "crop": bank_of(
            tmp_path, [lenet], digits, Augmentation(crop_padding=2, horizontal_flip=True, mean=info.mean, std=info.std)
        ),
        "flip": bank_of(tmp_path, [lenet], digits, Augmentation(crop_padding=1, mean=info.mean, std=info.std)),
        "mean": bank_of(
            tmp_path, [lenet], digits, Augmentation(crop_padding=1, horizontal_flip=True, mean=(0.5,), std=info.std)
        ),
        "none": bank_of(tmp_path, [lenet], digits, None),
        "subset": TeacherBank(tmp_path, [lenet[0]], [lenet[1]], other_subset.train, "digits", augmentation, SEED),
        "teacher": bank_of(tmp_path, [mlp], digits, augmentation),
        "order": bank_of(tmp_path, [mlp, lenet], digits, augmentation),
        "two": bank_of(tmp_path, [lenet, mlp], digits, augmentation),
    }
    keys = {name: bank.key for name, bank in variants.items()}
    assert base.key not in keys.values()
    assert len(set(keys.values())) == len(keys), keys
    # the same architecture and weights but a different file content (other weights) -> other key
    changed = tmp_path / "changed.pt"
    make_teacher("lenet", changed, seed=5)
    assert bank_of(tmp_path, [(lenet[0], changed)], digits, augmentation).key != base.key


def test_second_bank_reuses_files_without_running_teacher(tmp_path, digits, augmentation, lenet):
    teacher, _ = lenet
    calls, handle = count_calls(teacher)
    try:
        first = bank_of(tmp_path, [lenet], digits, augmentation)
        first.precompute(2)
        assert len(calls) == math.ceil(200 / 64) * 2 and first.has_epoch(1) and not first.has_epoch(2)
        calls.clear()
        second = bank_of(tmp_path, [lenet], digits, augmentation)
        second.precompute(2)
        index = torch.tensor([5, 0, 199, 42])
        torch.testing.assert_close(second.lookup(1, index), first.lookup(1, index), rtol=0, atol=0)
        assert calls == []
        # a bank with a non-random augmentation stores one file for every epoch
        static = bank_of(tmp_path, [lenet], digits, None)
        static.precompute(5)
        assert len(calls) == math.ceil(200 / 64) and static.has_epoch(7)
        assert sorted(p.name for p in static.path.iterdir()) == ["metadata.json", "static.pt"]
        with torch.inference_mode():
            live = teacher(digits.train.images[index].float() / 255.0)
        torch.testing.assert_close(static.lookup(3, index)[0], live, rtol=1e-3, atol=1e-3)
    finally:
        handle.remove()
    assert teacher.training is False


def test_top_k_reconstruction(tmp_path, digits, augmentation, lenet):
    full = bank_of(tmp_path, [lenet], digits, augmentation)
    top = bank_of(tmp_path, [lenet], digits, augmentation, top_k=3)
    logits = full.raw(0)["logits"]  # N x K x C float16
    stored = top.raw(0)
    assert stored["values"].dtype == torch.float16 and stored["indices"].dtype == torch.int16
    assert stored["tail"].shape == (200, 1)
    positions = stored["indices"].long()
    # the stored values are the fp16 logits at the k largest positions, exactly
    assert torch.equal(logits.gather(-1, positions), stored["values"])
    rest = logits.float().scatter(-1, positions, float("-inf"))
    assert (stored["values"].float().min(-1).values >= rest.max(-1).values).all()
    index = torch.arange(200)
    rebuilt = top.lookup(0, index).transpose(0, 1)  # N x K x C
    assert torch.equal(rebuilt.gather(-1, positions), stored["values"].float())
    # the non-top-k classes all hold the tail and keep the tail's probability mass at T = 1
    outside = torch.ones_like(rebuilt, dtype=torch.bool).scatter(-1, positions, False)
    assert torch.equal(rebuilt[outside].view(200, 1, 7), stored["tail"].float().unsqueeze(-1).expand(200, 1, 7))
    true_mass = (F.softmax(logits.float(), -1) * outside).sum(-1)
    rebuilt_mass = (F.softmax(rebuilt, -1) * outside).sum(-1)
    torch.testing.assert_close(rebuilt_mass, true_mass, rtol=2e-3, atol=1e-4)
    # top_k >= C keeps the full form
    wide = bank_of(tmp_path, [lenet], digits, augmentation, top_k=10)
    torch.testing.assert_close(wide.lookup(0, index), full.lookup(0, index), rtol=0, atol=0)


def test_two_teachers_keep_their_order(tmp_path, digits, augmentation, lenet, mlp):
    bank = bank_of(tmp_path, [lenet, mlp], digits, augmentation)
    batch = live_batches(digits, augmentation, 1, batch_size=50)[0]
    replay = bank.lookup(1, batch.index)
    assert replay.shape == (2, 50, 10)
    with torch.inference_mode():
        live = [lenet[0](batch.image), mlp[0](batch.image)]
    for stored, expected in zip(replay, live):
        torch.testing.assert_close(stored, expected, rtol=1e-3, atol=1e-3)
    # ensemble KD with unequal fixed weights (order matters) gives the live loss from the bank
    torch.manual_seed(0)
    student = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    params = {"weighting": "fixed", "teacher_weights": [0.8, 0.2]}
    distiller = METHODS.get("ensemble_kd")(student, [lenet[0], mlp[0]], params)
    swapped = METHODS.get("ensemble_kd")(student, [mlp[0], lenet[0]], params)
    live_loss = distiller(batch, Step()).loss
    swapped_loss = swapped(batch, Step()).loss
    batch.extras["teacher_logits"] = replay
    replayed_loss = distiller(batch, Step()).loss
    torch.testing.assert_close(replayed_loss, live_loss, rtol=1e-2, atol=1e-3)
    assert abs(float(swapped_loss.detach() - live_loss.detach())) > 10 * abs(
        float(replayed_loss.detach() - live_loss.detach())
    )


def test_corrupt_file_gives_one_clear_error(tmp_path, digits, augmentation, lenet):
    bank = bank_of(tmp_path, [lenet], digits, augmentation)
    bank.ensure_epoch(0)
    file = bank.epoch_file(0)
    file.write_bytes(file.read_bytes()[:100])
    fresh = bank_of(tmp_path, [lenet], digits, augmentation)
    with pytest.raises(KDForgeError) as caught:
        fresh.lookup(0, torch.arange(4))
    message = str(caught.value)
    assert str(file) in message and "delete the bank folder" in message and "\n" not in message
    # a readable file with the wrong shape (N differs) is refused the same way
    wrong = {
        "format": "kdforge-teacher-bank",
        "version": 1,
        "key": bank.key,
        "epoch": 0,
        "num_samples": 150,
        "num_teachers": 1,
        "num_classes": 10,
        "storage": "full",
        "logits": torch.zeros(150, 1, 10, dtype=torch.float16),
    }
    atomic_save(wrong, file)
    with pytest.raises(TeacherBankError, match="N=150"):
        bank_of(tmp_path, [lenet], digits, augmentation).lookup(0, torch.arange(4))


def test_unwritable_directory_gives_one_clear_error(tmp_path, digits, augmentation, lenet):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the bank folder should be")
    bank = bank_of(blocker, [lenet], digits, augmentation)
    with pytest.raises(TeacherBankError) as caught:
        bank.ensure_epoch(0)
    message = str(caught.value)
    assert "cannot write" in message and str(bank.path) in message and "KDFORGE_BANK" in message


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFORGE_BANK", str(tmp_path / "bank"))
    assert default_bank_directory() == tmp_path / "bank"
    monkeypatch.delenv("KDFORGE_BANK")
    assert default_bank_directory().parts[-3:] == (".cache", "kdforge", "teacher-bank")


def test_file_digest_follows_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 3_000_000)
    first = file_digest(path)
    assert first == file_digest(path)
    path.write_bytes(b"b" * 3_000_001)
    assert file_digest(path) != first


def test_concurrent_writers_of_one_epoch(tmp_path, digits, augmentation, lenet):
    import threading

    banks = [bank_of(tmp_path, [lenet], digits, augmentation) for _ in range(3)]
    errors = []

    def write(bank):
        try:
            bank.ensure_epoch(0)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(bank,)) for bank in banks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = sorted(p.name for p in banks[0].path.iterdir())
    assert names == ["epoch-0000.pt", "metadata.json"]  # no temporary file left behind
    # every writer produces the same bytes, so whichever rename wins, the file is the same
    other = bank_of(tmp_path / "elsewhere", [lenet], digits, augmentation)
    other.ensure_epoch(0)
    assert other.epoch_file(0).read_bytes() == banks[0].epoch_file(0).read_bytes()
    fresh = bank_of(tmp_path, [lenet], digits, augmentation)
    assert torch.equal(fresh.raw(0)["logits"], banks[1].raw(0)["logits"])
