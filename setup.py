"""Build step that pyproject.toml cannot say: the recipes in configs/ and the teacher checkpoints
that the suites name (benchmarks/teachers/) ship inside the wheel as kdforge/configs and
kdforge/benchmarks/teachers, keeping the layout that their relative paths
(``../../benchmarks/teachers/...``) expect. In the source tree they stay where they are; everything
else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"configs": ("*.yaml",), "benchmarks/teachers": ("*.pt", "*.md", "*.yaml", "*.json", "*.jsonl")}


class BuildPyWithRecipes(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # pip install -e: kdforge finds configs/ in the checkout
            return
        for folder, patterns in SHIPPED.items():
            source = ROOT / folder
            if not source.is_dir():  # an sdist without them: nothing to add
                continue
            for pattern in patterns:
                for file in source.rglob(pattern):
                    target = Path(self.build_lib) / "kdforge" / folder / file.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target)


setup(cmdclass={"build_py": BuildPyWithRecipes})
