"""PluginSpec (registry) and constructor-argument capture (perturbdiff_core.arguments): one spec of a
plug-in shared by the config, the ablation grid, the model and the checkpoints; ``config()`` written once."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from perturbdiff_core.arguments import CapturesArguments
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.registry import PluginSpec, load, names

DENOISER_DIMS = {"num_genes": 5, "perturbation_dim": 2, "num_cell_types": 2, "num_batches": 3}


class Base(CapturesArguments):
    def __init__(self, a: int, b: float = 2.0) -> None:
        self.a, self.b = a, b


class Child(Base):
    def __init__(self, a: int, c: str = "x", *, d: int = 4, **extra: Any) -> None:
        super().__init__(a, b=float(d))
        self.c, self.extra = c, extra


class OwnConfig(Base):
    def config(self) -> dict[str, Any]:
        return {"a": self.a, "mine": True}


def test_capture_names_positional_keyword_and_default_arguments() -> None:
    assert Base(1).config() == {"a": 1, "b": 2.0}
    assert Base(1, 3.0).config() == {"a": 1, "b": 3.0}
    assert Child(7, "y", d=5, e=6).config() == {"a": 7, "c": "y", "d": 5, "e": 6}  # the outermost call, **extra spread
    assert type(Child(7, "y", d=5, e=6))(**Child(7, "y", d=5, e=6).config()).config() == {"a": 7, "c": "y", "d": 5, "e": 6}


def test_a_subclass_with_its_own_config_wins() -> None:
    assert OwnConfig(1).config() == {"a": 1, "mine": True}


def test_wrong_arguments_are_reported_by_the_constructor_itself() -> None:
    with pytest.raises(TypeError, match="a"):
        Base()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("given", "spec"),
    [
        ("rbf", PluginSpec("rbf")),
        ("perturbdiff:rbf", PluginSpec("perturbdiff:rbf")),
        ({"name": "rbf", "lengthscale": 2.0}, PluginSpec("rbf", {"lengthscale": 2.0})),
        (PluginSpec("energy"), PluginSpec("energy")),
    ],
)
def test_from_any_reads_names_mappings_and_specs(given: Any, spec: PluginSpec) -> None:
    assert PluginSpec.from_any(given) == spec
    assert PluginSpec.from_any(spec.to_dict()) == spec


def test_from_any_refuses_a_mapping_without_a_name() -> None:
    with pytest.raises(ConfigError, match=r"model.kernel must be a plug-in name or a mapping with a 'name' key"):
        PluginSpec.from_any({"lengthscale": 2.0}, where="model.kernel")


def test_a_loaded_plugin_carries_its_spec() -> None:
    kernel = PluginSpec("rbf", {"lengthscale": 2.0}).build("perturbdiff.kernels")
    assert kernel.plugin_spec == PluginSpec("rbf", {"lengthscale": 2.0})
    assert load("perturbdiff.kernels", "perturbdiff:rbf").plugin_spec.name == "perturbdiff:rbf"  # the name as given


@pytest.mark.parametrize("name", names("perturbdiff.schedules"))
def test_every_builtin_schedule_round_trips_through_its_spec(name: str) -> None:
    schedule = load("perturbdiff.schedules", name, num_steps=100)
    spec = PluginSpec(name, schedule.config())
    assert spec.params["num_steps"] == 100
    rebuilt = PluginSpec.from_any(yaml.safe_load(yaml.safe_dump(spec.to_dict()))).build("perturbdiff.schedules")
    assert rebuilt.config() == schedule.config() and type(rebuilt) is type(schedule)


@pytest.mark.parametrize("name", names("perturbdiff.denoisers"))
def test_every_builtin_denoiser_round_trips_through_its_spec(name: str) -> None:
    net = load("perturbdiff.denoisers", name, **DENOISER_DIMS, size="tiny")
    config = net.config()
    assert {k: config[k] for k in DENOISER_DIMS} == DENOISER_DIMS and "templates" not in config
    assert all(value is not None for value in config.values())  # a preset's sizes are named, not None
    rebuilt = PluginSpec.from_any(yaml.safe_load(yaml.safe_dump(PluginSpec(name, config).to_dict()))).build("perturbdiff.denoisers")
    assert rebuilt.config() == config
    assert load("perturbdiff.denoisers", name, **DENOISER_DIMS, size="tiny", templates=True).config()["templates"] is True


def test_builtin_configs_are_those_older_checkpoints_stored() -> None:
    """The content the hand-written config() methods gave, which saved checkpoints hold."""
    assert load("perturbdiff.denoisers", "cross_dit", **DENOISER_DIMS, size="tiny").config() == {
        **DENOISER_DIMS, "size": "tiny", "hidden": 64, "depth": 2, "heads": 4, "mlp_ratio": 4.0
    }
    assert load("perturbdiff.denoisers", "deepsets", **DENOISER_DIMS, size="tiny", hidden=40).config() == {
        **DENOISER_DIMS, "size": "tiny", "hidden": 40, "depth": 2
    }
    assert load("perturbdiff.schedules", "power_cosine", num_steps=10).config() == {
        "num_steps": 10, "power": 2.0, "s": 0.008, "max_beta": 0.999
    }


def test_a_model_configuration_saved_by_the_hand_written_config_methods_rebuilds_unchanged() -> None:
    from perturbdiff_core.diffusion.model import RKHSDiffusion

    saved = {  # the model_config of a checkpoint written before the capture (a default run's)
        "denoiser": {"name": "cross_dit", **DENOISER_DIMS, "size": "tiny", "hidden": 64, "depth": 2, "heads": 4,
                     "mlp_ratio": 4.0, "templates": True},
        "schedule": {"name": "cosine", "num_steps": 1000, "s": 0.008, "max_beta": 0.999},
        "kernel": {"name": "energy"},
        "estimator": {"name": "unbiased"},
        "mmd_weight": 1.0,
        "prediction": "x0",
        "self_condition_prob": 0.5,
        "cond_drop_prob": 0.1,
        "ema_decay": 0.999,
        "relative_to_control": True,
        "origin": "cell",
    }
    assert RKHSDiffusion.from_config(saved).config() == saved
