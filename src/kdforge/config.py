"""Typed run configuration: YAML recipes validated by pydantic, ``--set key.path=value`` overrides.

Every mistake becomes one :class:`~kdforge.core.errors.ConfigError` line that names the key path,
what is wrong and what is allowed (with the closest key when a name is misspelt).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from kdforge.core.errors import ConfigError, closest
from kdforge.core.plugins import import_all
from kdforge.core.validation import StrictScalars, validation_message


class Strict(StrictScalars):
    # no NaN/inf in any float; no boolean for a number (`epochs: true`), only true/false for a boolean
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(Strict):
    crop_padding: int = Field(0, ge=0, description="random crop of the image zero-padded by this many pixels (0: none)")
    horizontal_flip: bool = Field(default=False, description="flip each training image left-right with probability 1/2")


class SamplerConfig(Strict):
    """Training batches of P identities x K samples each (kdforge.data.sampler; docs/retrieval.md)."""

    name: Literal["pk"] = Field("pk", description="pk: P identities x K samples per batch")
    p: int | None = Field(None, ge=2, description="identities per batch (default train.batch_size / k)")
    k: int = Field(4, ge=1, description="samples per identity")


class DataConfig(Strict):
    name: str = Field(
        ...,
        description="a dataset of `kdforge list datasets`, or a Dataset factory 'module:function' / 'file.py:function'",
    )
    root: str | None = Field(None, description="folder holding the dataset's official files")
    download: bool = Field(default=False, description="fetch the official files into root when missing (MD5-checked)")
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of train held out as a validation split (the best epoch is chosen on it)",
    )
    train_subset: int | None = Field(None, gt=0, description="class-balanced subset of train")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the validation split and the subset")
    augment: bool | AugmentConfig = Field(
        True, description="training augmentation: true: the dataset's default; false: none; or a mapping"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")
    generated: str | None = Field(
        default=None,
        description="a generation run directory (kind: generate; or its generated.pt) whose samples are added "
        "to the training split (cGAN-KD; docs/cgan-kd.md)",
    )
    num_workers: NonNegativeInt = Field(
        default=0,
        description="DataLoader worker processes reading a streamed (custom) Dataset; 0 reads in the main process",
    )
    on_device: bool | Literal["auto"] = Field(
        default="auto",
        description="keep in-memory splits on the accelerator, so batches are gathered there without host copies: "
        "auto = on a CUDA GPU when a split takes at most a quarter of its memory; true/false force it",
    )
    sampler: SamplerConfig | None = Field(default=None, description="training batch sampler, e.g. {name: pk, k: 4}")


class LMAConfig(Strict):
    """Swap every ReLU for an LMA activation (kdforge.compress.lma; docs/compression.md)."""

    k: int = Field(8, ge=2, description="segments")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="running-average momentum of the segment statistics")


class PruneConfig(Strict):
    """Prune the network when the run starts (kdforge.compress.prune; docs/compression.md)."""

    amount: float = Field(..., ge=0.0, lt=1.0, description="fraction of filters (or weights) removed")
    structured: bool = Field(True, description="true: remove whole filters physically; false: zero weights")
    norm: Literal[1, 2] = Field(1, description="filter ranking norm (structured)")
    residual: bool = Field(True, description="structured: also prune channels shared through residual additions")
    scope: Literal["layer", "global"] = Field("layer", description="unstructured: per-layer or global ranking")
    skip: list[str] = Field(default_factory=list, description="module-name prefixes left unpruned")


class QATConfig(Strict):
    """Fake-quantize convs/linears for quantization-aware training (kdforge.compress.quantize)."""

    weight_bits: int = Field(8, ge=2, le=8, description="weights: symmetric, per output channel")
    activation_bits: int = Field(8, ge=2, le=8, description="layer inputs: affine, per tensor")


class ModelConfig(Strict):
    name: str | None = Field(
        None,
        description="zoo name, package.module:callable, path/to/file.py:callable or hf:<hub id or folder> "
        "(docs/your-own-model.md); may be omitted when a checkpoint names it",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments, e.g. {hidden: [64]}")
    checkpoint: str | None = Field(
        None,
        description="kdforge model file to load (relative: to the working directory, else the recipe's folder; "
        "{stage}: an earlier pipeline stage's run directory)",
    )
    input: str | None = Field(
        None,
        description="paired multimodal data: the named input this network reads (e.g. audio, sensor); "
        "default: the dataset's first input for the student, the student's input for a teacher",
    )
    lma: LMAConfig | None = Field(None, description="LMA activations instead of ReLU")
    prune: PruneConfig | None = Field(None, description="prune when the run starts")
    qat: QATConfig | None = Field(None, description="quantization-aware training")

    @model_validator(mode="after")
    def _named(self) -> ModelConfig:
        if self.name is None and self.checkpoint is None:
            raise ValueError("give the model's 'name' (see `kdforge list models`) or a 'checkpoint'")
        return self


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw", "adam"] = Field("sgd", description="optimizer")
    lr: float = Field(0.05, gt=0.0, description="peak learning rate (the scheduler scales it)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd momentum")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="on weights only (not biases or norm layers)")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="adam, adamw: moment decay rates"
    )


class SchedulerConfig(Strict):
    name: Literal["constant", "multistep", "cosine", "onecycle"] = Field(
        "multistep", description="learning-rate schedule, stepped every batch"
    )
    milestones: list[Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=list, description="epochs where lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0.0, description="multistep: the factor at each milestone")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up from 0 (multistep, cosine, constant)")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the final learning rate")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: fraction spent rising")


LoggerName = Literal["csv", "tensorboard", "wandb", "mlflow"]


class TrainConfig(Strict):
    epochs: int = Field(240, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="training images per step and process (DDP: per device)")
    eval_batch_size: int = Field(512, ge=1, description="images per evaluation forward")
    drop_last: bool = Field(
        True,
        description="drop each epoch's partial last training batch (evaluation keeps every sample); "
        "losses over pairs in a batch (sp, pkt) scale as 1/B and a small last batch would be over-weighted",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="the optimizer")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="the learning-rate schedule")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value")
    accelerator: Literal["cpu", "cuda", "mps", "auto"] = Field(
        "auto", description="auto: the GPU when there is one, else the CPU (the run's first line says which)"
    )
    devices: int = Field(1, ge=1, description="processes on this node (GPUs, or CPU processes); > 1: DDP")
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"] = Field(
        "auto", description="Fabric strategy; auto: ddp when devices > 1 (docs/gpus-and-clusters.md)"
    )
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"] = Field(
        "auto",
        description="bf16-mixed: bfloat16 autocast (GPU or CPU); 16-mixed: float16 with loss scaling (GPU only); "
        "auto: bf16-mixed on a CUDA GPU with bfloat16, else 32-true",
    )
    channels_last: bool | Literal["auto", "probe"] = Field(
        "auto",
        description="memory layout: auto = channels_last for networks with 2-D convolutions (not on MPS); "
        "probe = time both layouts on the run's device before training and keep channels_last where it is "
        "5% faster; true/false force it. The choice is recorded in summary.json (memory_format)",
    )
    fold_teacher_bn: bool = Field(
        True,
        description="fold each frozen teacher's BatchNorms into the convolutions before them "
        "(same outputs up to float rounding, faster teacher forwards; kdforge.compress.fold)",
    )
    teacher_precision: Literal["32-true", "bf16"] = Field(
        "32-true",
        description="frozen teachers' forward: 32-true, or bf16 (bfloat16 autocast, float32 outputs): about 2x "
        "faster on hardware with native bfloat16 (AVX512-BF16/AMX CPUs, recent GPUs), logits within ~0.5% of "
        "their range. Recorded in summary.json (teacher_precision)",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the student: auto = when a few timed eager steps say the run is long enough "
        "to repay the compilation (not on MPS; on a CPU only with a C++ compiler); true/false force it. "
        "The choice is recorded in summary.json (compile)",
    )
    allocator: Literal["auto", "system"] = Field(
        "auto",
        description="auto: on a CPU run with glibc, keep freed memory for reuse instead of returning it to the "
        "kernel every step (no page faults per step; 10-30% faster CPU steps, +10-15% resident memory); "
        "system: leave the C allocator as it is. Recorded in summary.json (allocator)",
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    progress: Literal["auto", "bar", "none"] = Field(
        "auto", description="auto: a progress bar on a terminal, about ten epoch lines otherwise; none: silent"
    )
    loggers: list[LoggerName] = Field(
        default_factory=list,
        description="experiment trackers fed each epoch's metrics (those of metrics.jsonl) and the recipe: "
        "csv, tensorboard, wandb, mlflow; they write under the run directory by default (docs/engine.md)",
    )
    logger_options: dict[LoggerName, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword arguments of each logger's Lightning class, e.g. {wandb: {project: kd}, "
        "mlflow: {tracking_uri: 'http://host:5000'}}; options of a logger not in train.loggers are ignored",
    )
    tensorboard: bool = Field(False, description="deprecated: the same as listing tensorboard in train.loggers")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and after the last)")

    @field_validator("loggers")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"list each logger once ({', '.join(repeated)} is repeated)")
        return value

    def logger_names(self) -> list[str]:
        """``loggers``, plus tensorboard when the deprecated ``tensorboard: true`` is set."""
        names: list[str] = list(self.loggers)
        if self.tensorboard and "tensorboard" not in names:
            names.append("tensorboard")
        return names


class TeacherBankConfig(Strict):
    """Replay stored teacher outputs instead of running the teachers (see kdforge.engine.bank)."""

    enabled: bool = Field(False, description="replay stored teacher logits (methods using teacher features ignore it)")
    directory: str | None = Field(None, description="default: $KDFORGE_BANK or ~/.cache/kdforge/teacher-bank")
    top_k: int | None = Field(None, ge=1, description="keep only the k largest logits per sample")


class MethodConfig(BaseModel):
    """``name`` plus the method's own hyperparameters, validated by the method's Params model."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("ce", description="the method (`kdforge list methods`)")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_UNSAFE_NAME = re.compile(r"[\x00-\x1f/\\]|^\.{1,2}$")


