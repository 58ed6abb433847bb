"""Every registered method either keeps its loss scale across batch sizes or says it does not.

A loss that is a mean over the B x B pairs of a batch (SP, PKT) scales as 1/B: an epoch's small
last batch then takes a step many times larger than the others (for SP at B = 16 against B = 128,
about x9 on CIFAR features), which threw the SP and PKT students back to chance in our CIFAR-10
benchmark. Each method is built from its defaults (through the recipe path, as ``kdforge train``
builds it) on a small ResNet pair, and its loss terms are averaged over batches of 16 and over
batches of 128 drawn from the same data. Methods whose terms agree within ``FACTOR`` must not
declare ``batch_size_dependent``; methods that declare it must show a term that moves by more than
``FACTOR`` (so the declaration stays true), and the trainer refuses to run them with a partial
last batch.
"""

import pytest
import torch
from conftest import build_method

from kdforge.config import build_config
from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step

#: a loss term of a batch-size independent method moves by less than this between B = 16 and B = 128
FACTOR = 2.0


def mean_terms(distiller, normalised, labels, batch_size, start, count):
    """Each loss term averaged over the batches of ``count`` samples from ``start``."""
    step = Step(epoch=5, epochs=10, global_step=500, total_steps=1000, lr=0.1)  # past every ramp-up
    batches = count // batch_size
    totals: dict[str, float] = {}
    for b in range(batches):
        index = torch.arange(start + b * batch_size, start + (b + 1) * batch_size)
        out = distiller(Batch({"image": normalised[index]}, labels[index], index), step)
        for key, value in out.losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / batches
    return totals


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_scale_across_batch_sizes_matches_the_declaration(name, toy_data):
    train, info, normalised = toy_data
    distiller = build_method(name, train, info)
    small = mean_terms(distiller, normalised, train.labels, 16, 0, 128)
    large = mean_terms(distiller, normalised, train.labels, 128, 128, 128)
    assert small.keys() == large.keys(), name
    ratios = {}
    for key in small:
        a, b = abs(small[key]), abs(large[key])
        if max(a, b) < 1e-5:  # a term that is zero at this point of training (e.g. near-equal peers)
            continue
        ratios[key] = a / max(b, 1e-12)
    assert ratios, f"{name}: every loss term is zero"
    moved = {k: r for k, r in ratios.items() if not 1 / FACTOR < r < FACTOR}
    if type(distiller).batch_size_dependent:
        assert moved, f"{name} declares batch_size_dependent but its terms agree within x{FACTOR}: {ratios}"
    else:
        assert not moved, (
            f"{name}: loss terms at B=16 / B=128 differ by more than x{FACTOR} ({moved}); make the loss "
            "batch-size independent or declare batch_size_dependent = True"
        )


@pytest.mark.parametrize("name", ["sp", "pkt"])
def test_trainer_refuses_a_partial_last_batch_for_batch_size_dependent_methods(name, tmp_path):
    from kdforge.core.errors import ConfigError
    from kdforge.engine.trainer import Trainer

    recipe = {
        "data": {"name": "digits", "train_subset": 100, "augment": False},
        "student": {"name": "resnet8"},
        "teachers": [{"name": "resnet14"}],
        "method": {"name": name},
        "train": {"epochs": 1, "batch_size": 32, "drop_last": False},
    }
    with pytest.raises(ConfigError, match="drop_last"):
        Trainer(build_config(recipe), tmp_path / "run").setup()
    # 100 = 4 x 25: no partial batch, so the same method is accepted without drop_last
    recipe["train"]["batch_size"] = 25
    Trainer(build_config(recipe), tmp_path / "run2").setup()


def test_training_loader_drops_the_partial_batch_by_default():
    assert build_config({"data": {"name": "digits"}, "student": {"name": "mlp"}}).train.drop_last is True
