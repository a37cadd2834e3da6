"""RunConfig: defaults <- YAML <- --set overrides, strict keys and types, data path resolution, bundled examples."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from perturbdiff_core.ablation.grid import read_grid
from perturbdiff_core.cli.commands.train import add_run_arguments
from perturbdiff_core.configuration import read_yaml
from perturbdiff_core.data.anndata_io import DATA_ENV
from perturbdiff_core.errors import ConfigError, DataError, PerturbDiffDeprecationWarning
from perturbdiff_core.mmd.estimators import as_estimator
from perturbdiff_core.runs.config import (
    RunConfig,
    config_from_dict,
    differences,
    load_config,
    resolve_data_path,
    run_dir_for,
    write_config,
)
from perturbdiff_core.suite.spec import read_suite

#: The bundled run configurations (examples/ also holds other kinds of YAML, e.g. ablation grids).
EXAMPLES = [
    Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"
    for name in ("kang18_holdout_celltype", "norman19_holdout_combination", "norman19_holdout_glioma")
]
#: Every YAML file under examples/: run configs, ablation grids, suites.
ALL_EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml"))


def write(tmp_path: Path, values: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_follow_the_issue() -> None:
    config = load_config(None)
    assert config == RunConfig()
    model = config.model
    assert (model.denoiser, model.denoiser_params, model.schedule, model.kernel, model.estimator) == (
        "cross_dit", {"size": "tiny"}, "cosine", "energy", "unbiased"
    )
    assert (model.mmd_weight, model.prediction, model.self_condition_prob, model.cond_drop_prob, model.ema_decay) == (
        1.0, "x0", 0.5, 0.1, 0.999
    )
    assert (config.sample.sampler, config.sample.steps, config.sample.eta, config.sample.guidance) == ("ddim", 50, 0.0, 1.0)
    assert config.evaluate.baselines == ["control", "context_mean", "context_fold", "context_mixture", "linear", "random_train"]
    assert config.train.num_workers == "auto" and load_config(None, ["train.num_workers=2"]).train.num_workers == 2


def test_yaml_then_overrides_win_and_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path, {"seed": 3, "train": {"steps": 10, "lr": 0.01}, "data": {"batch_key": "donor"}})
    config = load_config(path, ["train.steps=20", "split.holdout=[k562]", "data.batch_key=null", "model.kernel=rbf"])
    assert config.name == "exp" and config.seed == 3
    assert config.train.steps == 20 and config.train.lr == 0.01  # YAML kept where not overridden
    assert config.split.holdout == ["k562"] and config.data.batch_key is None and config.model.kernel == "rbf"
    assert config.train.batch_size == RunConfig().train.batch_size  # default kept


def test_set_takes_several_pairs_per_flag_and_repeats(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["cfg.yaml", "--set", "seed=1", "train.steps=7", "--set", "model.estimator=biased"])
    assert args.overrides == ["seed=1", "train.steps=7", "model.estimator=biased"]
    config = load_config(write(tmp_path, {}), args.overrides)
    assert (config.seed, config.train.steps, config.model.estimator) == (1, 7, "biased")


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["train.stepz=3"], ["train.stepz", "train.steps"]),  # unknown key lists the valid ones
        (["modle.kernel=rbf"], ["modle", "model"]),
        (["train.steps=many"], ["train.steps", "int"]),
        (["train.steps=0"], ["train.steps", "at least 1"]),
        (["model.prediction=noise"], ["model.prediction", "x0"]),
        (["train.grad_clip=-1.0"], ["train.grad_clip = -1.0", "a number > 0 or null"]),
        (["train.grad_clip=abc"], ["train.grad_clip", "float or null"]),
        (["train.num_workers=many"], ["train.num_workers", "int or 'auto'"]),
        (["train.num_workers=-1"], ["train.num_workers = -1", "an integer >= 0 or 'auto'"]),
        (["split.kind=sideways"], ["split.kind", "holdout_cell_type"]),
        (["sample.eta=3"], ["sample.eta = 3.0 is out of range; set sample.eta to a number in [0, 1]."]),
        (["seed=-1"], ["seed = -1 is out of range; set seed to an integer >= 0."]),
        (["split.seed=-2"], ["split.seed = -2 is out of range", "an integer >= 0"]),  # found before training, not when sampling
        (["data.max_missing_genes=2"], ["data.max_missing_genes = 2.0", "a number in [0, 1]"]),
        (["data.min_cells_per_condition=0"], ["data.min_cells_per_condition = 0", "an integer > 0"]),
        (["seed"], ["key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {}), overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_written_config_reads_back_equal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"train": {"steps": 5}, "split": {"holdout": ["a", "b"]}}), ["model.ema_decay=null"])
    path = write_config(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert config_from_dict(read_yaml(path)) == config
    assert differences(config.to_dict(), config.to_dict()) == []
    other = load_config(path, ["train.lr=0.5", "split.holdout=[a]"])
    assert differences(config.to_dict(), other.to_dict()) == ["split.holdout", "train.lr"]


def test_run_dir_defaults_to_runs_and_config_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {}, "kang.yaml"))
    assert run_dir_for(config, None) == Path("runs") / "kang"
    assert run_dir_for(config, tmp_path / "x") == tmp_path / "x"


def test_relative_data_path_falls_back_to_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "screen.h5ad").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(folder))
    assert resolve_data_path("../shared/data/screen.h5ad") == str((folder / "screen.h5ad").resolve())
    assert resolve_data_path("data/screen.h5ad") == str((folder / "screen.h5ad").resolve())  # exists as given
    with pytest.raises(DataError) as err:
        resolve_data_path("../shared/data/absent.h5ad")
    assert DATA_ENV in str(err.value) and "absent.h5ad" in str(err.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_bundled_examples_load_and_find_their_data(path: Path, shared_data: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem
    resolved = resolve_data_path(config.data.path)
    assert Path(resolved).parent == shared_data.resolve()


def test_bundled_examples_exist() -> None:
    assert all(path.is_file() for path in EXAMPLES)


# ------------------------------------------------------ a plug-in's parameters follow its name

BASE = {
    "model": {"denoiser": "cross_dit", "denoiser_params": {"size": "tiny"}, "kernel": "rbf", "kernel_params": {"lengthscale": 2.0}},
    "data": {"encoder": "onehot", "encoder_params": {}},
}


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["model.denoiser=deepsets"], "denoiser_params", {}),  # reset: {size: tiny} was cross_dit's
        (["model.denoiser=deepsets", "model.denoiser_params={hidden: 32}"], "denoiser_params", {"hidden": 32}),
        (["model.denoiser=deepsets", "model.denoiser_params.hidden=32"], "denoiser_params", {"hidden": 32}),
        (["model.denoiser=cross_dit"], "denoiser_params", {"size": "tiny"}),  # the same name: kept
        (["model.denoiser_params={}"], "denoiser_params", {}),  # an empty mapping clears
        (["model.denoiser_params.hidden=32"], "denoiser_params", {"size": "tiny", "hidden": 32}),  # merged
        (["model.kernel=laplace"], "kernel_params", {}),
        (["model.kernel=laplace", "model.kernel_params.lengthscale=3.0"], "kernel_params", {"lengthscale": 3.0}),
        (["model.kernel_params={}"], "kernel_params", {}),
    ],
)
def test_changing_a_plugin_with_set_resets_its_parameters(tmp_path: Path, overrides: list[str], key: str, expected: dict) -> None:
    config = load_config(write(tmp_path, BASE), overrides)
    assert getattr(config.model, key) == expected


def test_every_plugin_key_with_parameters_is_reset(tmp_path: Path) -> None:
    from perturbdiff_core.runs.config import plugin_params_keys

    assert plugin_params_keys() == {
        "data.encoder": "data.encoder_params",
        "model.denoiser": "model.denoiser_params",
        "model.schedule": "model.schedule_params",
        "model.kernel": "model.kernel_params",
        "model.estimator": "model.estimator_params",
    }
    base = {
        "model": {"schedule": "linear", "schedule_params": {"num_steps": 1000}, "estimator": "unbiased", "estimator_params": {"backend": "chunked"}},
        "data": {"encoder": "lookup", "encoder_params": {"path": "table.csv"}},
    }
    config = load_config(write(tmp_path, base), ["model.schedule=cosine", "model.estimator=biased", "data.encoder=onehot"])
    assert (config.model.schedule_params, config.model.estimator_params, config.data.encoder_params) == ({}, {}, {})


def test_a_plugin_named_without_parameters_gets_none(tmp_path: Path) -> None:
    """The default {size: tiny} belongs to the default denoiser, whether the name comes from YAML or --set."""
    assert load_config(write(tmp_path, {"model": {"denoiser": "deepsets"}})).model.denoiser_params == {}
    assert load_config(None, ["model.denoiser=deepsets"]).model.denoiser_params == {}
    assert load_config(None).model.denoiser_params == {"size": "tiny"}
    assert load_config(None, ["model.denoiser=cross_dit"]).model.denoiser_params == {"size": "tiny"}


PLAIN_DENOISER = """
import torch
from perturbdiff_core.diffusion.denoisers import Denoiser

