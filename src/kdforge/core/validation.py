"""Pydantic's validation errors as one line: the key path, what is wrong, what is allowed.

Used by the recipe loader (:mod:`kdforge.config`) and by methods that validate their own
parameters (:mod:`kdforge.methods.online`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

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
    first = error.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "config"
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) or []
        hint = closest(str(loc[-1]), allowed)
        return f"unknown key '{path}'{hint}; allowed here: {', '.join(allowed)}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = first["msg"].removeprefix("Value error, ")
    return f"bad value for '{path}': {message}{shown}"
