"""Model specs: a network named by a zoo name, by the user's own code, or by a Hugging Face model.

Everywhere kdforge takes a model (a recipe's ``student:`` / ``teachers:``, ``kdforge profile``,
the NoNN commands, ``kdforge.models.create``) the name may be

* a **zoo name** (``resnet8``; ``kdforge list models``), including models that the user's
  ``imports:`` registered with ``@MODELS.register``;
* an **import spec** ``package.module:callable`` or ``path/to/file.py:callable`` (a file is
  tried against the working directory, then against the recipe's folder). The callable (a class
  or a function) is called with the model's ``kwargs`` plus ``num_classes``, ``in_channels`` and
  ``input_size`` (``(H, W)``) *only when its signature names them*; it must return an
  ``nn.Module`` whose ``forward(x)`` returns logits;
* a **Hugging Face** image classifier ``hf:<hub id or local folder>`` (``transformers``'
  ``AutoModelForImageClassification``), wrapped by :class:`HFImageClassifier` so that ``forward``
  returns the logits tensor and ``feature_points`` names its hidden states for feature methods.
  Its kwargs: ``pretrained`` (default true: load the weights; false: random weights from the
  config only, e.g. ``hf:vit`` with ``config: {image_size: 32, ...}`` builds a fresh ViT),
  ``config`` (config fields to override), ``allow_download`` (default false: local files and
  the local cache only).

Every built network carries ``model.kdforge_source``, the record of how to rebuild it, which a
model file stores (``model.source``): the kind (``zoo``, ``import``, ``hf``), the spec, the
kwargs, for a file spec its absolute path, for a Hugging Face model its whole config as a dict (so
rebuilding needs neither the folder nor the hub). Rebuilding a model file never imports user code
by itself: the code must have been imported (``--import``) or allowed (``--allow-model-code``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdforge.core import plugins
from kdforge.core.errors import ConfigError

HF_PREFIX = "hf:"
HF_OPTIONS = ("pretrained", "config", "allow_download")
COMMON = ("num_classes", "in_channels", "input_size")
HF_INSTALL = 'pip install "kdforge[hf]"'


def attach(model: nn.Module, **values: Any) -> None:
    """Set plain attributes on a network (``kdforge_source``, ``kdforge_input_shape``)."""
    for key, value in values.items():
        setattr(model, key, value)


# ----------------------------------------------------------------------------- parsing
def spec_kind(name: str) -> str:
    """``zoo``, ``import`` or ``hf`` for a model name."""
    if name.startswith(HF_PREFIX):
        return "hf"
    if ":" in name:
        return "import"
    return "zoo"


def split_import_spec(spec: str) -> tuple[str, str]:
    """``pkg.mod:Callable`` / ``dir/file.py:Callable`` -> (module or file, callable)."""
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute or not attribute.replace(".", "_").isidentifier():
        raise ConfigError(
            f"model '{spec}' is not a valid import spec; write package.module:callable or path/to/file.py:callable"
        )
    return target, attribute


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def rebase_spec(name: Any, folder: Path) -> Any:
    """A file spec or ``hf:`` folder that exists only relative to ``folder`` (a recipe's) becomes absolute."""
    if not isinstance(name, str) or "{" in name:
        return name
    kind = spec_kind(name)
    if kind == "import":
        target, attribute = name.rpartition(":")[0], name.rpartition(":")[2]
        if is_file_target(target):
            file = Path(target).expanduser()
            if not file.is_absolute() and not file.exists() and (folder / file).is_file():
                return f"{(folder / file).resolve()}:{attribute}"
    elif kind == "hf":
        local = Path(name[len(HF_PREFIX) :]).expanduser()
        if not local.is_absolute() and not local.exists() and (folder / local).is_dir():
            return f"{HF_PREFIX}{(folder / local).resolve()}"
    return name


# ----------------------------------------------------------------------------- building
def build(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int] | None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build an import spec or an ``hf:`` model (zoo names go through ``factory.create``)."""
    kwargs = dict(kwargs or {})
    if spec_kind(name) == "hf":
        return build_hf(name, num_classes, in_channels, input_size, kwargs)
    target, attribute = split_import_spec(name)
    module = _import(name, target)
    source: dict[str, Any] = {"kind": "import", "spec": name, "kwargs": kwargs, "callable": attribute}
    if is_file_target(target):
        source["path"] = str(Path(module.__file__ or target).resolve())
    else:
        source["module"] = target
    return _call(module, attribute, name, num_classes, in_channels, input_size, kwargs, source)


def _import(name: str, target: str) -> Any:
    try:
        return plugins.import_user_module(target)
    except ConfigError as exc:
        file = Path(target.replace(".", "/") + ".py")
        if not is_file_target(target) and file.is_file():  # a module beside the user, not on sys.path
            raise ConfigError(
                f"model '{name}': module '{target}' is not importable (its folder is not on PYTHONPATH); "
                f"name the file instead: '{file}:{name.rpartition(':')[2]}'"
            ) from None
        raise ConfigError(f"model '{name}': {str(exc).removeprefix('imports: ')}") from None


def _call(
    module: Any,
    attribute: str,
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int] | None,
    kwargs: dict[str, Any],
    source: dict[str, Any],
) -> nn.Module:
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            from kdforge.core.errors import closest

            raise ConfigError(
                f"model '{name}': {getattr(module, '__name__', module)} has no '{attribute}'"
                f"{closest(attribute, public)}; it defines: {', '.join(public[:12])}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"model '{name}': '{attribute}' is a {type(factory).__name__}, not a class or function")
    arguments = dict(kwargs)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    offered = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    for key, value in offered.items():
        if key in parameters and key not in arguments:
            arguments[key] = value
    try:
        model = factory(**arguments)
    except TypeError as exc:
        raise ConfigError(
            f"model '{name}': calling {attribute}(**kwargs) failed: {exc}; fix the model's kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model '{name}': {attribute}(...) returned a {type(model).__name__}, not a torch.nn.Module; "
            "point the spec at a model class or a function returning one"
        )
    attach(model, kdforge_source=source)
    return model


# ----------------------------------------------------------------------------- Hugging Face
def _transformers() -> Any:
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"Hugging Face models (hf:...) need the transformers package: {HF_INSTALL}")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars between kdforge's lines
    return transformers


def build_hf(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """``hf:<hub id or folder>`` -> an :class:`HFImageClassifier` with ``num_classes`` outputs."""
    unknown = [k for k in kwargs if k not in HF_OPTIONS]
    if unknown:
        raise ConfigError(
            f"model '{name}' got unknown argument '{unknown[0]}'; Hugging Face models accept: {', '.join(HF_OPTIONS)}"
        )
    transformers = _transformers()
    target = name[len(HF_PREFIX) :]
    if not target:
        raise ConfigError("model 'hf:' needs a hub id or a local folder, e.g. hf:google/vit-base-patch16-224")
    pretrained = bool(kwargs.get("pretrained", True))
    overrides = dict(kwargs.get("config") or {})
    local = not bool(kwargs.get("allow_download", False))
    folder = Path(target).expanduser()
    mapping = transformers.CONFIG_MAPPING
    try:
        if not pretrained and not folder.is_dir() and target in mapping:
            config = transformers.AutoConfig.for_model(target, **overrides)  # a fresh architecture
        else:
            config = transformers.AutoConfig.from_pretrained(target, local_files_only=local, **overrides)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "give an existing folder (save_pretrained) or a cached hub id, or set kwargs.allow_download: true"
            if local
            else "check the hub id"
        )
        raise ConfigError(f"model '{name}': cannot read its config ({first}); {hint}") from None
    channels = getattr(config, "num_channels", None)
    if not pretrained:
        if channels is not None and "num_channels" not in overrides:
            config.num_channels = channels = in_channels
        if input_size is not None and isinstance(getattr(config, "image_size", None), int):
            if "image_size" not in overrides and input_size[0] == input_size[1]:
                config.image_size = input_size[0]
    if channels is not None and channels != in_channels:
        raise ConfigError(
            f"model '{name}' takes {channels}-channel images but the data has {in_channels} channel(s); "
            "use a model for this data or set kwargs.config.num_channels with pretrained: false"
        )
    config.num_labels = num_classes
    auto = transformers.AutoModelForImageClassification
    try:
        if pretrained:
            network = auto.from_pretrained(target, config=config, local_files_only=local, ignore_mismatched_sizes=True)
        else:
            network = auto.from_config(config)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model '{name}': cannot load it as an image classifier ({first})") from None
    model = HFImageClassifier(network)
    config_dict = json.loads(network.config.to_json_string(use_diff=False))
    attach(model, kdforge_source={"kind": "hf", "spec": name, "kwargs": kwargs, "config": config_dict})
    return model


def rebuild_hf(config: Mapping[str, Any], name: str = "hf model") -> nn.Module:
    """The network of a recorded Hugging Face config (random weights; the model file's load next)."""
    transformers = _transformers()
    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"{name}: transformers {transformers.__version__} does not know model type {model_type!r}")
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(settings)
    model = HFImageClassifier(transformers.AutoModelForImageClassification.from_config(hf_config))
    attach(model, kdforge_source={"kind": "hf", "spec": name, "kwargs": {}, "config": dict(config)})
    return model


def _token_map(hidden: Tensor) -> Tensor:
    """B x L x D tokens -> B x D x s x s when the last s*s tokens are a square patch grid (the class
    and distillation tokens dropped); other shapes unchanged."""
    if hidden.dim() != 3:
        return hidden
    length = hidden.shape[1]
    for extra in (0, 1, 2):
        side = math.isqrt(max(length - extra, 0))
        if side > 0 and side * side == length - extra:
            grid = hidden[:, extra:, :]
            return grid.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
    return hidden


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier whose ``forward(x)`` returns the logits tensor.

    Feature points for kdforge's taps: ``stem`` (the embeddings' output) and ``stage1..stageK``
    (the output of each of the K blocks; transformer tokens reshaped to B x D x s x s maps when the
    patches form a square grid), ``pool`` (the classifier head's input when the model has a
    ``classifier`` module) and ``logits``. ``stageK_preact`` points to the same modules as
    ``stageK`` (transformer blocks have no separate pre-activation).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.hf = network
        config = network.config
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            depths = getattr(config, "depths", None)  # ResNet / ConvNeXt style: one state per stage
            blocks = len(depths) if isinstance(depths, (list, tuple)) else 0
        self.num_stages = int(blocks)
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(nn.Identity() for _ in range(self.num_stages))
        self.pool = nn.Identity()
        self.logits = nn.Identity()
        self._pool_input: Tensor | None = None
        head = getattr(network, "classifier", None)
        if isinstance(head, nn.Module):
            head.register_forward_pre_hook(self._remember_pool)
        stages = [f"stages.{i}" for i in range(self.num_stages)]
        self.feature_points = {"stem": "stem"}
        self.feature_points.update({f"stage{i + 1}": s for i, s in enumerate(stages)})
        self.feature_points.update({f"stage{i + 1}_preact": s for i, s in enumerate(stages)})
        self.feature_points.update(pool="pool", logits="logits")
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(network.forward).parameters

    def _remember_pool(self, module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            self._pool_input = args[0]

    @property
    def config(self) -> Any:
        return self.hf.config

    def forward(self, x: Tensor) -> Tensor:
        options: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        size = getattr(self.hf.config, "image_size", None)
        if self._interpolate and isinstance(size, int) and tuple(x.shape[-2:]) != (size, size):
            options["interpolate_pos_encoding"] = True
        out = self.hf(pixel_values=x, **options)
        hidden = list(out.hidden_states or ())
        if hidden:
            self.stem(_token_map(hidden[0]))
            for stage, state in zip(self.stages, hidden[1:]):
                stage(_token_map(state))
        if self._pool_input is not None:
            self.pool(self._pool_input)
            self._pool_input = None
        return self.logits(out.logits)


# ----------------------------------------------------------------------------- model files
def _user_code_loaded(source: Mapping[str, Any]) -> bool:
    if source.get("path"):
        return plugins.file_imported(source["path"])
    return str(source.get("module")) in sys.modules


def rebuild(
    saved: Mapping[str, Any],
    record: Mapping[str, Any],
    file: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int] | None,
    kwargs: Mapping[str, Any],
    explicit: bool = False,
    allow_code: bool | None = None,
) -> nn.Module | None:
    """The network of a model file's import or hf spec (None for a zoo network: ``create`` builds it).

    ``explicit``: the user named this spec themselves (a recipe's ``name:``), so its code may be
    imported. Otherwise user code must already be imported, or allowed (``--allow-model-code``):
    a model file never imports code by itself.
    """
    source = saved.get("source") or {}
    kind = source.get("kind") or spec_kind(str(saved.get("name") or ""))
    if kind == "zoo":
        return None
    if kind == "hf":
        if not source.get("config"):
            raise ConfigError(f"model file '{file}' names a Hugging Face model but does not record its config")
        return rebuild_hf(source["config"], str(saved.get("name")))
    allowed = plugins.model_code_allowed() if allow_code is None else allow_code
    path = source.get("path")
    target = path or source.get("module")
    attribute = source.get("callable")
    if not target or not attribute:
        target, attribute = split_import_spec(str(saved.get("name")))
    if not explicit and not allowed and not _user_code_loaded({"path": path, "module": target}):
        raise ConfigError(
            f"model file '{file}' holds a network built by user code ({saved.get('name')}), which is not "
            f"imported in this process; pass --import {target} (or --allow-model-code to import it)"
        )
    if path and not Path(path).is_file():
        raise ConfigError(f"model file '{file}' was built by {path}, which no longer exists; restore that file")
    module = _import(str(saved.get("name")), str(target))
    rebuilt = dict(source) if source else {"kind": "import", "spec": saved.get("name"), "callable": attribute}
    rebuilt["kwargs"] = dict(kwargs)
    return _call(
        module, str(attribute), str(saved.get("name")), num_classes, in_channels, input_size, dict(kwargs), rebuilt
    )


def canonical(name: str) -> str:
    """A spec with its file resolved to an absolute path (to compare specs written differently)."""
    if spec_kind(name) == "import":
        target, _, attribute = name.rpartition(":")
        if is_file_target(target) and Path(target).expanduser().is_file():
            return f"{Path(target).expanduser().resolve()}:{attribute}"
    if spec_kind(name) == "hf":
        folder = Path(name[len(HF_PREFIX) :]).expanduser()
        if folder.is_dir():
            return f"{HF_PREFIX}{folder.resolve()}"
    return name


def same_spec(a: str, b: str) -> bool:
    return a == b or canonical(a) == canonical(b)


def source_of(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model`` (None for networks kdforge did not build from a spec)."""
    source = getattr(model, "kdforge_source", None)
    return dict(source) if isinstance(source, dict) else None


__all__ = [
    "attach",
    "HFImageClassifier",
    "build",
    "build_hf",
    "canonical",
    "same_spec",
    "rebase_spec",
    "rebuild",
    "rebuild_hf",
    "source_of",
    "spec_kind",
    "split_import_spec",
]
