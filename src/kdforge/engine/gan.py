"""Training a conditional GAN as an ordinary kdforge run (recipe ``kind: gan``).

The run directory follows the classification runs' conventions::

    config.yaml            the resolved recipe
    metrics.jsonl          one line per epoch: discriminator / generator losses, mean D outputs,
                           images/s, and the quality proxy when a feature model is given
    summary.json           status (running / interrupted / failed / finished), last and best quality
    samples/epoch_NNN.png  a grid of the moving-average generator's samples (a row per class, or per
                           label value), same latent vectors every epoch; samples/last.png
    checkpoints/state.pt   everything --resume needs (atomic, after every epoch)
    checkpoints/generator.pt  the moving-average generator and how to rebuild it

Class labels: the hinge loss on (real image, its class) and (G(z, y), y) with ``y`` drawn from the
real batch's classes. Continuous labels (datasets whose task is regression): labels are scaled to
[0, 1] by the training range, and the discriminator sees CcGAN's vicinal batches
(:mod:`kdforge.generative.losses`).

Quality proxy ("FID-like", *not* FID): the Fréchet distance between the penultimate features of a
given classifier (``quality.feature_model``, any kdforge model file of this dataset) on real test
images and on as many generated ones with the same labels; lower is better. Numbers are comparable
only between runs that use the same feature model. The same network's agreement with the
conditioning label (top-1 % for classes, mean absolute error for a continuous label) is recorded too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, ValidationError
from torch import nn

from kdforge.config import ConfigError, DataConfig, ModelConfig, Strict
from kdforge.core.allocator import tune_allocator
from kdforge.core.checkpoint import atomic_save, atomic_write_text, load_file
from kdforge.core.errors import KDForgeError
from kdforge.core.plugins import import_all
from kdforge.core.runlock import RunLock
from kdforge.core.signals import StopFlag
from kdforge.core.storage import ensure_writable_dir, remove_stale_temps
from kdforge.core.validation import validation_message
from kdforge.data import DatasetInfo, DataSplits, TensorData, make_loader
from kdforge.engine.build import build_data, build_model
from kdforge.engine.record import device_description, run_record
from kdforge.generative import (
    EMA,
    ConditionalGenerator,
    ProjectionDiscriminator,
    frechet_distance,
    hinge_discriminator_loss,
    hinge_generator_loss,
    sample_vicinal_batch,
)
from kdforge.generative.images import to_uint8, write_grid
from kdforge.generative.losses import default_kappa, default_sigma, weighted_hinge_discriminator_loss
from kdforge.generative.processing import batched, penultimate_features

GAN_STATE_FORMAT = "kdforge-gan-state"
GENERATOR_FORMAT = "kdforge-generator"


class GanNetworkConfig(Strict):
    conditioning: Literal["auto", "class", "continuous"] = Field(
        "auto", description="class labels or a continuous label in [0, 1]; auto: continuous for regression data"
    )
    latent_dim: int = Field(64, ge=1, description="size of the latent vector z")
    width: int = Field(32, ge=4, description="generator channels at the output resolution (doubled per level up)")
    discriminator_width: int = Field(32, ge=4, description="discriminator channels of its first layer")
    embed_dim: int = Field(64, ge=1, description="label embedding size of the generator's conditional BatchNorm")


class VicinityConfig(Strict):
    """CcGAN's vicinal discriminator loss (continuous labels only; labels scaled to [0, 1])."""

    kind: Literal["hard", "soft"] = Field("hard", description="hard (HVDL) or soft (SVDL) vicinity")
    kappa: float | None = Field(
        None, gt=0.0, description="vicinity radius; default: kappa_multiplier x largest label gap"
    )
    kappa_multiplier: float = Field(2.0, gt=0.0, description="default kappa in units of the largest gap between labels")
    sigma: float | None = Field(
        None, ge=0.0, description="std of the noise added to target labels; default: Silverman's rule"
    )
    nu: float | None = Field(None, gt=0.0, description="soft vicinity decay; default 1 / kappa^2")
    label_range: tuple[float, float] | None = Field(
        None, description="label values mapped to 0 and 1; default: the training labels' min and max"
    )


