"""The recipes and suites shipped with kdforge, addressable by name.

``kdforge train cifar10/resnet20_resnet8`` and ``kdforge bench cifar10-lite`` work from any folder:
a name that is not an existing file is looked up among the packaged recipes (``configs/`` of the
source tree, installed as ``kdforge/configs`` in the wheel, beside the teacher checkpoints the
suites name as ``../../benchmarks/teachers/...``, installed as ``kdforge/benchmarks/teachers``).
Relative ``base:``, ``imports:`` and checkpoint paths inside a recipe are read against the
recipe's own folder, so they keep working wherever the file lives.
"""

from __future__ import annotations

from pathlib import Path

from kdforge.core.errors import ConfigError, closest

SUITES = "suites"


def recipe_roots() -> list[Path]:
    """Folders holding packaged recipes: ``kdforge/configs`` (a wheel), then ``configs/`` of a
    source checkout (an editable install)."""
    package = Path(__file__).resolve().parents[1]
    roots = [package / "configs"]
    if package.parent.name == "src":
        roots.append(package.parent.parent / "configs")
    return [root for root in roots if root.is_dir()]


def _names(kind: str) -> dict[str, Path]:
    """name -> file, for ``kind`` "recipes" (runnable recipes outside suites/) or "suites"."""
    found: dict[str, Path] = {}
    for root in recipe_roots():
        for file in sorted(root.rglob("*.yaml")):
            relative = file.relative_to(root).with_suffix("")
            in_suites = relative.parts[0] == SUITES
            if kind == SUITES and in_suites:
                found.setdefault("/".join(relative.parts[1:]), file)
            elif kind != SUITES and not in_suites and _runnable(file):
                found.setdefault(relative.as_posix(), file)
    return found


def _runnable(file: Path) -> bool:
    """A recipe names a student or a pipeline; files that only hold shared settings (base.yaml) do not."""
    text = file.read_text()
    return any(line.startswith(("student:", "pipeline:")) for line in text.splitlines())


def packaged(kind: str = "recipes") -> dict[str, str]:
    """name -> the first comment line of the file (what ``kdforge list recipes|suites`` prints)."""
    listing = {}
    for name, file in sorted(_names(kind).items()):
        first = next((line for line in file.read_text().splitlines() if line.strip()), "")
        listing[name] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return listing


def find_recipe(text: str | Path, kind: str = "recipes") -> Path:
    """``text`` itself when it is a file, else the packaged recipe (or suite) of that name.

    ``cifar10/resnet20_resnet8``, ``cifar10/resnet20_resnet8.yaml`` and
    ``configs/cifar10/resnet20_resnet8.yaml`` (the source tree's path, from another folder) all
    name the same packaged recipe; suites are named without ``suites/`` (``cifar10-lite``).
    """
    path = Path(text)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name.removesuffix(".yaml").removesuffix(".yml")
    for prefix in ("./", "configs/", f"{SUITES}/"):
        if kind == SUITES or prefix != f"{SUITES}/":
            name = name.removeprefix(prefix)
    names = _names(kind)
    if name in names:
        return names[name]
    noun = "suite" if kind == SUITES else "recipe"
    listing = f"kdforge list {'suites' if kind == SUITES else 'recipes'}"
    raise ConfigError(
        f"{noun} '{text}' is neither a file nor a packaged {noun}{closest(name, names)}; "
        f"give a YAML path or one of the names `{listing}` prints"
    )
