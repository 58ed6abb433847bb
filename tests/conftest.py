"""Shared test setup."""

import pytest
import torch

from kdforge.data.batch import Batch


def batch_of(x, y=None, index=None, negatives=None, classes=10):
    """A Batch of images ``x``: labels ``y`` (default ``arange % classes``), sample indices
    ``index`` (default ``arange``) and, for contrastive methods, fixed ``negatives`` (B x K).
    Shared by the method tests: ``from conftest import batch_of``."""
    n = len(x)
    y = torch.arange(n) % classes if y is None else torch.as_tensor(y)
    index = torch.arange(n) if index is None else torch.as_tensor(index)
    extras = {} if negatives is None else {"contrast_index": torch.as_tensor(negatives)}
    return Batch({"image": x}, y, index, extras)


@pytest.fixture(autouse=True)
def single_thread_and_seed():
    """Tiny models run faster and steadier on one thread on a busy 2-core machine; a fixed seed
    makes every test independent of the ones before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- every method, built as `train` does
#: recipe overrides for methods that cannot run on a plain student, and cheaper attacks (tests that
#: build every registered method do not depend on the number of PGD steps)
METHOD_OVERRIDES = {
    "nonn": {"student": {"name": "nonn", "kwargs": {"student": "resnet8", "num_students": 2}}},
    "adv_ce": {"method": {"steps": 2}},
    "ard": {"method": {"steps": 2}},
    "robust_prune": {"method": {"steps": 2}},
}
TOY_CLASSES, TOY_CHANNELS, TOY_SIZE, TOY_SAMPLES = 10, 3, 8, 256


@pytest.fixture(scope="session")
def toy_data():
    """(train split, info, normalised images): a prototype per class plus noise, uint8 like real data."""
    from kdforge.data.types import DatasetInfo, TensorData

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(TOY_SAMPLES) % TOY_CLASSES
    prototypes = torch.rand(TOY_CLASSES, TOY_CHANNELS, TOY_SIZE, TOY_SIZE, generator=g)
    images = prototypes[labels] * 0.6 + torch.rand(TOY_SAMPLES, TOY_CHANNELS, TOY_SIZE, TOY_SIZE, generator=g) * 0.4
    train = TensorData((images * 255).to(torch.uint8), labels)
    info = DatasetInfo(
        "toy",
        TOY_CLASSES,
        TOY_CHANNELS,
        (TOY_SIZE, TOY_SIZE),
        (0.5,) * TOY_CHANNELS,
        (0.25,) * TOY_CHANNELS,
        [str(c) for c in range(TOY_CLASSES)],
    )
    normalised = (train.images.float() / 255 - 0.5) / 0.25
    return train, info, normalised


def build_method(name, train, info):
    """Method ``name`` from its defaults through the recipe path (resnet8 student, resnet14
    teachers as many as it needs), in training mode."""
    from kdforge.config import build_config
    from kdforge.engine.build import build_distiller
    from kdforge.methods import METHODS

    minimum = METHODS.get(name).teachers_required[0]
    recipe = {
        "data": {"name": "digits"},
        "student": {"name": "resnet8"},
        "teachers": [{"name": "resnet14"}] * minimum,
        "method": {"name": name},
        "train": {"epochs": 10},
    }
    for key, value in METHOD_OVERRIDES.get(name, {}).items():
        recipe[key] = {**recipe[key], **value}
    torch.manual_seed(0)
    distiller, _ = build_distiller(build_config(recipe), info, train)
    return distiller.train()
