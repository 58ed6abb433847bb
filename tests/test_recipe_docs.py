"""docs/recipe-reference.md is generated from the config models and the methods' Params; it must be current."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from kdforge.config import RunConfig
from kdforge.report import recipe_docs
from kdforge.report.recipe_docs import builtin_methods

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "recipe-reference.md"


def test_recipe_reference_is_up_to_date():
    assert PAGE.read_text() == recipe_docs.render(), (
        "docs/recipe-reference.md is out of date: run `python -m kdforge.report.recipe_docs`"
    )


def _models(model: type[BaseModel], seen: set) -> set:
    seen.add(model)
    for field in model.model_fields.values():
        for nested in recipe_docs._models_in(field.annotation):
            if nested not in seen:
                _models(nested, seen)
    return seen


def test_every_recipe_key_has_a_meaning_and_every_method_a_section():
    missing = [
        f"{model.__name__}.{name}"
        for model in _models(RunConfig, set())
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert not missing, f"add a Field(description=...) in kdforge/config.py for {missing}"
    text = PAGE.read_text()
    for key in ("`train.loggers`", "`train.precision`", "`data.augment.crop_padding`", "`student.prune.amount`"):
        assert key in text
    for name in builtin_methods():
        assert f"### `{name}`" in text
    assert len(builtin_methods()) >= 27
    assert "| `method.temperature` | schedule | `4` |" in text  # kd's default, from its Params


def test_check_mode_fails_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "page.md"
    stale.write_text("old\n")
    assert recipe_docs.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert recipe_docs.main(["--out", str(stale)]) == 0
    assert recipe_docs.main(["--check", "--out", str(stale)]) == 0