class RunConfig(Strict):
    name: str = Field("run", min_length=1, max_length=120, description="run label; also the default run folder")
    imports: list[str] = Field(
        default_factory=list,
        description="modules or .py files imported before the recipe is validated: the user's own "
        "models, methods and datasets (kdforge.core.plugins)",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="fixes initialisation, data order, augmentation and dropout (below 2^32)"
    )
    data: DataConfig = Field(..., description="the dataset (required)")
    student: ModelConfig = Field(..., description="the network trained and deployed")
    teachers: list[ModelConfig] = Field(default_factory=list, description="frozen teachers, usually model files")
    method: MethodConfig = Field(
        default_factory=lambda: MethodConfig(name="ce"), description="the method and its hyperparameters"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    teacher_bank: TeacherBankConfig = Field(default_factory=TeacherBankConfig, description="stored teacher outputs")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        """The name becomes a folder under runs/: no path separators, control characters, '.' or '..'."""
        if _UNSAFE_NAME.search(value) or not value.strip():
            raise ValueError(
                "a run name must be a plain label (no '/', '\\', control characters, '.' or '..'); "
                "use --out to choose the run folder"
            )
        return value

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=False)
        data["method"] = {"name": self.method.name, **_plain(self.method.params())}
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``train.optimizer.lr=0.1`` -> (["train", "optimizer", "lr"], 0.1); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key; write key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, value


