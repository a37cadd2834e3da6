"""CONTRIBUTING.md's templates, one per plug-in group, run as written: each implements its group's
interface and passes its conformance kit (the template calls the kit itself)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from perturbdiff_core import testing
from perturbdiff_core.registry import GROUPS, _interface

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"

#: The kit each group's template must call.
KITS = {
    "kernels": "check_kernel",
    "embeddings": "check_embedding",
    "estimators": "check_estimator",
    "backends": "check_reduction",
    "schedules": "check_schedule",
    "denoisers": "check_denoiser",
    "encoders": "check_encoder",
    "predictors": "check_predictor",
}

pytestmark = pytest.mark.usefixtures("one_thread")


def templates() -> dict[str, str]:
    """Group (``kernels``, ...) -> the source of its ```python block marked ``# template: <group>``."""
    found: dict[str, str] = {}
    for block in re.findall(r"^```python\n(.*?)^```", CONTRIBUTING.read_text(), flags=re.S | re.M):
        marker = re.match(r"# template: (\S+)\n", block)
        if marker:
            assert marker.group(1) not in found, f"two templates for {marker.group(1)}"
            found[marker.group(1)] = block
    return found


def test_every_group_has_a_template() -> None:
    assert set(KITS) == {group.removeprefix("perturbdiff.") for group in GROUPS}
    assert set(templates()) == set(KITS)
    assert all(hasattr(testing, kit) for kit in KITS.values())


@pytest.mark.parametrize("group", sorted(KITS))
def test_the_template_passes_its_kit(group: str) -> None:
    source = templates()[group]
    assert re.search(rf"^{KITS[group]}\(", source, flags=re.M), f"the {group} template must call {KITS[group]}"
    module = f"contributing_template_{group}"
    namespace: dict = {"__name__": module}
    exec(compile(source, f"CONTRIBUTING.md (template: {group})", "exec"), namespace)  # runs the kit
    interface = _interface(f"perturbdiff.{group}")
    defined = [
        obj for obj in namespace.values() if inspect.isclass(obj) and obj.__module__ == module and issubclass(obj, interface)
    ]
    assert len(defined) == 1, f"the {group} template must define one {interface.__name__} subclass"
    assert not inspect.isabstract(defined[0])
