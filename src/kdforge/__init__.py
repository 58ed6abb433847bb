"""kdforge: knowledge distillation for PyTorch."""

__version__ = "0.1.0"  # the one definition: pyproject.toml reads it (tool.setuptools.dynamic)
