"""Packaging facts that drift silently: the version is defined once, the license is declared once."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import kdforge

ROOT = Path(__file__).resolve().parents[1]


def test_installed_version_is_the_package_version():
    # pyproject.toml reads the version from kdforge.__version__; an installed copy built from an
    # older tree (or a static version added back to pyproject) would disagree here.
    assert importlib.metadata.version("kdforge") == kdforge.__version__


def test_pyproject_has_no_second_version():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "define the version only in src/kdforge/__init__.py"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kdforge.__version__"}


def test_license_declared_and_shipped():
    assert importlib.metadata.metadata("kdforge")["License-Expression"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
