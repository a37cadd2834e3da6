"""The layers of docs/architecture.md: a module never imports a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "perturbdiff_core"

#: From the bottom up, as in docs/architecture.md; a module's layer is its first folder under
#: perturbdiff_core, or its name for a top-level module.
LAYERS: list[set[str]] = [
    {
        "__init__", "_lazy", "_moved", "errors", "names", "io", "progress", "threads", "registry", "configuration",
        "constraints", "arguments", "validation", "docstrings",
    },
    {"data"},
    {"mmd"},
    {"diffusion"},
    {"evaluation"},
    {"testing"},
    {"runs"},
    {"ablation"},
    {"suite"},
    {"cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """``perturbdiff_core.mmd.kernels`` -> ``mmd``; ``perturbdiff_core`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """Every perturbdiff_core module a file imports (in functions too), with its line; ``name`` is the
    file's module name (by default from its path)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if name == "perturbdiff_core":  # the facade: its lazy (PEP 562) re-exports are named for type checkers only
        skipped = {
            id(inner)
            for node in tree.body
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from . import x`` may import a submodule: judge by the submodule's layer
            targets = [f"{target}.{alias.name}" for alias in node.names] if target == "perturbdiff_core" else [target]
            found += [(node.lineno, t) for t in targets]
    return sorted((line, t) for line, t in found if t == "perturbdiff_core" or t.startswith("perturbdiff_core."))


def upward(path: Path, name: str | None = None) -> list[str]:
    """The imports of a file into a layer above its own."""
    name = name or module_name(path)
    mine = layer(name)
    return [
        f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line} ({mine}) imports {target} ({layer(target)})"
        for line, target in imported(path, name)
        if layer(target) in RANK and RANK[layer(target)] > RANK[mine]
    ]


def test_every_module_has_a_layer() -> None:
    unknown = sorted({layer(module_name(p)) for p in CORE.rglob("*.py")} - set(RANK))
    assert not unknown, f"give {unknown} a layer in docs/architecture.md and in LAYERS here"


def test_no_layer_imports_a_layer_above_it() -> None:
    found = [line for path in sorted(CORE.rglob("*.py")) for line in upward(path)]
    assert not found, "imports against the layers of docs/architecture.md:\n" + "\n".join(found)


def test_the_layers_here_are_those_of_the_architecture_page() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    for names in LAYERS[1:]:
        for name in names - {"__main__"}:
            assert f"`{name}" in page, f"docs/architecture.md does not name the layer {name}"


def test_the_check_sees_upward_imports_absolute_relative_and_in_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ..errors import ConfigError\n"  # down: fine
        "from ..runs.training import Trainer\n"
        "def f():\n    import perturbdiff_core.cli\n"
        "from .. import runs\n"
    )
    found = upward(probe, "perturbdiff_core.data.probe")
    assert [entry.split(" imports ")[1] for entry in found] == [
        "perturbdiff_core.runs.training (runs)",
        "perturbdiff_core.cli (cli)",
        "perturbdiff_core.runs (runs)",
    ]


def test_plugins_import_only_the_interfaces_and_the_foundation() -> None:
    """The bundled plug-ins are written as a third party would: against data, mmd, diffusion, evaluation."""
    highest = RANK["evaluation"]
    found = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path in sorted((REPO / "plugins").rglob("*.py"))
        for line, target in imported(path, f"perturbdiff_plugins.{path.stem}")
        if RANK.get(layer(target), len(LAYERS)) > highest
    ]
    assert not found, "plug-ins importing orchestration:\n" + "\n".join(found)
