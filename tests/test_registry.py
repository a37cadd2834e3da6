"""The entry-point registry: listing, lazy import, clear errors, broken plug-ins isolated.

Third-party plug-ins are simulated with a real (fake) installed distribution: a ``.dist-info``
folder with ``entry_points.txt`` on ``sys.path``, read by ``importlib.metadata`` as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from perturbdiff_core import registry
from perturbdiff_core.cli import main
from perturbdiff_core.errors import PerturbDiffError, PluginLoadError, UnknownPluginError
from perturbdiff_core.kernels import Kernel

KERNELS = "perturbdiff.kernels"

InstallFake = Callable[..., None]


@pytest.fixture
def install_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InstallFake]:
    """Install a fake distribution declaring ``entries`` in ``group``, plus optional module files."""

    def install(distribution: str, entries: dict[str, str], *, group: str = KERNELS, modules: dict[str, str] | None = None) -> None:
        info = tmp_path / f"{distribution.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0.1\n")
        lines = [f"[{group}]", *(f"{name} = {target}" for name, target in entries.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.refresh()

    yield install
    registry.refresh()  # monkeypatch then removes tmp_path from sys.path


def test_lists_builtin_plugins_with_distribution() -> None:
    infos = {info.name: info for info in registry.list_plugins(KERNELS)}
    assert {"rbf", "energy", "laplace"} <= set(infos)
    assert infos["rbf"].distribution == "perturbdiff"
    assert infos["rbf"].target == "perturbdiff_plugins.kernels:RBF"
    assert registry.names(KERNELS) == sorted(infos)


def test_listing_is_lazy(install_fake: InstallFake) -> None:
    install_fake(
        "perturbdiff-lazy-probe",
        {"lazy_probe": "perturbdiff_lazy_probe:Probe"},
        modules={"perturbdiff_lazy_probe": "raise RuntimeError('imported on listing')\n"},
    )
    infos = {info.name: info for info in registry.list_plugins(KERNELS)}
    assert infos["lazy_probe"].distribution == "perturbdiff-lazy-probe"
    assert "perturbdiff_lazy_probe" not in sys.modules
    assert "imported on listing" in infos["lazy_probe"].describe()  # describing does import


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownPluginError) as err:
        registry.load(KERNELS, "rbff")
    message = str(err.value)
    assert "'rbff'" in message and "rbf" in message and "energy" in message and "install" in message


def test_a_misspelt_name_gets_a_guess(install_fake: InstallFake) -> None:
    install_fake("perturbdiff-ratquad", {"ratquad": "perturbdiff_plugins.kernels:RBF"})
    with pytest.raises(UnknownPluginError, match=r"'ratqaud' in group 'perturbdiff.kernels' \(did you mean 'ratquad'\?\)"):
        registry.load(KERNELS, "ratqaud")
    with pytest.raises(UnknownPluginError) as err:
        registry.load(KERNELS, "zzzzzz")
    assert "did you mean" not in str(err.value)


def test_a_failing_constructor_names_the_plugin_and_its_distribution(install_fake: InstallFake) -> None:
    source = "from perturbdiff_plugins.kernels import RBF\nclass Bad(RBF):\n    def __init__(self, width=1.0):\n        raise ZeroDivisionError('oops')\n"
    install_fake("perturbdiff-bad-ctor", {"bad_ctor": "perturbdiff_bad_ctor:Bad"}, modules={"perturbdiff_bad_ctor": source})
    with pytest.raises(PluginLoadError) as err:
        registry.load(KERNELS, "bad_ctor", width=2.0)
    message = str(err.value)
    assert "'bad_ctor' (perturbdiff.kernels) from perturbdiff-bad-ctor" in message
    assert "width=2.0" in message and "ZeroDivisionError: oops" in message
    assert isinstance(err.value, PerturbDiffError)


def test_unknown_group_lists_groups() -> None:
    with pytest.raises(UnknownPluginError, match="perturbdiff.kernels"):
        registry.list_plugins("perturbdiff.kernel")


def test_misspelled_parameter_shows_signature() -> None:
    with pytest.raises(UnknownPluginError, match="lengthscale"):
        registry.load(KERNELS, "rbf", lenghtscale=2.0)


def test_broken_plugin_is_reported_and_isolated(install_fake: InstallFake, capsys: pytest.CaptureFixture[str]) -> None:
    install_fake("perturbdiff-broken-example", {"broken": "perturbdiff_no_such_module_xyz:Kernel"})
    with pytest.raises(PluginLoadError) as err:
        registry.load(KERNELS, "broken")
    message = str(err.value)
    assert "perturbdiff-broken-example" in message and "perturbdiff_no_such_module_xyz" in message
    assert "Reinstall" in message
    assert {"broken", "rbf"} <= set(registry.names(KERNELS))
    assert isinstance(registry.load(KERNELS, "rbf"), Kernel)
    broken = next(info for info in registry.list_plugins(KERNELS) if info.name == "broken")
    assert broken.describe().startswith("BROKEN:")

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "BROKEN" in out and "perturbdiff-broken-example" in out
    assert "rbf" in out and "Gaussian kernel" in out
    for group in registry.GROUPS:
        assert group in out


def test_interface_check_rejects_non_kernel(install_fake: InstallFake) -> None:
    install_fake("perturbdiff-wrong-type", {"not_a_kernel": "fractions:Fraction", "wrong_factory": "os:getcwd"})
    with pytest.raises(PluginLoadError, match="not a Kernel subclass"):
        registry.load(KERNELS, "not_a_kernel")
    with pytest.raises(PluginLoadError, match="built a str, not a Kernel"):
        registry.load(KERNELS, "wrong_factory")


def test_resolve_passes_instances_and_rejects_other_types() -> None:
    kernel = registry.load(KERNELS, "energy", beta=1.5)
    assert registry.resolve(KERNELS, kernel) is kernel
    with pytest.raises(UnknownPluginError, match="already built"):
        registry.resolve(KERNELS, kernel, beta=2.0)
    with pytest.raises(UnknownPluginError, match="Expected a plug-in name"):
        registry.resolve(KERNELS, 3.0)