class GanTrainConfig(Strict):
    epochs: int = Field(20, ge=1, description="passes over the training images")
    batch_size: int = Field(64, ge=2, description="real (and fake) images per discriminator step")
    lr_generator: float = Field(2e-4, gt=0.0, description="Adam learning rate of the generator")
    lr_discriminator: float = Field(2e-4, gt=0.0, description="Adam learning rate of the discriminator")
    betas: tuple[float, float] = Field((0.0, 0.9), description="Adam betas of both networks")
    discriminator_steps: int = Field(1, ge=1, description="discriminator steps per generator step")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="moving average of the generator's weights")
    accelerator: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a CUDA GPU when there is one")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")
    progress: Literal["auto", "bar", "none"] = Field("auto", description="none: silent")
    grid_columns: int = Field(10, ge=1, description="samples per row of the epoch grids")


class QualityConfig(Strict):
    feature_model: str | None = Field(
        None, description="kdforge model file of this dataset whose penultimate features score the samples"
    )
    samples: int = Field(1000, ge=10, description="real test images and generated images compared")
    every: int = Field(1, ge=1, description="score every N epochs (and after the last)")


class GanRunConfig(Strict):
    kind: Literal["gan"] = Field("gan", description="this recipe trains a conditional GAN")
    name: str = Field("gan", min_length=1, max_length=120, description="run label")
    imports: list[str] = Field(default_factory=list, description="modules or .py files imported first")
    seed: int = Field(0, ge=0, lt=2**32, description="fixes initialisation, data order and latent draws")
    data: DataConfig = Field(..., description="the real images (augmentation is not used)")
    gan: GanNetworkConfig = Field(
        default_factory=lambda: GanNetworkConfig.model_validate({}), description="the networks"
    )
    vicinity: VicinityConfig = Field(
        default_factory=lambda: VicinityConfig.model_validate({}), description="continuous labels (CcGAN)"
    )
    train: GanTrainConfig = Field(
        default_factory=lambda: GanTrainConfig.model_validate({}), description="the training loop"
    )
    quality: QualityConfig = Field(
        default_factory=lambda: QualityConfig.model_validate({}), description="the FID-like quality proxy"
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def build_gan_config(data: dict[str, Any]) -> GanRunConfig:
    import_all(data.get("imports"))
    try:
        return GanRunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, GanRunConfig)) from None


def dataset_task(info: DatasetInfo) -> str:
    """The dataset's task ("classification" unless the dataset says otherwise)."""
    return str(getattr(info, "task", "classification") or "classification")


def split_targets(split: TensorData) -> torch.Tensor:
    """A split's targets (class indices, or values for regression)."""
    targets = getattr(split, "targets", None)
    return split.labels if targets is None else targets


