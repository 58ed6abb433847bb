"""Where registrations come from: kdforge's own files, installed plugins and the user's imports.

kdforge finds methods, models and datasets in three places, so that a new method or model is one
file and needs no edit anywhere else:

1. **Its own packages.** Every module of ``kdforge.methods`` (and of ``kdforge.models``) is
   imported when the package is (``import_submodules``); a new file registers itself with the
   ``@METHODS.register`` / ``@MODELS.register`` decorator when imported.
2. **Installed packages** that declare an entry point in one of the groups below, e.g. in the
   plugin's ``pyproject.toml``::

       [project.entry-points."kdforge.methods"]
       my_kd = "my_package.my_kd"            # a module whose import registers the method(s)
       # or: my_kd = "my_package.my_kd:MyKD"  # an object, registered under the entry point's name

   They are loaded the first time a registry is asked for a name (``Registry(..., group=...)``),
   in every process and every command (``train``, ``bench``, ``eval``, ``export``, ``list`` ...).
3. **The user's imports**: a recipe's ``imports:`` list or a command's ``--import`` flag names
   modules (``my_package.methods``) or Python files (``path/to/file.py``) to import before the
   recipe is validated. Loading code is always explicit: a model file never imports anything by
   itself; it records what its run imported so that an error can say what to pass.

A plugin that fails to import stops the command with one line naming the plugin and its package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from kdforge.core.errors import ConfigError

#: entry-point group of each registry kind
ENTRY_POINT_GROUPS = {
    "method": "kdforge.methods",
    "model": "kdforge.models",
    "dataset": "kdforge.datasets",
}

_FILE_MODULES: dict[Path, ModuleType] = {}
_ALLOW_MODEL_CODE = [False]


def allow_model_code(allowed: bool = True) -> None:
    """``--allow-model-code``: let model files import the user module or file that built their
    network (recorded in the file). Off by default: loading code is always explicit."""
    _ALLOW_MODEL_CODE[0] = bool(allowed)


def model_code_allowed() -> bool:
    return _ALLOW_MODEL_CODE[0]


def file_imported(path: str | Path) -> bool:
    """True when the ``.py`` file at ``path`` was imported by :func:`import_user_module`."""
    return Path(path).expanduser().resolve() in _FILE_MODULES


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of a package (its ``__path__``); returns their names."""
    names = []
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{package}.{info.name}")
        names.append(info.name)
    return names


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of ``group``, sorted by name (deterministic order)."""
    return sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name)


def load_entry_point(entry: importlib.metadata.EntryPoint) -> Any:
    """Import one plugin; a failure becomes one line naming the plugin and what to do."""
    try:
        return entry.load()
    except Exception as exc:  # any import-time error of third-party code
        package = getattr(getattr(entry, "dist", None), "name", None) or "its package"
        raise ConfigError(
            f"plugin '{entry.name}' ({entry.value}, entry point group '{entry.group}', from {package}) "
            f"failed to load: {type(exc).__name__}: {exc}; fix it or uninstall {package}"
        ) from None


def import_user_module(spec: str, base: str | Path | None = None) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path (relative to the working
    directory, else to ``base``). Importing the same file twice returns the first module, so its
    registrations are not repeated."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"imports: each entry must be a module name or a .py path, got {spec!r}")
    spec = spec.strip()
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        file = Path(spec).expanduser()
        if not file.is_absolute() and not file.is_file() and base is not None:
            file = Path(base) / file
        file = file.resolve()
        if not file.is_file():
            raise ConfigError(f"imports: file '{spec}' not found; give a path to a .py file or a module name")
        if file in _FILE_MODULES:
            return _FILE_MODULES[file]
        name = f"kdforge_user_{file.stem}_{zlib.crc32(str(file).encode()):08x}"
        module_spec = importlib.util.spec_from_file_location(name, file)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"imports: '{spec}' cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"imports: '{spec}' failed: {type(exc).__name__}: {exc}") from None
        _FILE_MODULES[file] = module
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"imports: cannot import '{spec}' ({exc}); install its package, add its folder to "
            "PYTHONPATH, or give the path of a .py file"
        ) from None
    except Exception as exc:
        raise ConfigError(f"imports: '{spec}' failed: {type(exc).__name__}: {exc}") from None


def import_all(specs: Iterable[str] | None, base: str | Path | None = None) -> None:
    """Import each entry of a recipe's ``imports:`` list (or of ``--import`` flags)."""
    if specs is None:
        return
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        import_user_module(spec, base)


def require_registered(registry: Any, name: str, record: dict[str, Any], source: str) -> None:
    """Before rebuilding a model file's network: when its architecture is not registered here but
    the run that wrote the file imported user code, say which ``--import`` to pass (a model file
    never imports code by itself)."""
    if name in registry:
        return
    imports = [str(i) for i in record.get("imports") or []]
    if imports:
        flags = " ".join(f"--import {i}" for i in imports)
        raise ConfigError(
            f"model file '{source}' holds a '{name}' network, which is not registered in this process; "
            f"the run that wrote it imported {', '.join(imports)}: pass {flags}"
        )


__all__ = [
    "ENTRY_POINT_GROUPS",
    "allow_model_code",
    "file_imported",
    "model_code_allowed",
    "entry_points",
    "import_all",
    "import_submodules",
    "import_user_module",
    "load_entry_point",
    "require_registered",
]
