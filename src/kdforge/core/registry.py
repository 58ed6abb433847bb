"""A small name -> factory registry shared by models, methods and datasets."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from kdforge.core.errors import ConfigError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; registration is a decorator so adding a file adds an entry.

    >>> models = Registry("model")
    >>> @models.register("tiny")
    ... def tiny(num_classes=10): ...
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        #: entry-point group of installed plugins, loaded at the first lookup (kdforge.core.plugins)
        self.group = group
        self._plugins_loaded = group is None
        self._entries: dict[str, Callable[..., T]] = {}

    def load_plugins(self) -> None:
        """Import the installed plugins of this registry's entry-point group, once.

        An entry point naming a module registers through the module's decorators; one naming an
        object that is not registered yet is registered under the entry point's name.
        """
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # before loading: a plugin's own lookups must not recurse
        from kdforge.core.plugins import entry_points, load_entry_point

        for entry in entry_points(self.group or ""):
            loaded = load_entry_point(entry)
            if (
                callable(loaded)
                and not inspect.ismodule(loaded)
                and not any(loaded is f for f in self._entries.values())
            ):
                self.register(entry.name)(loaded)

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(factory, "name", None) or factory.__name__
            if key in self._entries and self._entries[key] is not factory:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{closest(name, self._entries)}; "
                f"available: {', '.join(sorted(self._entries))}"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def describe(self, name: str) -> str:
        """First line of the factory's docstring (used by `kdforge list`)."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)