def normalized_inputs(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 images -> the float inputs a classifier of this dataset expects ((x/255 - mean) / std)."""
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - mean.to(images_uint8.device)) / std.to(images_uint8.device)


@dataclasses.dataclass
class GeneratorFile:
    """A trained generator: the network, its conditioning, and the dataset it imitates."""

    network: ConditionalGenerator
    continuous: bool
    num_classes: int
    label_range: tuple[float, float] | None
    dataset: dict[str, Any]
    data: dict[str, Any]

    def to_unit(self, values: torch.Tensor) -> torch.Tensor:
        low, high = self.label_range or (0.0, 1.0)
        return ((values.float() - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)

    def from_unit(self, values: torch.Tensor) -> torch.Tensor:
        low, high = self.label_range or (0.0, 1.0)
        return values.float() * (high - low) + low

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
        """uint8 images for ``labels`` (class indices, or label values in [0, 1])."""
        self.network.eval()
        parts = []
        for i in range(0, len(labels), batch_size):
            chunk = labels[i : i + batch_size]
            z = torch.randn(len(chunk), self.network.latent_dim, generator=generator)
            parts.append(to_uint8(self.network(z, chunk)))
        return torch.cat(parts)


def read_generator(path: str | Path) -> GeneratorFile:
    """Load ``checkpoints/generator.pt`` (or a GAN run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "generator.pt"
    if not path.is_file():
        raise ConfigError(f"generator '{path}' not found; give a GAN run directory (kind: gan) or its generator.pt")
    record = load_file(path)
    if record.get("format") != GENERATOR_FORMAT:
        raise ConfigError(f"'{path}' is not a kdforge generator file; give a GAN run's checkpoints/generator.pt")
    settings = record["generator"]
    network = ConditionalGenerator(
        None if settings["continuous"] else settings["num_classes"],
        image_size=settings["image_size"],
        channels=settings["channels"],
        latent_dim=settings["latent_dim"],
        width=settings["width"],
        embed_dim=settings["embed_dim"],
    )
    network.load_state_dict(record["state_dict"])
    label_range = record.get("label_range")
    return GeneratorFile(
        network,
        bool(settings["continuous"]),
        int(settings["num_classes"]),
        tuple(label_range) if label_range else None,  # type: ignore[arg-type]
        record.get("dataset") or {},
        record.get("data") or {},
    )


Callback = Callable[["GanTrainer", int, dict[str, Any]], None]


class GanTrainer:
    """Train the conditional GAN of a :class:`GanRunConfig` into ``out_dir``; ``fit()`` returns the summary."""

    def __init__(
        self, config: GanRunConfig, out_dir: str | Path, *, resume: bool = False, callbacks: Sequence[Callback] = ()
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.callbacks = list(callbacks)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start_epoch = 0
        self.train_seconds = 0.0

    @property
    def state_path(self) -> Path:
        return self.out_dir / "checkpoints" / "state.pt"

    # ------------------------------------------------------------------ setup
    def _check_run_directory(self) -> None:
        saved = self.out_dir / "config.yaml"
        if self.resume:
            if saved.is_file():
                previous = yaml.safe_load(saved.read_text())
                current = self.config.to_dict()
                for section in ("train", "quality"):  # how often / how visibly it runs may change
                    for key in ("progress", "num_threads", "every"):
                        for side in (previous, current):
                            (side.get(section) or {}).pop(key, None)
                if previous != current:
                    raise ConfigError(
                        f"run directory '{self.out_dir}' was started with a different recipe; resume with the "
                        "same recipe or choose another --out"
                    )
            return
        if self.state_path.exists() or (self.out_dir / "summary.json").exists():
            raise ConfigError(
                f"run directory '{self.out_dir}' already holds a run; pass --resume to continue it "
                "or choose another --out"
            )

    def setup(self) -> None:
        config = self.config
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        ensure_writable_dir(self.out_dir)
        self.lock = RunLock(self.out_dir).acquire()
        self._check_run_directory()
        remove_stale_temps(self.out_dir, self.out_dir / "checkpoints", self.out_dir / "samples")
        use_cuda = config.train.accelerator != "cpu" and torch.cuda.is_available()
        if config.train.accelerator == "cuda" and not use_cuda:
            raise ConfigError("train.accelerator is cuda but this process sees no CUDA GPU; use auto or cpu")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.allocator = tune_allocator("auto", self.device.type)  # CPU steps reuse freed memory (core/allocator.py)

        self.data: DataSplits = build_data(config.data)
        info = self.info = self.data.info
        if info.kind != "image" or len(info.sample_shape) != 3:
            raise ConfigError(f"the conditional GAN needs uint8 images; '{info.name}' holds {info.kind} data")
        channels, height, width = info.sample_shape
        if height != width or height not in (8, 16, 28, 32, 64):
            raise ConfigError(
                f"the conditional GAN makes square 8, 16, 28, 32 or 64-pixel images; '{info.name}' has {height}x{width}"
            )
        self.continuous = self._continuous()
        self.train_images = self.data.train.images
        targets = split_targets(self.data.train)  # type: ignore[arg-type]
        if self.continuous:
            values = targets.float().reshape(len(targets), -1)[:, 0]
            low, high = config.vicinity.label_range or (float(values.min()), float(values.max()))
            if not high > low:
                raise ConfigError(f"vicinity.label_range must have its low end below its high end, got {(low, high)}")
            self.label_range: tuple[float, float] | None = (float(low), float(high))
            self.train_labels = ((values - low) / (high - low)).clamp(0.0, 1.0)
            vicinity = config.vicinity
            self.kappa = vicinity.kappa or default_kappa(self.train_labels, vicinity.kappa_multiplier)
            self.sigma = vicinity.sigma if vicinity.sigma is not None else default_sigma(self.train_labels)
            self.nu = vicinity.nu or 1.0 / self.kappa**2
        else:
            self.label_range = None
            self.train_labels = self.data.train.labels
        num_classes = None if self.continuous else info.num_classes
        torch.manual_seed(config.seed)
        network = config.gan
        self.generator = ConditionalGenerator(
            num_classes, height, channels, network.latent_dim, network.width, network.embed_dim
        ).to(self.device)
        self.discriminator = ProjectionDiscriminator(num_classes, height, channels, network.discriminator_width).to(
            self.device
        )
        self.ema = EMA(self.generator, config.train.ema_decay)
        betas = config.train.betas
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.train.lr_generator, betas=betas)
        self.optimizer_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=config.train.lr_discriminator, betas=betas
        )
        self.noise = torch.Generator().manual_seed(config.seed + 1)  # latent vectors and label draws
        self.loader = make_loader(
            self.data.train, config.train.batch_size, shuffle=True, drop_last=True, seed=config.seed, train=False
        )
        self.steps_per_epoch = len(self.train_images) // config.train.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={config.train.batch_size} is larger than the "
                f"{len(self.train_images)} training images"
            )
        self.grid_labels, self.grid_noise = self._grid_inputs()
        self.feature_model = self._feature_model()
        if self.resume and self.state_path.exists():
            self._load_state()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), self.out_dir / "config.yaml")
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history), self.out_dir / "metrics.jsonl")

    def _continuous(self) -> bool:
        setting = self.config.gan.conditioning
        if setting == "auto":
            return dataset_task(self.info) == "regression"
        return setting == "continuous"

    def _grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed labels and latents of the epoch grids: a row per class (at most 10 classes), or 10
        label values evenly spaced in [0, 1]; ``grid_columns`` samples per row."""
        columns = self.config.train.grid_columns
        if self.continuous:
            rows = torch.linspace(0.0, 1.0, 10)
        else:
            rows = torch.arange(min(self.info.num_classes, 10))
        labels = rows.repeat_interleave(columns)
        noise = torch.randn(len(labels), self.config.gan.latent_dim, generator=torch.Generator().manual_seed(1234))
        return labels, noise

    def _feature_model(self) -> nn.Module | None:
        file = self.config.quality.feature_model
        if file is None:
            return None
        model, _ = build_model(ModelConfig.model_validate({"checkpoint": file}), self.info, "quality.feature_model")
        model.eval()
        count = min(self.config.quality.samples, len(self.data.test))
        picks = torch.randperm(len(self.data.test), generator=torch.Generator().manual_seed(0))[:count]
        real = self.data.test.images[picks]
        self.quality_labels = split_targets(self.data.test)[picks]  # type: ignore[arg-type]
        self.real_features = penultimate_features(model, normalized_inputs(real, self.info))
        return model

    # ------------------------------------------------------------------ state
    def _save_state(self, next_epoch: int) -> None:
        state = {
            "format": GAN_STATE_FORMAT,
            "version": 1,
            "epoch": next_epoch,
            "train_seconds": self.train_seconds,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "noise": self.noise.get_state(),
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
        }
        atomic_save(state, self.state_path)

    def _load_state(self) -> None:
        state = load_file(self.state_path)
        if state.get("format") != GAN_STATE_FORMAT:
            raise ConfigError(f"'{self.state_path}' is not a kdforge GAN training state; choose another --out")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.noise.set_state(state["noise"])
        torch.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"])

    def _save_generator(self, epoch: int) -> None:
        settings = self.config.gan
        channels, size, _ = self.info.sample_shape
        record = {
            "format": GENERATOR_FORMAT,
            "version": 1,
            "epoch": epoch,
            "generator": {
                "continuous": self.continuous,
                "num_classes": self.info.num_classes,
                "image_size": size,
                "channels": channels,
                "latent_dim": settings.latent_dim,
                "width": settings.width,
                "embed_dim": settings.embed_dim,
            },
            "label_range": list(self.label_range) if self.label_range else None,
            "dataset": json.loads(json.dumps(dataclasses.asdict(self.info))),
            "data": self.config.data.model_dump(mode="json"),
            "state_dict": {k: v.detach().cpu() for k, v in self.ema.model.state_dict().items()},
        }
        atomic_save(record, self.out_dir / "checkpoints" / "generator.pt")

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.release()

    def _fit(self) -> dict[str, Any]:
        from kdforge.engine.trainer import RunInterrupted

        self.session_started = time.perf_counter()
        self.setup()
        epochs = self.config.train.epochs
        if self.config.train.progress != "none":
            print(
                f"[{self.config.name}] conditional GAN ({'continuous' if self.continuous else 'class'} labels) on "
                f"{self.data.summary()}; training on {device_description(self.device)}",
                file=sys.stderr,
            )
        try:
            with StopFlag() as stop:
                for epoch in range(self.start_epoch, epochs):
                    record = self._run_epoch(epoch, stop)
                    self.history.append(record)
                    with stop.deferred():  # a signal waits until the epoch's files are written
                        self._end_of_epoch(epoch, record)
                    for callback in self.callbacks:
                        callback(self, epoch, record)
                    stop.check()
                with stop.deferred(check=False):
                    return self._write_summary("finished")
        except KeyboardInterrupt:
            with StopFlag().deferred(check=False):
                self._write_summary("interrupted")
            raise RunInterrupted(
                f"interrupted; the run directory '{self.out_dir}' is intact: resume with --resume"
            ) from None
        except KDForgeError as exc:
            self._write_summary("failed", error=str(exc))
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._write_summary("failed", error=f"crashed with {type(exc).__name__}: {first}"[:500])
            raise

    def _real_batches(self, epoch: int):
        """Per step: (real images in [-1, 1], the conditioning labels of both D terms, the labels the
        fakes are generated at, fake weights). Classes: the fakes are generated at the real batch's
        classes. Continuous labels: at labels within kappa of the targets (CcGAN)."""
        size = self.config.train.batch_size
        if not self.continuous:
            self.loader.set_epoch(epoch)
            for batch in self.loader:
                images = batch.image.to(self.device) * 2.0 - 1.0
                labels = batch.targets.to(self.device)
                # the fakes are made for, and scored with, the real batch's classes
                yield images, labels, labels, None
            return
        vicinity = self.config.vicinity
        for _ in range(self.steps_per_epoch):
            draw = sample_vicinal_batch(
                self.train_labels,
                size,
                sigma=self.sigma,
                kappa=self.kappa,
                kind=vicinity.kind,
                nu=self.nu,
                generator=self.noise,
            )
            images = self.train_images[draw.real_index].to(self.device).float() / 127.5 - 1.0
            weights = draw.fake_weights.to(self.device) if vicinity.kind == "soft" else None
            yield images, draw.targets.to(self.device), draw.fake_labels.to(self.device), weights

    def _generator_labels(self, real_labels: torch.Tensor) -> torch.Tensor:
        if not self.continuous:
            return real_labels[torch.randperm(len(real_labels), generator=self.noise)]
        picks = torch.randint(len(self.train_labels), (len(real_labels),), generator=self.noise)
        noise = torch.randn(len(real_labels), generator=self.noise) * self.sigma
        return (self.train_labels[picks] + noise).clamp(0.0, 1.0).to(self.device)

    def _latent(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.gan.latent_dim, generator=self.noise).to(self.device)

    def _run_epoch(self, epoch: int, stop: StopFlag) -> dict[str, Any]:
        config = self.config.train
        self.generator.train()
        self.discriminator.train()
        sums = dict.fromkeys(("loss_d", "loss_g", "d_real", "d_fake"), 0.0)
        steps = 0
        started = time.perf_counter()
        bar = self._progress_bar(epoch)
        for step, (real, labels, fake_labels, fake_weights) in enumerate(self._real_batches(epoch)):
            with torch.no_grad():
                fake = self.generator(self._latent(len(real)), fake_labels)
            real_logits = self.discriminator(real, labels)
            fake_logits = self.discriminator(fake, labels)
            if fake_weights is None:
                loss_d = hinge_discriminator_loss(real_logits, fake_logits)
            else:
                loss_d = weighted_hinge_discriminator_loss(real_logits, fake_logits, fake_weights)
            self.optimizer_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.optimizer_d.step()
            sums["loss_d"] += float(loss_d.detach())
            sums["d_real"] += float(real_logits.detach().mean())
            sums["d_fake"] += float(fake_logits.detach().mean())
            if (step + 1) % config.discriminator_steps == 0:
                wanted = self._generator_labels(labels)
                loss_g = hinge_generator_loss(
                    self.discriminator(self.generator(self._latent(len(real)), wanted), wanted)
                )
                self.optimizer_g.zero_grad(set_to_none=True)
                loss_g.backward()
                self.optimizer_g.step()
                self.ema.update(self.generator)
                sums["loss_g"] += float(loss_g.detach())
            if not math.isfinite(sums["loss_d"]):
                raise ConfigError(
                    f"GAN training diverged at epoch {epoch + 1}, step {step + 1} "
                    f"(discriminator loss {sums['loss_d']}); "
                    "lower train.lr_discriminator / lr_generator"
                )
            steps += 1
            if bar is not None:
                bar.update(1)
            stop.check()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        generator_steps = max(steps // config.discriminator_steps, 1)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train": {
                "loss_d": sums["loss_d"] / max(steps, 1),
                "loss_g": sums["loss_g"] / generator_steps,
                "d_real": sums["d_real"] / max(steps, 1),
                "d_fake": sums["d_fake"] / max(steps, 1),
                "images_per_second": steps * config.batch_size / max(seconds, 1e-9),
                "seconds": seconds,
            },
        }
        last = epoch == self.config.train.epochs - 1
        if self.feature_model is not None and ((epoch + 1) % self.config.quality.every == 0 or last):
            record["quality"] = self.quality()
        return record

    def _progress_bar(self, epoch: int):
        mode = self.config.train.progress
        if mode == "none" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, desc=f"GAN epoch {epoch + 1}/{self.config.train.epochs}", leave=False)

    def ema_file(self) -> GeneratorFile:
        """The moving-average generator as a :class:`GeneratorFile` (CPU copy)."""
        network = ConditionalGenerator(
            None if self.continuous else self.info.num_classes,
            self.info.sample_shape[1],
            self.info.sample_shape[0],
            self.config.gan.latent_dim,
            self.config.gan.width,
            self.config.gan.embed_dim,
        )
        network.load_state_dict({k: v.cpu() for k, v in self.ema.model.state_dict().items()})
        return GeneratorFile(network, self.continuous, self.info.num_classes, self.label_range, {}, {})

    @torch.no_grad()
    def quality(self) -> dict[str, float]:
        """FID-like distance and label agreement of the feature model on generated images."""
        assert self.feature_model is not None
        generator = self.ema_file()
        labels = self.quality_labels
        conditioning = generator.to_unit(labels) if self.continuous else labels
        images = generator.generate(conditioning, torch.Generator().manual_seed(4321))
        inputs = normalized_inputs(images, self.info)
        features = penultimate_features(self.feature_model, inputs)
        outputs = batched(self.feature_model, inputs)
        result = {"fid_like": frechet_distance(self.real_features, features)}
        if self.continuous:
            error = (outputs.float().reshape(len(outputs), -1)[:, 0] - labels.float()).abs().mean()
            result["label_mae"] = float(error) * float(self.info.target_scale or 1.0)  # in the target's units
        else:
            result["label_top1"] = 100.0 * float((outputs.argmax(1) == labels).float().mean())
        return result

    def _end_of_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        with torch.no_grad():  # the same latent vectors every epoch
            network = self.ema_file().network.eval()
            images = to_uint8(network(self.grid_noise, self.grid_labels))
        samples = self.out_dir / "samples"
        write_grid(images, samples / f"epoch_{epoch + 1:03d}.png", self.config.train.grid_columns)
        write_grid(images, samples / "last.png", self.config.train.grid_columns)
        quality = record.get("quality")
        if quality is not None and (not self.best or quality["fid_like"] < self.best["fid_like"]):
            self.best = {"epoch": epoch, **quality}
        self._save_generator(epoch)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._save_state(epoch + 1)
        self._write_summary("running")
        every = max(1, math.ceil(self.config.train.epochs / 10))
        if self.config.train.progress != "none" and ((epoch + 1) % every == 0 or epoch == 0):
            train = record["train"]
            shown = f" fid-like {quality['fid_like']:.2f}" if quality else ""
            print(
                f"[{self.config.name}] epoch {epoch + 1}/{self.config.train.epochs} loss D {train['loss_d']:.3f} "
                f"G {train['loss_g']:.3f}{shown} ({train['images_per_second']:.0f} img/s)",
                file=sys.stderr,
            )

    def _write_summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary = {
            "name": self.config.name,
            "kind": "gan",
            "status": status,
            **({"error": error} if error else {}),
            "method": "cgan" if not getattr(self, "continuous", False) else "ccgan",
            "dataset": self.info.name if hasattr(self, "info") else self.config.data.name,
            "seed": self.config.seed,
            "allocator": getattr(self, "allocator", None),
            "epochs_done": len(self.history),
            "epochs": self.config.train.epochs,
            "final": {"epoch": last.get("epoch"), "train": last.get("train"), "quality": last.get("quality")},
            "best": self.best,
            "quality_proxy": "Fréchet distance of the feature model's penultimate features (FID-like, not FID)"
            if self.config.quality.feature_model
            else None,
            **(
                {"vicinity": {"kind": self.config.vicinity.kind, "kappa": self.kappa, "sigma": self.sigma}}
                if getattr(self, "continuous", False)
                else {}
            ),
            "label_range": list(getattr(self, "label_range", None) or ()) or None,
            "generator_parameters": sum(p.numel() for p in self.generator.parameters())
            if hasattr(self, "generator")
            else 0,
            "discriminator_parameters": sum(p.numel() for p in self.discriminator.parameters())
            if hasattr(self, "discriminator")
            else 0,
            "train_seconds": self.train_seconds,
            "wall_seconds": time.perf_counter() - self.session_started,
            "record": run_record(getattr(self, "device", torch.device("cpu")), self.config.seed),
        }
        if self.out_dir.is_dir():
            atomic_write_text(json.dumps(summary, indent=2) + "\n", self.out_dir / "summary.json")
        return summary
