"""The package list in pyproject.toml covers every import package of the source tree (a wheel built from it is whole)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_of_the_source_tree() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {name: REPO / path for name, path in setuptools.get("package-dir", {}).items()}
    folders.setdefault("perturbdiff_core", REPO / "perturbdiff_core")
    folders.setdefault("perturbdiff", REPO / "perturbdiff")  # the notebook API
    found = {
        ".".join((top, *init.parent.relative_to(root).parts))
        for top, root in folders.items()
        for init in root.rglob("__init__.py")
    }
    assert found, "no package found under the package folders"
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or a wheel leaves them out"
