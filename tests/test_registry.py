"""The entry-point registry: listing, lazy import, clear errors, broken plug-ins isolated.

Third-party plug-ins are simulated with a real (fake) installed distribution: a ``.dist-info``
folder with ``entry_points.txt`` on ``sys.path``, read by ``importlib.metadata`` as usual (the
``install_fake`` fixture of conftest.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from perturbdiff_core import registry
from perturbdiff_core.cli import main
from perturbdiff_core.errors import PerturbDiffError, PluginLoadError, UnknownPluginError
from perturbdiff_core.mmd.kernels import Kernel

KERNELS = "perturbdiff.kernels"

InstallFake = Callable[..., None]  # the install_fake fixture (conftest.py)


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


# --------------------------------------------------------------------------- name collisions

IMPOSTOR = (
    "from perturbdiff_core.mmd.kernels import RadialKernel\n"
    "class Impostor(RadialKernel):\n"
    "    '''An impostor: twice the Gaussian kernel.'''\n"
    "    def profile(self, s):\n"
    "        return 2.0 * (-0.5 * s).exp()\n"
)


def test_a_builtin_name_registered_by_another_distribution_does_not_replace_it(
    install_fake: InstallFake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from perturbdiff_core import mmd2
    from perturbdiff_core.errors import PerturbDiffWarning
    from perturbdiff_plugins.kernels import RBF

    # the fake comes first on sys.path: before, it won by directory order
    install_fake("perturbdiff-impostor", {"rbf": "perturbdiff_impostor:Impostor"}, modules={"perturbdiff_impostor": IMPOSTOR})
    with pytest.warns(PerturbDiffWarning) as caught:
        kernel = registry.load(KERNELS, "rbf", lengthscale=1.5)
    assert type(kernel) is RBF
    (warning,) = [w for w in caught if issubclass(w.category, PerturbDiffWarning)]
    message = str(warning.message)
    assert "\n" not in message
    assert "'rbf'" in message and "perturbdiff-impostor" in message and "perturbdiff-impostor:rbf" in message

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process, not at every use
        assert type(registry.load(KERNELS, "rbf")) is RBF
        assert type(registry.load(KERNELS, "perturbdiff:rbf")) is RBF
        impostor = registry.load(KERNELS, "perturbdiff-impostor:rbf", lengthscale=1.5)
        assert type(impostor).__name__ == "Impostor"
        assert type(registry.load(KERNELS, "Perturbdiff_Impostor:rbf")).__name__ == "Impostor"  # PEP 503 spelling

    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(15, 3, dtype=torch.float64) + 0.5
    builtin = mmd2(x, y, kernel=RBF(lengthscale=1.5), estimator="biased")
    assert mmd2(x, y, kernel="rbf", estimator="biased", lengthscale=1.5) == builtin
    other = mmd2(x, y, kernel="perturbdiff-impostor:rbf", estimator="biased", lengthscale=1.5)
    torch.testing.assert_close(other, 2.0 * builtin)

    assert registry.names(KERNELS).count("rbf") == 1
    (chosen,) = [info for info in registry.list_plugins(KERNELS) if info.name == "rbf"]
    assert (chosen.distribution, chosen.others, chosen.chosen) == ("perturbdiff", ("perturbdiff-impostor",), True)
    both = [info for info in registry.list_plugins(KERNELS, all_distributions=True) if info.name == "rbf"]
    assert [(i.distribution, i.chosen) for i in both] == [("perturbdiff", True), ("perturbdiff-impostor", False)]
    assert both[1].version == "0.0.1" and both[1].describe().startswith("An impostor")
    assert registry.plugin_info(KERNELS, "rbf").distribution == "perturbdiff"
    assert registry.is_registered(KERNELS, "perturbdiff-impostor:rbf") and not registry.is_registered(KERNELS, "nope:rbf")

    with pytest.raises(UnknownPluginError, match=r"'nope'.*perturbdiff:rbf, perturbdiff-impostor:rbf"):
        registry.load(KERNELS, "nope:rbf")

    monkeypatch.setenv("COLUMNS", "300")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " rbf " in line]
    assert len(rows) == 2, out
    assert "perturbdiff-impostor" in rows[0] and "the built-in is used" in rows[0]
    assert "shadowed by the built-in; use perturbdiff-impostor:rbf" in rows[1]


def test_a_name_two_other_distributions_register_must_be_qualified(install_fake: InstallFake) -> None:
    install_fake("perturbdiff-first", {"twin": "perturbdiff_plugins.kernels:RBF"})
    install_fake("perturbdiff-second", {"twin": "perturbdiff_plugins.kernels:Laplace"})
    expected = r"'twin'.*perturbdiff-first 0.0.1, perturbdiff-second 0.0.1.*perturbdiff-first:twin or perturbdiff-second:twin"
    with pytest.raises(UnknownPluginError, match=expected):
        registry.load(KERNELS, "twin")
    assert type(registry.load(KERNELS, "perturbdiff-first:twin")).__name__ == "RBF"
    assert type(registry.load(KERNELS, "perturbdiff-second:twin")).__name__ == "Laplace"
    assert registry.is_registered(KERNELS, "twin")  # it exists; loading it says which names to use
    assert [i.chosen for i in registry.list_plugins(KERNELS, all_distributions=True) if i.name == "twin"] == [False, False]


def test_a_qualified_name_works_in_a_run_config(install_fake: InstallFake) -> None:
    from perturbdiff_core.runs.config import config_from_dict
    from perturbdiff_core.runs.training import PLACEHOLDER_SIZES, _model, check_plugins

    install_fake("perturbdiff-impostor", {"rbf": "perturbdiff_impostor:Impostor"}, modules={"perturbdiff_impostor": IMPOSTOR})
    config = config_from_dict({"model": {"kernel": "perturbdiff-impostor:rbf", "kernel_params": {"lengthscale": 2.0}}})
    check_plugins(config)  # what train and run do first
    model = _model(config.model, PLACEHOLDER_SIZES, "centred")
    assert type(model.kernel).__name__ == "Impostor"
    assert model.config()["kernel"]["name"] == "perturbdiff-impostor:rbf"  # what a checkpoint rebuilds it from


# ------------------------------------------------------------------- abstract plug-in classes

HALF_KERNEL = "from perturbdiff_core.mmd.kernels import Kernel\nclass Half(Kernel):\n    '''Forgot forward.'''\n"
HALF_SCHEDULE = (
    "from perturbdiff_core.diffusion.schedules import NoiseSchedule\n"
    "class Half(NoiseSchedule):\n"
    "    '''Implements alpha_bar, as an old CONTRIBUTING said, instead of betas.'''\n"
    "    def alpha_bar(self, t):\n"
    "        return 1.0 - t / self.num_steps\n"
)


def test_an_abstract_class_is_broken_not_healthy(
    install_fake: InstallFake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_fake("perturbdiff-half-kernel", {"half": "perturbdiff_half_kernel:Half"}, modules={"perturbdiff_half_kernel": HALF_KERNEL})
    install_fake(
        "perturbdiff-half-schedule",
        {"half": "perturbdiff_half_schedule:Half"},
        group="perturbdiff.schedules",
        modules={"perturbdiff_half_schedule": HALF_SCHEDULE},
    )
    with pytest.raises(PluginLoadError) as err:
        registry.load(KERNELS, "half")
    message = str(err.value)
    assert "'half' (perturbdiff.kernels) from perturbdiff-half-kernel" in message
    assert "abstract" in message and "does not implement forward" in message
    with pytest.raises(PluginLoadError, match=r"'half' \(perturbdiff.schedules\) from perturbdiff-half-schedule.*does not implement betas\. Implement it"):
        registry.load("perturbdiff.schedules", "half", num_steps=10)

    monkeypatch.setenv("COLUMNS", "400")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if "perturbdiff-half-schedule" in line]
    assert "BROKEN" in row and "does not implement betas" in row
