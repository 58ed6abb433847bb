"""Pydantic's validation errors as one line: the key path, what is wrong, what is allowed.

Used by the recipe loader (:mod:`kdforge.config`) and by methods that validate their own
parameters (:mod:`kdforge.methods.online`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

from kdforge.core.errors import closest


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the model found by following ``loc`` through nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as ``list[ModelConfig]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validation_message(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """Turn pydantic's first error into one line: key path, problem, what is allowed."""
    errors = error.errors()
    # a union (``bool | AugmentConfig``) reports one error per branch: the deepest is the useful one
    tags = _model_names(model)
    first = max(errors, key=lambda e: len([p for p in e["loc"] if not _is_tag(p, tags)]))
    loc = tuple(p for p in first["loc"] if not _is_tag(p, tags))
    path = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "config"
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) or []
        hint = closest(str(loc[-1]), allowed)
        return f"unknown key '{path}'{hint}; allowed here: {', '.join(allowed)}"
    value = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, (int, float, str, type(None))) else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"bad value for '{path}': {message}{shown}".replace("\n", " ")


_TYPE_TAGS = {"bool", "int", "float", "str", "none", "list", "dict", "tuple", "set"}


def _is_tag(part: Any, models: set[str]) -> bool:
    """A union branch or validator tag in an error location (not a key of the recipe)."""
    if not isinstance(part, str):
        return False
    return (
        part.startswith(("function-", "literal[", "constrained-", "union[", "list[", "dict[", "tuple["))
        or part in _TYPE_TAGS
        or part in models
    )


def _model_names(model: Any, seen: set[str] | None = None) -> set[str]:
    """Class names of the models nested in ``model`` (pydantic tags union branches with them)."""
    import typing

    seen = set() if seen is None else seen
    if isinstance(model, type) and issubclass(model, BaseModel):
        if model.__name__ in seen:
            return seen
        seen.add(model.__name__)
        for field in model.model_fields.values():
            _model_names(field.annotation, seen)
        return seen
    for arg in typing.get_args(model) or ():
        _model_names(arg, seen)
    return seen


# --------------------------------------------------------------------------- strict scalars
def _scalar_kinds(annotation: Any) -> set[Any]:
    """The scalar types an annotation accepts (bool, int, float, str; a Literal's value types),
    'model' for nested models, 'container' for lists/tuples/dicts, 'other' for anything else."""
    import types
    import typing

    if annotation is type(None):
        return set()
    if annotation in (bool, int, float, str):
        return {annotation}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"model"}
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin is typing.Union or origin is types.UnionType:
        kinds: set[Any] = set()
        for arg in typing.get_args(annotation):
            kinds |= _scalar_kinds(arg)
        return kinds
    if origin is typing.Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict, set):
        return {"container"}  # not a scalar; its items are checked by strict_scalar
    return {"other"}


def strict_scalar(annotation: Any, value: Any) -> None:
    """Refuse the silent coercions of pydantic's lax mode that turn a typo into a setting:
    a boolean where a number is expected (``epochs: true`` would be 1 epoch), and a number or a
    string where a boolean is expected (``horizontal_flip: "yes"``). Raises ValueError."""
    items = _item_annotations(annotation, value)
    if items is not None:
        for item_annotation, item in items:
            strict_scalar(item_annotation, item)
        return
    kinds = _scalar_kinds(annotation)
    if "other" in kinds or not kinds or isinstance(value, (list, tuple, dict)):
        return
    if isinstance(value, bool):
        if bool not in kinds and (kinds & {int, float, str}):
            wanted = "a number" if kinds & {int, float} else "a string"
            raise ValueError(f"expected {wanted}, got a boolean")
        return
    if bool in kinds and not (kinds & {int, float, str}) and isinstance(value, (int, float, str)):
        raise ValueError("expected true or false")


def _item_annotations(annotation: Any, value: Any) -> list[tuple[Any, Any]] | None:
    """(annotation, item) pairs when ``value`` is a list checked against ``list[X]`` or ``tuple[X, ...]``
    (also inside ``X | None``); None otherwise."""
    import types
    import typing

    if not isinstance(value, (list, tuple)):
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _item_annotations(typing.get_args(annotation)[0], value)
    if origin is typing.Union or origin is types.UnionType:
        sequences = [a for a in typing.get_args(annotation) if typing.get_origin(a) in (list, tuple)]
        return _item_annotations(sequences[0], value) if len(sequences) == 1 else None
    args = typing.get_args(annotation)
    if origin is list and len(args) == 1:
        return [(args[0], item) for item in value]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return [(args[0], item) for item in value]
    if origin is tuple and len(args) == len(value):
        return list(zip(args, value))
    return None


def finite_numbers(value: Any) -> list[float]:
    """The numbers in a value: itself, a list's items, or a schedule's start and end."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in finite_numbers(item)]
    start = getattr(value, "start", None)
    if isinstance(start, (int, float)):
        end = getattr(value, "end", None)
        return [float(start)] + ([float(end)] if isinstance(end, (int, float)) else [])
    return []


class StrictScalars(BaseModel):
    """Base of kdforge's settings models (recipes, schedules, method hyperparameters): a field
    typed as a number takes no boolean (``epochs: true``), a boolean field only true/false, also
    inside lists (``strict_scalar``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            strict_scalar(field.annotation, value)
        return value
