"""What a wheel of batchlab carries: every declared data file exists, no module is left out, the license ships.

A wheel is built from ``pyproject.toml``'s declarations, not from the working tree, so a package
folder without ``__init__.py`` (``packages.find`` skips it), a ``package-data`` pattern that matches
nothing, or a missing license file only shows once someone installs the wheel. These checks read the
declarations and the tree; they build nothing (cheap on the CI machine).
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; the CI runs 3.11
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_package_data_patterns_each_match_a_file(project):
    declared = project["tool"]["setuptools"]["package-data"]
    for package, patterns in declared.items():
        folder = ROOT / package.replace(".", os.sep)
        for pattern in patterns:
            assert glob.glob(str(folder / pattern)), (
                f"package-data {package}: {pattern!r} matches no file under {folder}; "
                "remove the pattern or add the file"
            )


def test_every_package_folder_has_an_init():
    # setuptools' packages.find (not find_namespace) drops a folder of modules without __init__.py
    missing = []
    for folder, _dirs, files in os.walk(ROOT / "batchlab"):
        if "__pycache__" in folder:
            continue
        if any(name.endswith(".py") for name in files) and "__init__.py" not in files:
            missing.append(os.path.relpath(folder, ROOT))
    assert not missing, f"folders whose modules a wheel would leave out (add __init__.py): {missing}"


def test_license_file_ships_and_matches_the_declared_license(project):
    assert project["project"]["license"] == "Apache-2.0"
    files = project["project"]["license-files"]
    assert files, "declare license-files so that wheels and sdists carry the license text"
    for name in files:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0" in text, f"{name} is not the Apache-2.0 text"


def test_typed_marker_is_present(project):
    # PEP 561: type checkers read batchlab's annotations only when the marker is in the wheel
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["batchlab"]
    assert (ROOT / "batchlab" / "py.typed").is_file()