class Plain(Denoiser):
    '''A per-cell linear map: no size presets.'''

    def __init__(self, num_genes, perturbation_dim, num_cell_types=1, num_batches=1, width=4):
        super().__init__(num_genes, perturbation_dim, num_cell_types, num_batches)
        self.width = width
        self.linear = torch.nn.Linear(num_genes, num_genes)

    def forward(self, x_t, t, cond, self_cond=None):
        return self.linear(x_t)

    def config(self):
        return {**self.data_config(), "width": self.width}
"""


def test_a_third_party_denoiser_replaces_the_bundled_one_with_set(install_fake: Callable[..., None]) -> None:
    from perturbdiff_core.runs.training import check_plugins

    install_fake("perturbdiff-plain", {"plain": "perturbdiff_plain:Plain"}, group="perturbdiff.denoisers", modules={"perturbdiff_plain": PLAIN_DENOISER})
    config = load_config(EXAMPLES[0], ["model.denoiser=plain"])  # the bundled config gives {size: tiny}
    assert config.model.denoiser_params == {}
    check_plugins(config)  # builds it: before, Plain got size='tiny' and failed
    config = load_config(EXAMPLES[0], ["model.denoiser=plain", "model.denoiser_params.width=8"])
    assert config.model.denoiser_params == {"width": 8}
    check_plugins(config)


def test_suite_and_grid_layers_reset_the_parameters_too(tmp_path: Path) -> None:
    from perturbdiff_core.ablation.grid import read_grid
    from perturbdiff_core.runs.config import override
    from perturbdiff_core.suite.spec import read_suite

    assert override(BASE, {"model": {"denoiser": "deepsets"}})["model"]["denoiser_params"] == {}
    write(tmp_path, BASE, "base.yaml")
    grid = write(tmp_path, {"base": "base.yaml", "set": {"model.denoiser": "deepsets"}, "grid": {"seed": [0, 1]}}, "grid.yaml")
    assert read_grid(grid).base["model"]["denoiser_params"] == {}
    assert read_grid(grid, ["model.denoiser_params.hidden=8"]).base["model"]["denoiser_params"] == {"hidden": 8}
    suite = write(tmp_path, {"tasks": [{"name": "a", "config": "base.yaml", "set": {"model.denoiser": "deepsets"}}]}, "suite.yaml")
    assert read_suite(suite).tasks[0].values["model"]["denoiser_params"] == {}


def _configs_of(path: Path) -> list[RunConfig]:
    """The run configs a bundled YAML file stands for: itself, an ablation grid's cells or a suite's runs."""
    raw = read_yaml(path)
    if "grid" in raw:
        return [cell.config for cell in read_grid(path).cells()]
    if "tasks" in raw:
        return [run.config for run in read_suite(path).runs()]
    return [load_config(path)]


@pytest.fixture
def data_with_replicates(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder with the shared files and the file ``scripts/k562_replicates.py`` derives from them
    (``examples/suite_replicates.yaml`` reads it), made ``$PERTURBDIFF_DATA``."""
    import anndata as ad

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    from k562_replicates import OUT, SOURCE, k562_replicates

    folder = tmp_path / "data"
    folder.mkdir()
    for file in shared_data.glob("*.h5ad"):
        (folder / file.name).symlink_to(file)
    k562_replicates(ad.read_h5ad(shared_data / SOURCE)).write_h5ad(folder / OUT.name)
    monkeypatch.setenv(DATA_ENV, str(folder))
    return folder


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=[p.stem for p in ALL_EXAMPLES])
def test_bundled_yaml_uses_no_deprecated_spelling(path: Path, data_with_replicates: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerturbDiffDeprecationWarning)
        for config in _configs_of(path):  # grids and suites build each cell's plug-ins; build the estimator for all
            as_estimator(config.model.estimator, **config.model.estimator_params)
