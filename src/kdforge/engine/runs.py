"""One entry point for every kind of run a recipe can describe.

A recipe's optional top-level ``kind`` picks it: ``train`` (the default: a network trained by a
method, :mod:`kdforge.engine.trainer`), ``gan`` (a conditional GAN, :mod:`kdforge.engine.gan`) or
``generate`` (samples drawn from a trained GAN, processed by a teacher, :mod:`kdforge.engine.generate`).
Pipelines mix them: ``gan -> generate -> train`` is cGAN-KD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.config import ConfigError, RunConfig, apply_override, build_config, parse_override
from kdforge.core.errors import closest
from kdforge.engine.gan import GanRunConfig, GanTrainer, build_gan_config
from kdforge.engine.generate import GenerateConfig, build_generate_config, generate_run

KINDS = ("train", "gan", "generate")

AnyConfig = RunConfig | GanRunConfig | GenerateConfig


def build_any_config(recipe: dict[str, Any], overrides: list[str] = ()) -> AnyConfig:  # type: ignore[assignment]
    """Validate a recipe of any kind (after ``--set`` overrides); one ConfigError line otherwise."""
    kind = recipe.get("kind", "train")
    if kind not in KINDS:
        raise ConfigError(f"bad value for 'kind': '{kind}'{closest(str(kind), KINDS)}; kinds: {', '.join(KINDS)}")
    if kind == "train":
        data = {k: v for k, v in recipe.items() if k != "kind"}
        return build_config(data, overrides)
    import copy

    data = copy.deepcopy(recipe)
    for text in overrides:
        apply_override(data, *parse_override(text))
    return build_gan_config(data) if kind == "gan" else build_generate_config(data)


def run_any(config: AnyConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run a validated config of any kind into ``out_dir``; returns its summary."""
    if isinstance(config, GanRunConfig):
        return GanTrainer(config, out_dir, resume=resume).fit()
    if isinstance(config, GenerateConfig):
        return generate_run(config, out_dir, resume=resume)
    from kdforge.engine.trainer import Trainer

    return Trainer(config, out_dir, resume=resume).fit()
