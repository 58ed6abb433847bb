"""Multi-stage work as a pipeline of ordinary runs.

A pipeline recipe has one key, ``pipeline:``, mapping stage names to ordinary recipes (which may
use ``base:``). Each stage trains into ``OUT/<stage>``; a string in a later stage may name an
earlier stage's run directory as ``{stage}``::

    pipeline:
      teacher: {base: teacher.yaml}
      student:
        base: student.yaml
        teachers: [{checkpoint: "{teacher}/checkpoints/model_last.pt"}]

Stages already finished are skipped, so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdforge.config import ConfigError, deep_merge, read_yaml
from kdforge.core.errors import closest
from kdforge.engine.runs import AnyConfig, build_any_config

_REFERENCE = re.compile(r"\{([A-Za-z0-9_\-]+)\}")


def is_pipeline(recipe: dict[str, Any]) -> bool:
    return "pipeline" in recipe


def stage_recipes(recipe: dict[str, Any], recipe_dir: Path) -> dict[str, dict[str, Any]]:
    stages = recipe.get("pipeline")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError("'pipeline' must map stage names to recipes (e.g. teacher: {base: teacher.yaml})")
    extra = set(recipe) - {"pipeline", "imports"}
    if extra:
        raise ConfigError(
            f"unknown key '{sorted(extra)[0]}' beside 'pipeline'; a pipeline recipe has only 'pipeline' "
            "(and 'imports', applied to every stage)"
        )
    shared_imports = recipe.get("imports") or []
    if isinstance(shared_imports, str):
        shared_imports = [shared_imports]
    if not (isinstance(shared_imports, list) and all(isinstance(i, str) for i in shared_imports)):
        raise ConfigError(f"bad value for 'imports': a list of module names or .py paths, got {shared_imports!r}")
    resolved = {}
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            raise ConfigError(f"pipeline stage '{name}' must be a recipe mapping")
        stage = dict(stage)
        base = stage.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"pipeline stage '{name}': 'base' must be the path of a recipe, got {base!r}")
        try:
            resolved[name] = deep_merge(read_yaml(recipe_dir / base), stage) if base else stage
        except ConfigError as exc:
            raise ConfigError(f"pipeline stage '{name}': {exc}") from None
        resolved[name].setdefault("name", name)
        if shared_imports:
            own = resolved[name].get("imports") or []
            own = [own] if isinstance(own, str) else own if isinstance(own, list) else [own]
            resolved[name]["imports"] = shared_imports + [i for i in own if i not in shared_imports]
    return resolved


def _substitute(value: Any, run_dirs: dict[str, Path], stage: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            ref = match.group(1)
            if ref not in run_dirs:
                raise ConfigError(
                    f"pipeline stage '{stage}' refers to '{{{ref}}}', which is not an earlier stage "
                    f"(earlier: {', '.join(run_dirs) or 'none'})"
                )
            return str(run_dirs[ref])

        return _REFERENCE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dirs, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, run_dirs, stage) for v in value]
    return value


def run_pipeline(
    recipe: dict[str, Any],
    recipe_dir: Path,
    out_dir: Path,
    overrides: list[str],
    train: Callable[..., dict[str, Any]],
    only: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the stages in order with ``train(config, out_dir, resume)``; returns their summaries.

    ``overrides`` apply to every stage; write ``stage:key.path=value`` to target one stage.
    """
    configs = validate_pipeline(recipe, recipe_dir, out_dir, overrides, only)
    summaries: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        stage_dir = out_dir / name
        summary_path = stage_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            if summary.get("status") == "finished":
                summaries[name] = summary
                continue
        if only is not None and name not in only:
            continue
        summaries[name] = train(config, stage_dir, resume=(stage_dir / "checkpoints" / "state.pt").exists())
    return summaries


def validate_pipeline(
    recipe: dict[str, Any],
    recipe_dir: Path,
    out_dir: Path,
    overrides: list[str] = (),  # type: ignore[assignment]
    only: list[str] | None = None,
) -> dict[str, AnyConfig]:
    """Every stage's validated config, in order, before anything trains: a bad key in the last
    stage, an unknown ``{stage}`` reference or an override naming no stage fails at once, in one
    line that names the stage."""
    stages = stage_recipes(recipe, recipe_dir)
    unknown = [name for name in only or () if name not in stages]
    if unknown:
        raise ConfigError(f"no pipeline stage '{unknown[0]}'{closest(unknown[0], stages)}; stages: {', '.join(stages)}")
    run_dirs: dict[str, Path] = {}
    configs: dict[str, AnyConfig] = {}
    for name, stage in stages.items():
        stage_overrides = [_strip_stage(o) for o in overrides if _targets(o, name, stages)]
        try:
            configs[name] = build_any_config(_substitute(stage, run_dirs, name), stage_overrides)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(
                message if message.startswith("pipeline stage") else f"pipeline stage '{name}': {message}"
            ) from None
        run_dirs[name] = out_dir / name
    return configs


def _targets(override: str, stage: str, stages: dict) -> bool:
    head = override.split("=", 1)[0]
    if ":" in head:
        target = head.split(":", 1)[0]
        if target not in stages:
            raise ConfigError(f"override '{override}' names stage '{target}'; stages: {', '.join(stages)}")
        return target == stage
    return True


def _strip_stage(override: str) -> str:
    head, _, value = override.partition("=")
    return (head.split(":", 1)[1] if ":" in head else head) + "=" + value
