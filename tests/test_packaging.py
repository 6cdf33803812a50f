"""The wheel holds every source package: setuptools installs only the packages pyproject.toml lists, so a new
subpackage (targets/kernels/, passes/moments/) left out of the list works in an editable checkout and is missing
from a real install."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_source_package_is_listed_for_the_wheel():
    config = _setuptools()
    roots = {"spc": ROOT / "spc", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert found == set(config["packages"])


def test_passes_and_targets_install_under_spc():
    config = _setuptools()
    assert config["package-dir"] == {"spc.passes": "passes", "spc.targets": "targets"}
    assert not {"passes", "targets"} & set(config["packages"])