def apply_override(data: dict, path: list[str | int], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if isinstance(part, int) and part == len(node):  # teachers.0.name on an empty list
                node.append([] if isinstance(nxt, int) else {})
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"override path '{_join(path)}': index {part} is out of range")
            node = node[part]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if isinstance(last, int) and last == len(node):
            node.append(value)
        elif isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            raise ConfigError(f"override path '{_join(path)}': index {last} is out of range")
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override path '{_join(path)}': '{_join(path[:-1])}' is not a mapping")


def _join(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path)


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, following ``base: other.yaml`` (relative to the file) and deep-merging."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found; give the path of a YAML file (see configs/)")
    if path.resolve() in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise ConfigError(f"recipe '{path}': 'base:' goes round in a cycle ({cycle}); a recipe cannot extend itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe '{path}' is not a text file (not UTF-8); give the path of a YAML recipe") from None
    except OSError as exc:
        raise ConfigError(f"recipe '{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        detail = (getattr(exc, "problem", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise ConfigError(f"recipe '{path}' is not valid YAML{where}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of keys (data:, student:, method:, ...)")
    _rebase_checkpoints(data, path.parent)
    rebase_imports(data, path.parent)
    rebase_data_spec(data, path.parent)
    if isinstance(data.get("base"), str):  # a recipe may extend another file
        base = data.pop("base")
        return deep_merge(read_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def rebase_imports(recipe: dict[str, Any], folder: Path) -> None:
    """``.py`` files in ``imports:`` are tried against the working directory, then against the
    recipe's folder: a file that only exists relative to the recipe is made absolute."""
    entries = recipe.get("imports")
    if isinstance(entries, str):
        entries = recipe["imports"] = [entries]
    if not isinstance(entries, list):
        return
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and (entry.endswith(".py") or "/" in entry):
            file = Path(entry).expanduser()
            if not file.is_absolute() and not file.exists() and (folder / file).exists():
                entries[i] = str((folder / file).resolve())


def rebase_data_spec(recipe: dict[str, Any], folder: Path) -> None:
    """A ``data.name`` of the form ``file.py:function`` is tried against the working directory, then
    against the recipe's folder (like ``imports:``); pipeline stages too."""
    sections = [recipe, *((recipe.get("pipeline") or {}).values() if isinstance(recipe.get("pipeline"), dict) else ())]
    for section in sections:
        data = section.get("data") if isinstance(section, dict) else None
        if not isinstance(data, dict):
            continue
        name = data.get("name")
        if isinstance(name, str) and ":" in name:
            target, _, function = name.rpartition(":")
            file = Path(target).expanduser()
            if target.endswith(".py") and not file.is_absolute() and not file.exists() and (folder / file).exists():
                data["name"] = f"{(folder / file).resolve()}:{function}"


def _rebase_checkpoints(recipe: dict[str, Any], folder: Path) -> None:
    """Model-file paths (and the files / folders of model specs) in a recipe are tried against the
    working directory, then against the recipe's own folder: a path that only exists relative to
    the recipe is made absolute."""

    def fix(section: Any) -> None:
        if not isinstance(section, dict):
            return
        if isinstance(section.get("name"), str) and ":" in section["name"]:  # a file or hf: folder spec
            from kdforge.models.specs import rebase_spec

            section["name"] = rebase_spec(section["name"], folder)
        file = section.get("checkpoint")
        if isinstance(file, str) and "{" not in file and not Path(file).is_absolute():
            if not Path(file).exists() and (folder / file).exists():
                section["checkpoint"] = str((folder / file).resolve())

    def visit(entry: Any) -> None:
        if not isinstance(entry, dict):
            return
        fix(entry.get("student"))
        for teacher in entry.get("teachers") or []:
            fix(teacher)
        for stage in (entry.get("pipeline") or {}).values() if isinstance(entry.get("pipeline"), dict) else ():
            visit(stage)

    visit(recipe)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_config(data: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Validate a recipe mapping (after overrides) into a RunConfig, or raise ConfigError."""
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    imports = data.get("imports")
    if imports is not None and not (isinstance(imports, list) and all(isinstance(i, str) for i in imports)):
        raise ConfigError(f"bad value for 'imports': a list of module names or .py paths, got {imports!r}")
    import_all(imports)  # the user's models and methods register before the recipe is checked
    section = data.get("data")
    if section is None or (isinstance(section, dict) and not section.get("name")):
        raise ConfigError(
            "the recipe names no dataset: set data.name (see `kdforge list datasets`, or a Dataset factory "
            "'module:function' / 'file.py:function')"
        )
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, RunConfig)) from None
    validate_method(config)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return build_config(read_yaml(path), overrides)


def validate_method(config: RunConfig) -> None:
    """Check the method's name and hyperparameters against its Params model."""
    from kdforge.methods import METHODS  # the config layer only needs the registry here

    method_cls = METHODS.get(config.method.name) if config.method.name in METHODS else None
    if method_cls is None:
        names = METHODS.names()
        raise ConfigError(
            f"bad value for 'method.name': unknown method '{config.method.name}'"
            f"{closest(config.method.name, names)}; available: {', '.join(names)}"
        )
    try:
        method_cls.Params(**config.method.params())
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, method_cls.Params, prefix="method.")) from None
