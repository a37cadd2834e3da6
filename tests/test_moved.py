"""Module paths from before the layered layout still import: the same objects, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import perturbdiff_core
from perturbdiff_core._moved import MOVED


def forget(old: str) -> None:
    """Undo an earlier import of ``old`` in this process, so importing it goes through the finder again."""
    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        del sys.modules[name]
    parent, _, child = old.rpartition(".")
    if parent in sys.modules and child in vars(sys.modules[parent]):
        delattr(sys.modules[parent], child)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_imports_the_same_module_and_names_the_new_one(old: str) -> None:
    old_path, new_path = f"perturbdiff_core.{old}", f"perturbdiff_core.{MOVED[old]}"
    forget(old_path)
    with pytest.warns(DeprecationWarning, match=rf"{old_path} moved to {new_path}\b"):
        module = importlib.import_module(old_path)
    assert module is importlib.import_module(new_path)
    assert module.__name__ == new_path and module.__spec__.name == new_path  # the module keeps its own identity


def test_documented_imports_give_the_same_classes() -> None:
    for old in ("kernels", "schedules", "denoisers", "encoders", "estimators", "embeddings", "reductions", "predictors"):
        forget(f"perturbdiff_core.{old}")
    with pytest.warns(DeprecationWarning, match="perturbdiff_core.kernels moved to perturbdiff_core.mmd.kernels"):
        from perturbdiff_core.kernels import Kernel, RadialKernel
    with pytest.warns(DeprecationWarning, match="perturbdiff_core.schedules moved"):
        from perturbdiff_core.schedules import NoiseSchedule
    with pytest.warns(DeprecationWarning, match="perturbdiff_core.denoisers moved"):
        from perturbdiff_core import denoisers
    with pytest.warns(DeprecationWarning, match="perturbdiff_core.predictors moved"):
        from perturbdiff_core.predictors import Predictor
    from perturbdiff_core.diffusion.denoisers import Denoiser
    from perturbdiff_core.diffusion.schedules import NoiseSchedule as NewSchedule
    from perturbdiff_core.evaluation.predictors import Predictor as NewPredictor
    from perturbdiff_core.mmd.kernels import Kernel as NewKernel
    from perturbdiff_core.mmd.kernels import RadialKernel as NewRadial

    assert (Kernel, RadialKernel, NoiseSchedule, denoisers.Denoiser, Predictor) == (
        NewKernel, NewRadial, NewSchedule, Denoiser, NewPredictor,
    )
    assert perturbdiff_core.Kernel is NewKernel  # the package's own export is current


def test_a_moved_package_carries_its_submodules() -> None:
    forget("perturbdiff_core.commands")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("perturbdiff_core.commands.train")
    assert [str(w.message).split(";")[0] for w in caught] == [
        "perturbdiff_core.commands moved to perturbdiff_core.cli.commands",
        "perturbdiff_core.commands.train moved to perturbdiff_core.cli.commands.train",
    ]
    assert old is importlib.import_module("perturbdiff_core.cli.commands.train")


def test_the_model_names_of_the_old_diffusion_module() -> None:
    import perturbdiff_core.diffusion
    from perturbdiff_core.diffusion.model import RKHSDiffusion

    vars(perturbdiff_core.diffusion).pop("RKHSDiffusion", None)  # forwarded once already, in this process
    with pytest.warns(DeprecationWarning, match="perturbdiff_core.diffusion.RKHSDiffusion moved to perturbdiff_core.diffusion.model"):
        from perturbdiff_core.diffusion import RKHSDiffusion as old
    assert old is RKHSDiffusion
    with pytest.raises(ImportError):
        from perturbdiff_core.diffusion import no_such_name  # noqa: F401


def test_the_warning_points_at_the_importing_line(tmp_path) -> None:
    """Python shows a DeprecationWarning by default only where __main__ triggers it: the warning must be
    attributed to the user's import, not to the import machinery."""
    script = tmp_path / "user.py"
    script.write_text("from perturbdiff_core.kernels import Kernel\nfrom perturbdiff_core.diffusion import null_condition\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    lines = [line for line in done.stderr.splitlines() if "DeprecationWarning" in line]
    assert [line.split(": DeprecationWarning")[0] for line in lines] == [f"{script}:1", f"{script}:2"], done.stderr


def test_current_paths_do_not_warn() -> None:
    code = (
        "import warnings; warnings.simplefilter('error'); "
        "import perturbdiff_core.mmd.kernels, perturbdiff_core.diffusion.schedules, perturbdiff_core.runs.training, "
        "perturbdiff_core.cli.commands.train, perturbdiff_core.testing, perturbdiff_plugins.kernels; "
        "from perturbdiff_core.diffusion import schedules, model"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_path_still_fails() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("perturbdiff_core.no_such_module")


def test_the_evaluated_condition_is_named_apart_from_the_data_condition() -> None:
    """The metrics' condition was renamed EvaluatedCondition; the old name still works with a warning, from
    both modules that exported it."""
    from perturbdiff_core.data.dataset import Condition
    from perturbdiff_core.errors import PerturbDiffDeprecationWarning
    from perturbdiff_core.evaluation import EvaluatedCondition

    assert EvaluatedCondition is not Condition
    with pytest.warns(PerturbDiffDeprecationWarning, match="renamed EvaluatedCondition"):
        from perturbdiff_core.evaluation.paired import Condition as old_paired
    with pytest.warns(PerturbDiffDeprecationWarning, match="renamed EvaluatedCondition"):
        from perturbdiff_core.evaluation import Condition as old_package
    assert old_paired is old_package is EvaluatedCondition
    assert EvaluatedCondition("stimulated", "B").name == "stimulated|B"
