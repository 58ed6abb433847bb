"""cGAN-KD: conditional GANs (kdforge.generative), GAN runs, sample processing, the pipeline."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from kdforge.config import ConfigError
from kdforge.data.catalog import DATASETS
from kdforge.generative import (
    EMA,
    ConditionalGenerator,
    ProjectionDiscriminator,
    frechet_distance,
    hinge_discriminator_loss,
    hinge_generator_loss,
    sample_vicinal_batch,
    vicinity_weights,
)
from kdforge.generative.images import png_bytes
from kdforge.generative.processing import (
    fit_density_ratio,
    quantile_filter,
    rejection_sample,
    teacher_labels,
    teacher_losses,
)

TINY_GAN = {"width": 8, "discriminator_width": 8, "latent_dim": 8, "embed_dim": 8}


# ----------------------------------------------------------------------------- losses and networks
def test_hinge_losses_match_hand_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # D: mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, .5])) = 0.25 + 0.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("classes", [10, None])
def test_generator_and_projection_discriminator_shapes(size, channels, classes):
    generator = ConditionalGenerator(classes, size, channels, latent_dim=8, width=8, embed_dim=8)
    discriminator = ProjectionDiscriminator(classes, size, channels, width=8)
    labels = torch.tensor([0, 3, 9]) if classes else torch.tensor([0.0, 0.4, 1.0])
    images = generator(torch.randn(3, 8), labels)
    assert images.shape == (3, channels, size, size)
    assert images.abs().max() <= 1.0
    assert discriminator(images, labels).shape == (3,)


def test_projection_term_is_the_inner_product_with_the_label_embedding():
    discriminator = ProjectionDiscriminator(4, 28, 1, width=8).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        h = discriminator.features(images).sum(dim=(2, 3))
        a = discriminator(images, torch.tensor([0, 0]))
        b = discriminator(images, torch.tensor([3, 3]))
        expected = (
            (discriminator.embedding(torch.tensor([0, 0])) - discriminator.embedding(torch.tensor([3, 3]))) * h
        ).sum(1)
    assert torch.allclose(a - b, expected, atol=1e-4)
    assert not torch.allclose(a, b)  # the label changes the score


def test_ema_update_is_the_moving_average():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    ema.updates.fill_(100)  # past the warm-up: (1 + 100) / (10 + 100) > 0.9, so the rate is 0.9
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, before + 0.1)
    assert EMA(model, decay=0.999).rate() == pytest.approx(0.1)  # the first update: (1 + 0) / (10 + 0)
    assert not ema.model.weight.requires_grad


def test_hard_vicinity_weights_by_hand():
    labels = torch.tensor([0.0, 0.1, 0.2, 0.5])
    weights = vicinity_weights(labels, torch.tensor([0.12, 0.5]), kind="hard", kappa=0.1)
    # 0.12: 0.1 (distance .02) and 0.2 (.08) are within 0.1, 0.0 (.12) is not; 0.5: only itself
    assert torch.allclose(weights, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    soft = vicinity_weights(labels, torch.tensor([0.1]), kind="soft", nu=100.0)
    raw = torch.exp(-100.0 * (labels - 0.1) ** 2)
    assert torch.allclose(soft[0], raw / raw.sum(), atol=1e-6)


def test_vicinal_batches_pick_real_images_inside_the_vicinity():
    labels = torch.rand(200, generator=torch.Generator().manual_seed(0))
    draw = sample_vicinal_batch(labels, 64, sigma=0.05, kappa=0.03, generator=torch.Generator().manual_seed(1))
    assert ((labels[draw.real_index] - draw.targets).abs() <= 0.03 + 1e-6).all()
    assert ((draw.fake_labels - draw.targets).abs() <= 0.03 + 1e-6).all()
    assert draw.targets.min() >= 0 and draw.targets.max() <= 1


def test_frechet_distance_zero_for_the_same_features_and_grows_with_a_shift():
    features = torch.randn(400, 3, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean shifted by 2 in every one of 3 dimensions: about 3 * 2^2
    assert frechet_distance(features, features + 2.0) == pytest.approx(12.0, rel=1e-3)


def test_png_writer_produces_a_valid_png():
    image = torch.arange(2 * 3, dtype=torch.uint8).reshape(1, 2, 3) * 40
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    rows = zlib.decompress(data[start : start + length])
    assert rows == b"\x00" + bytes([0, 40, 80]) + b"\x00" + bytes([120, 160, 200])


# ----------------------------------------------------------------------------- processing
def test_filter_and_relabel_counts_on_a_fabricated_teacher():
    # 20 samples, conditioned 10 on class 0 then 10 on class 1; the teacher's logit for the
    # conditioning class falls with the position, and samples 7-9 (class 0) it calls class 1
    conditioning = torch.tensor([0] * 10 + [1] * 10)
    outputs = torch.zeros(20, 2)
    for i in range(20):
        outputs[i, conditioning[i]] = 5.0 - 0.5 * (i % 10)
    outputs[7:10, 1] = 6.0
    losses = teacher_losses(outputs, conditioning, classification=True)
    keep = quantile_filter(losses, 0.5, conditioning)
    assert keep.sum() == 10  # half of each class
    assert keep[:5].all() and not keep[5:10].any() and keep[10:15].all()
    labels = teacher_labels(outputs, classification=True)
    assert (labels != conditioning).sum() == 3
    assert (labels[keep] != conditioning[keep]).sum() == 0  # the disagreeing ones were filtered out
    regression = teacher_labels(torch.tensor([[0.2], [0.7]]), classification=False)
    assert torch.allclose(regression, torch.tensor([0.2, 0.7]))
    errors = teacher_losses(torch.tensor([[0.2], [0.7]]), torch.tensor([0.25, 0.1]), classification=False)
    assert torch.allclose(errors, torch.tensor([0.05, 0.6]))


def test_density_ratio_subsampling_keeps_the_expected_fraction():
    # real ~ N(0, I); generated: half from the same N(0, I), half from N((5, 0), I). The true
    # ratio is 2 on the good half and ~0 on the bad one, so rejection sampling keeps ~50%,
    # almost all of it from the good half.
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 2, generator=g)
    fake = torch.cat([torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g) + torch.tensor([5.0, 0.0])])
    labels = torch.zeros(2000, dtype=torch.int64)
    ratio = fit_density_ratio(real, labels, fake, labels, 2, seed=0)
    keep = rejection_sample(ratio(fake, labels), labels, generator=g)
    assert 0.38 < keep.float().mean() < 0.6
    assert keep[:1000].sum() > 0.95 * keep.sum()


def test_rejection_sampling_per_group_bound():
    scores = torch.tensor([1.0, 1.0, 0.0, 10.0, 10.0, 0.0])
    keep = rejection_sample(scores, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert keep.tolist() == [True, True, False, True, True, False]  # each group's max is its own bound


# ----------------------------------------------------------------------------- runs
def _gan_recipe(**changes):
    recipe = {
        "kind": "gan",
        "name": "tiny_gan",
        "data": {"name": "digits", "augment": False, "train_subset": 200},
        "gan": TINY_GAN,
        "train": {"epochs": 2, "batch_size": 50, "progress": "none"},
    }
    recipe.update(changes)
    return recipe


def test_gan_run_writes_the_run_directory_and_resumes_to_the_same_state(tmp_path):
    from kdforge.engine.gan import GanTrainer
    from kdforge.engine.runs import build_any_config
    from kdforge.engine.trainer import RunInterrupted

    config = build_any_config(_gan_recipe())
    whole = GanTrainer(config, tmp_path / "whole")
    summary = whole.fit()
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/state.pt", "checkpoints/generator.pt"):
        assert (tmp_path / "whole" / name).is_file(), name
    grid = (tmp_path / "whole" / "samples" / "epoch_002.png").read_bytes()
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()) == 2

    def stop_after_first(trainer, epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        GanTrainer(config, tmp_path / "split", callbacks=[stop_after_first]).fit()
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["status"] == "interrupted"
    with pytest.raises(ConfigError, match="--resume"):
        GanTrainer(config, tmp_path / "split").fit()
    resumed = GanTrainer(config, tmp_path / "split", resume=True)
    assert resumed.fit()["status"] == "finished"
    for a, b in zip(whole.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "split" / "samples" / "epoch_002.png").read_bytes() == grid


@pytest.fixture
def rotated_digits():
    """A tiny regression dataset: the bundled digits rotated by a known angle (target angle / 90)."""
    from kdforge.data.sources.rotated import rotate_images

    name = "test_rotated_digits"
    if name not in DATASETS:

        @DATASETS.register(name)
        def _rotated(root=None, download=False):
            base = DATASETS.get("digits")()
            splits = {}
            for which, split in (("train", base.train), ("test", base.test)):
                g = torch.Generator().manual_seed(1 if which == "train" else 2)
                angles = torch.rand(len(split), generator=g) * 90.0
                splits[which] = dataclasses.replace(
                    split, images=rotate_images(split.images, angles), targets=angles / 90.0
                )
            info = dataclasses.replace(
                base.info,
                name=name,
                num_classes=1,
                class_names=["angle"],
                task="regression",
                target_scale=90.0,
                target_unit="°",
            )
            return dataclasses.replace(base, train=splits["train"], test=splits["test"], info=info)

    yield name
    DATASETS._entries.pop(name, None)  # the registry is global: leave it as the other tests expect it


def _pipeline(data: dict, samples: int, subsample: str) -> dict:
    train = {
        "epochs": 2,
        "batch_size": 64,
        "progress": "none",
        "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "scheduler": {"name": "constant"},
    }
    teacher = {"checkpoint": "{teacher}/checkpoints/model_last.pt"}
    return {
        "pipeline": {
            "teacher": {"data": data, "student": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": train},
            "gan": {
                "kind": "gan",
                "data": data,
                "gan": TINY_GAN,
                "train": {"epochs": 1, "batch_size": 50, "progress": "none"},
                "quality": {"feature_model": "{teacher}/checkpoints/model_last.pt", "samples": 50},
            },
            "generate": {
                "kind": "generate",
                "generator": "{gan}",
                "teacher": teacher,
                "samples": samples,
                "subsample": {"method": subsample, "epochs": 30},
            },
            "student": {
                "data": {**data, "generated": "{generate}"},
                "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
                # any method takes the mixed data: KD for classes, the plain loss for a regression
                **({"teachers": [teacher], "method": {"name": "kd"}} if data["name"] == "digits" else {}),
                "train": train,
            },
        }
    }


@pytest.mark.parametrize("subsample", ["confidence", "density_ratio"])
def test_cgan_kd_pipeline_end_to_end_classification(tmp_path, subsample):
    from kdforge.cli import train_run
    from kdforge.engine.build import build_data
    from kdforge.engine.pipeline import run_pipeline

    data = {"name": "digits", "augment": False, "train_subset": 300}
    summaries = run_pipeline(_pipeline(data, 200, subsample), tmp_path, tmp_path / "run", [], train_run)
    counts = summaries["generate"]["counts"]
    assert counts["generated"] == 200
    assert counts["kept"] + counts["dropped_by_subsampling"] + counts["dropped_by_filter"] == 200
    assert counts["kept"] > 0
    assert sum(summaries["generate"]["kept_per_class"]) == counts["kept"]
    assert summaries["gan"]["final"]["quality"]["fid_like"] >= 0
    assert summaries["student"]["status"] == "finished"
    saved = torch.load(tmp_path / "run" / "generate" / "generated.pt", weights_only=True)
    assert saved["images"].dtype == torch.uint8 and len(saved["labels"]) == counts["kept"]
    from kdforge.config import DataConfig

    mixed = build_data(
        DataConfig(name="digits", augment=False, train_subset=300, generated=str(tmp_path / "run" / "generate"))
    )
    assert len(mixed.train) == 300 + counts["kept"]
    assert len(mixed.test) == 500  # the test split stays real
    assert (tmp_path / "run" / "generate" / "kept.png").is_file()


def test_cgan_kd_pipeline_end_to_end_regression(tmp_path, rotated_digits):
    from kdforge.cli import train_run
    from kdforge.engine.pipeline import run_pipeline

    data = {"name": rotated_digits, "augment": False}
    summaries = run_pipeline(_pipeline(data, 120, "density_ratio"), tmp_path, tmp_path / "run", [], train_run)
    assert summaries["gan"]["method"] == "ccgan" and summaries["gan"]["vicinity"]["kappa"] > 0
    assert "label_mae" in summaries["gan"]["final"]["quality"]
    counts = summaries["generate"]["counts"]
    assert counts["kept"] + counts["dropped_by_subsampling"] + counts["dropped_by_filter"] == 120
    saved = torch.load(tmp_path / "run" / "generate" / "generated.pt", weights_only=True)
    assert saved["targets"].dtype == torch.float32 and len(saved["targets"]) == counts["kept"]
    assert math.isfinite(summaries["student"]["final"]["test"]["mae"])
    # soft relabelling needs class probabilities: refused in one line for a continuous label
    from kdforge.engine.generate import build_generate_config, generate_run

    soft = build_generate_config(
        {
            "generator": str(tmp_path / "run" / "gan"),
            "teacher": {"checkpoint": str(tmp_path / "run" / "teacher" / "checkpoints" / "model_last.pt")},
            "samples": 20,
            "relabel": "soft",
        }
    )
    with pytest.raises(ConfigError, match="relabel: soft needs class labels") as error:
        generate_run(soft, tmp_path / "soft")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"kind": "gna", "data": {"name": "digits"}}, "unknown kind|bad value for 'kind': 'gna'.*did you mean 'gan'"),
        (_gan_recipe(gan={"widht": 8}), "unknown key 'gan.widht'.*width"),
        (_gan_recipe(train={"epochs": 0}), "train.epochs"),
        ({"kind": "generate", "teacher": {"checkpoint": "t.pt"}}, "generator"),
    ],
)
def test_bad_recipe_keys_are_one_line_errors(recipe, message):
    from kdforge.engine.runs import build_any_config

    with pytest.raises(ConfigError, match=message) as error:
        build_any_config(recipe)
    assert "\n" not in str(error.value)


def test_missing_generated_samples_is_one_line(tmp_path):
    from kdforge.config import DataConfig
    from kdforge.engine.build import build_data

    with pytest.raises(ConfigError, match="kind: generate") as error:
        build_data(DataConfig(name="digits", generated=str(tmp_path / "nowhere")))
    assert "\n" not in str(error.value)


def test_missing_generator_is_one_line(tmp_path):
    from kdforge.engine.gan import read_generator

    with pytest.raises(ConfigError, match="kind: gan"):
        read_generator(Path(tmp_path) / "no_gan")


def test_kdforge_train_runs_a_gan_recipe_and_reports_bad_keys_in_one_line(tmp_path, capsys):
    import yaml

    from kdforge.cli import main

    recipe = _gan_recipe(train={"epochs": 1, "batch_size": 50, "progress": "none"})
    (tmp_path / "gan.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "gan.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert (tmp_path / "run" / "samples" / "epoch_001.png").is_file()
    capsys.readouterr()
    code = main(["train", str(tmp_path / "gan.yaml"), "--out", str(tmp_path / "bad"), "--set", "vicinity.kapa=0.1"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "unknown key 'vicinity.kapa'" in error and "kappa" in error


def test_class_gan_scores_each_fake_with_the_class_it_was_made_for(tmp_path):
    from kdforge.engine.gan import GanTrainer
    from kdforge.engine.runs import build_any_config

    trainer = GanTrainer(build_any_config(_gan_recipe()), tmp_path / "run")
    trainer.setup()
    try:
        real, conditioning, fake_labels, weights = next(iter(trainer._real_batches(0)))
        assert torch.equal(conditioning, fake_labels) and weights is None
        assert real.min() >= -1.0 and real.max() <= 1.0
    finally:
        trainer.lock.release()


# ----------------------------------------------------------------------------- soft relabelling
def test_soft_labels_are_softened_teacher_probabilities():
    from kdforge.generative.processing import soft_labels

    logits = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    sharp, soft = soft_labels(logits), soft_labels(logits, temperature=4.0)
    assert torch.allclose(sharp.sum(1), torch.ones(2)) and torch.allclose(soft.sum(1), torch.ones(2))
    assert torch.allclose(sharp, logits.softmax(1))
    assert torch.equal(soft.argmax(1), teacher_labels(logits, classification=True))
    assert (soft.max(1).values < sharp.max(1).values).all()  # a higher temperature flattens


def test_soft_relabelling_pipeline_trains_a_student_on_class_probabilities(tmp_path):
    from kdforge.cli import train_run
    from kdforge.config import DataConfig
    from kdforge.engine.build import build_data
    from kdforge.engine.pipeline import run_pipeline

    data = {"name": "digits", "augment": False, "train_subset": 300}
    recipe = _pipeline(data, 200, "none")
    recipe["pipeline"]["generate"].update(relabel="soft", relabel_temperature=2.0)
    recipe["pipeline"]["student"].update(method={"name": "ce"})
    recipe["pipeline"]["student"].pop("teachers")
    summaries = run_pipeline(recipe, tmp_path, tmp_path / "run", [], train_run)
    assert "relabel soft (T 2)" in summaries["generate"]["processing"]
    saved = torch.load(tmp_path / "run" / "generate" / "generated.pt", weights_only=True)
    kept = summaries["generate"]["counts"]["kept"]
    assert saved["targets"].shape == (kept, 10) and saved["relabelling"] == "soft"
    assert torch.allclose(saved["targets"].sum(1), torch.ones(kept), atol=1e-5)
    assert torch.equal(saved["targets"].argmax(1), saved["labels"])  # labels: the arg-max, for class counts
    assert float(saved["targets"].max()) < 1.0  # soft, not one-hot
    mixed = build_data(DataConfig(**data, generated=str(tmp_path / "run" / "generate")))
    targets = mixed.train.targets
    assert targets.shape == (300 + kept, 10) and targets.dtype == torch.float32
    assert torch.equal(targets[:300], torch.nn.functional.one_hot(mixed.train.labels[:300], 10).float())
    assert mixed.test.targets.dtype == torch.int64  # evaluation stays on real class indices
    assert summaries["student"]["status"] == "finished"
    assert math.isfinite(summaries["student"]["final"]["test"]["loss"])


# ----------------------------------------------------------------------------- augmentation on angle targets
def test_horizontal_flip_on_angle_regression_is_refused_in_one_line():
    from kdforge.config import DataConfig
    from kdforge.engine.build import build_augmentation

    digits = DATASETS.get("digits")().info
    angles = dataclasses.replace(digits, name="rotated_mnist", task="regression", num_classes=1, target_unit="°")
    flip = DataConfig(name="rotated_mnist", augment={"horizontal_flip": True})
    with pytest.raises(ConfigError, match="horizontal_flip: false") as error:
        build_augmentation(flip, angles)
    assert "\n" not in str(error.value) and "angle" in str(error.value)
    # crops keep the angle; flips are fine for regression targets that are not angles
    assert build_augmentation(DataConfig(name="rotated_mnist", augment={"crop_padding": 2}), angles).crop_padding == 2
    ages = dataclasses.replace(angles, name="ages", target_unit="years")
    assert build_augmentation(flip, ages).horizontal_flip
    # there is no rotation augmentation to misuse: the key is refused with its neighbours named
    with pytest.raises(Exception, match="rotation"):
        DataConfig(name="rotated_mnist", augment={"rotation": 15})


def test_rotated_mnist_recipe_with_flips_fails_before_training(tmp_path, rotated_digits):
    from kdforge.cli import train_run
    from kdforge.engine.runs import build_any_config

    recipe = {
        "name": "flip_angles",
        "data": {"name": rotated_digits, "augment": {"horizontal_flip": True}},
        "student": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "train": {"epochs": 1, "progress": "none"},
    }
    with pytest.raises(ConfigError, match="angle targets"):
        train_run(build_any_config(recipe), tmp_path / "run")
