"""``perturbdiff ablate``: grid expansion, one run per cell, resuming, the summary table, errors before any run."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from test_cli import assert_one_line_error

from perturbdiff_core.ablation import GridSpec, cell_dir, read_grid, runner, summary
from perturbdiff_core.cli import main
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError, OutputError, PerturbDiffError
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
RUN_CELL = runner.run_cell

#: A tiny run: two cell types x (A, B, C, A+B), A+B held out, a few steps of a small net.
BASE = {
    "data": {"cell_type_key": "cell_type", "set_size": 12},
    "split": {"kind": "holdout_combination", "holdout": ["A+B"], "val_fraction": 0.3},
    "model": {"denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2}, "ema_decay": 0.9},
    "train": {"steps": 8, "batch_size": 3, "lr": 0.003, "warmup_steps": 1, "log_every": 2, "val_every": 0,
              "checkpoint_every": 2, "device": "cpu"},
    "sample": {"steps": 3},
    "evaluate": {"baselines": ["control", "context_mean"], "max_cells": 60},
}

#: 2 kernels x 1 estimator x 2 seeds.
GRID = {
    "base": "base.yaml",
    "set": {"train.steps": 3, "sample.output_space": "continuous"},  # 3 steps decode to zeros on counts
    "grid": {
        "model.kernel": ["energy", {"label": "rbf", "name": "rbf", "lengthscale": "median"}],
        "model.estimator": ["unbiased"],
        "seed": [0, 1],
    },
    "metrics": ["pearson_delta", "mse", "mmd2_{kernel}"],
}

NAMES = [
    "kernel=energy__estimator=unbiased__seed=0",
    "kernel=energy__estimator=unbiased__seed=1",
    "kernel=rbf__estimator=unbiased__seed=0",
    "kernel=rbf__estimator=unbiased__seed=1",
]

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the synthetic screen and ``base.yaml`` pointing to it."""
    path = tmp_path_factory.mktemp("ablation")
    synthetic_screen(600, 40, seed=3).write_h5ad(path / "screen.h5ad")
    base = {**BASE, "data": {**BASE["data"], "path": str(path / "screen.h5ad")}}
    (path / "base.yaml").write_text(yaml.safe_dump(base))
    return path


def write_grid(folder: Path, grid: dict[str, Any], name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


class Calls:
    """Replaces ``ablation.runner.run_cell`` (what ``run_grid`` calls): records each cell run, runs it, raises at the cell named ``stop_at``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_at: str | None = None, run: bool = True) -> None:
        self.names: list[str] = []
        self.stop_at, self.run = stop_at, run
        monkeypatch.setattr(runner, "run_cell", self)

    def __call__(self, config: Any, folder: Path, *, progress: bool = True) -> pd.DataFrame:
        self.names.append(folder.name)
        if folder.name == self.stop_at:
            raise KeyboardInterrupt
        if not self.run:
            raise AssertionError(f"cell {folder.name} ran although the grid is invalid")
        return RUN_CELL(config, folder, progress=progress)


@pytest.fixture(scope="module")
def finished(folder: Path) -> tuple[Path, Path, list[str], str]:
    """The grid run once through the command line: (grid file, output folder, cells run, stdout)."""
    grid, out = write_grid(folder, GRID), folder / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        calls = Calls(monkeypatch)
        code = main(["ablate", str(grid), "--out", str(out), "--quiet"])
    assert code == 0
    return grid, out, calls.names, stdout.getvalue()


def test_cells_expand_in_product_order_with_their_configs(folder: Path) -> None:
    spec = read_grid(write_grid(folder, GRID))
    cells = spec.cells()
    assert [c.name for c in cells] == NAMES
    assert spec.summary_axes == ["kernel", "estimator"]
    rbf = cells[3].config
    assert (rbf.model.kernel, rbf.model.kernel_params, rbf.seed) == ("rbf", {"lengthscale": "median"}, 1)
    assert rbf.model.estimator == "unbiased"
    assert cells[0].config.model.kernel_params == {} and cells[0].config.seed == 0
    assert all(c.config.train.steps == 3 and c.config.train.batch_size == 3 for c in cells)  # set: over base
    assert all(c.config.name == c.name for c in cells)


def test_values_labels_set_and_exclude(folder: Path) -> None:
    grid = {
        "base": "base.yaml",
        "grid": {
            "model.kernel": [
                "energy",
                {"label": "rff", "name": "rbf", "lengthscale": "median",
                 "set": {"model.estimator": "embedding",
                         "model.estimator_params": {"embedding": "rff", "num_features": 64}}},
            ],
            "model.estimator": ["biased", "unbiased"],
            "model.mmd_weight": [0.5, {"value": 2, "label": "w2"}],
            "evaluate.kernel": ["energy"],
        },
        "exclude": [{"model.kernel": "rff", "model.estimator": "unbiased"}],
    }
    spec = read_grid(write_grid(folder, grid), ["train.steps=2"])
    assert [a.name for a in spec.axes] == ["model.kernel", "estimator", "mmd_weight", "evaluate.kernel"]
    cells = {c.name: c.config for c in spec.cells()}
    assert len(cells) == 6  # 2 x 2 x 2 minus rff x unbiased x 2
    rff = cells["model.kernel=rff__estimator=biased__mmd_weight=w2__evaluate.kernel=energy"]
    assert rff.model.estimator == "embedding" and rff.model.estimator_params == {"embedding": "rff", "num_features": 64}
    assert rff.model.mmd_weight == 2.0 and rff.train.steps == 2
    energy = cells["model.kernel=energy__estimator=unbiased__mmd_weight=0.5__evaluate.kernel=energy"]
    assert energy.model.estimator == "unbiased" and energy.model.estimator_params == {}
    assert energy.model.mmd_weight == 0.5


def test_grid_runs_every_cell_once_and_summarises_over_seeds(finished: tuple[Path, Path, list[str], str]) -> None:
    _, out, ran, stdout = finished
    assert ran == NAMES
    table = pd.read_csv(out / "ablation.csv")
    assert list(table.columns) == ["kernel", "estimator", "metric", "method", "mean", "std", "n_seeds"]
    # Independent reference: each cell's own metrics.csv, grouped with pandas.
    frames = []
    for name in NAMES:
        metrics = pd.read_csv(out / "cells" / name / "metrics.csv")
        kernel, estimator, seed = (part.split("=")[1] for part in name.split("__"))
        rows = metrics[metrics.condition == "__all__"]
        frames.append(rows.assign(kernel=kernel, estimator=estimator, seed=int(seed)))
    rows = pd.concat(frames)
    expected = rows.groupby(["kernel", "estimator", "metric", "method"])["value"].agg(["mean", "std", "count"])
    got = table.set_index(["kernel", "estimator", "metric", "method"]).sort_index()
    expected = expected.sort_index()
    assert got.index.equals(expected.index)
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["std"], expected["std"], rtol=1e-12, equal_nan=True)
    assert (got["n_seeds"] == expected["count"]).all()
    seeds_differ = got.loc[("rbf", "unbiased", "mse", "model"), "std"]
    assert seeds_differ > 0 and got.loc[("rbf", "unbiased", "mse", "model"), "n_seeds"] == 2
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(out / "cells.csv")) == len(rows)
    assert not list(out.glob(".*.tmp"))
    assert "pearson_delta" in stdout and "energy" in stdout and "\u00b1" in stdout
    model = got.xs("model", level="method")
    mean, sd = model.loc[("energy", "unbiased", "pearson_delta"), ["mean", "std"]]
    assert f"| energy | unbiased | {mean:.4g} \u00b1 {sd:.1g} |" in (out / "ablation.md").read_text()


def test_rerun_skips_finished_cells_and_resumes_interrupted_ones(
    finished: tuple[Path, Path, list[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    grid, original, _, _ = finished
    out = tmp_path / "out"
    shutil.copytree(original, out)
    (out / "cells" / NAMES[1] / "metrics.csv").unlink()  # trained, not evaluated: resumes from its checkpoint
    shutil.rmtree(out / "cells" / NAMES[2])  # never started
    (out / "ablation.csv").unlink()

    assert main(["ablate", str(grid), "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"resume  {NAMES[1]}" in err and f"new  {NAMES[2]}" in err and "(1 new, 1 resume, 2 done)" in err

    calls = Calls(monkeypatch, stop_at=NAMES[2])
    assert main(["ablate", str(grid), "--out", str(out), "--quiet"]) == 130  # Ctrl-C in the third cell
    assert "run the same command again" in capsys.readouterr().err
    assert calls.names == NAMES[1:3]
    assert (out / "cells" / NAMES[1] / "metrics.csv").is_file() and not (out / "ablation.csv").exists()

    calls = Calls(monkeypatch)
    assert main(["ablate", str(grid), "--out", str(out), "--quiet"]) == 0
    assert calls.names == [NAMES[2]]
    assert capsys.readouterr().err.count("done before, skipped") == 3
    again, first = pd.read_csv(out / "ablation.csv"), pd.read_csv(original / "ablation.csv")
    pd.testing.assert_frame_equal(again, first, rtol=1e-9)  # training and evaluation are seeded: same numbers


def test_a_cell_run_with_another_config_is_refused(
    finished: tuple[Path, Path, list[str], str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grid, out, _, _ = finished
    Calls(monkeypatch, run=False)
    code = main(["ablate", str(grid), "--out", str(out), "--set", "train.lr=0.01"])
    assert_one_line_error(code, capsys.readouterr().err, "train.lr", "--out")


def _grid(**changes: Any) -> dict[str, Any]:
    grid = {**GRID, "grid": dict(GRID["grid"])}
    for key, value in changes.items():
        if key.startswith("axis:"):
            grid["grid"][key[5:]] = value
        else:
            grid[key] = value
    return grid


@pytest.mark.parametrize(
    ("grid", "argv", "fragments"),
    [
        (_grid(**{"axis:model.kernal": ["rbf"]}), [], ["model.kernal", "model.kernel"]),
        (_grid(**{"axis:model.kernal": ["energy", {"label": "r", "name": "rbf"}]}), [],
         ["unknown config key model.kernal in grid: (did you mean 'model.kernel'?)"]),
        (_grid(**{"axis:model.kernel": ["energy", {"name": "rbf", "lengthscal": "median"}]}), [],
         ["kernel=rbf", "lengthscal"]),
        (_grid(**{"axis:model.kernel": ["energy", "rbff"]}), [], ["rbff", "matern32"]),
        (_grid(**{"axis:model.estimator": ["unbiased", "unbiased"]}), [], ["unbiased twice", "label"]),
        (_grid(**{"axis:model.mmd_weight": [[1, 2]]}), [], ["label:"]),
        (_grid(**{"axis:model.mmd_weight": [{"vlue": 1}]}), [], ["value:"]),
        (_grid(**{"axis:seed": []}), [], ["non-empty list"]),
        (_grid(exclude=[{"kernal": "rbf"}]), [], ["kernal", "kernel"]),
        (_grid(exclude=[{"kernel": "rbg"}]), [], ["kernel=rbg", "energy, rbf"]),
        (_grid(metrics=["pearson"]), [], ["pearson", "pearson_delta"]),
        (_grid(base="absent.yaml"), [], ["No such config file"]),
        (_grid(seeds=[0]), [], ["seeds", "base, set, grid"]),
        (GRID, ["--set", "seed=3"], ["seed is set by an axis"]),
        (GRID, ["--set", "model.kernel_params={lengthscale: 2}"], ["model.kernel_params", "axis"]),
        (_grid(**{"axis:model.estimator": ["unbiased", "rbf"]}), [], ["rbf", "perturbdiff.estimators"]),
        (_grid(**{"axis:model.kernel": ["energy", {"name": "energy", "beta": 5, "label": "e5"}]}), [],
         ["kernel=e5", "beta"]),
    ],
)
def test_bad_grids_fail_in_one_line_before_any_cell_runs(
    grid: dict[str, Any], argv: list[str], fragments: list[str], folder: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(folder, grid, name=f"bad_{tmp_path.name}.yaml")
    calls = Calls(monkeypatch, run=False)
    code = main(["ablate", str(path), "--out", str(tmp_path / "out"), *argv])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert calls.names == [] and not (tmp_path / "out").exists()


def test_identical_cells_need_an_exclude(folder: Path) -> None:
    grid = _grid(**{"axis:model.kernel": [
        "energy",
        {"label": "rff", "name": "rbf", "lengthscale": "median",
         "set": {"model.estimator": "embedding", "model.estimator_params": {"embedding": "rff", "num_features": 64}}},
    ], "axis:model.estimator": ["biased", "unbiased"]})
    with pytest.raises(ConfigError, match="same configuration.*exclude"):
        read_grid(write_grid(folder, grid, "dup.yaml")).cells()


def test_third_party_kernel_by_name(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(
        "perturbdiff_example_kernel", reason="the example plug-in examples/custom_kernel_plugin is not installed"
    )
    grid = _grid(**{"axis:model.kernel": [{"name": "rational_quadratic", "label": "rq"}], "axis:seed": [0]})
    out = tmp_path / "out"
    assert main(["ablate", str(write_grid(folder, grid, "rq.yaml")), "--out", str(out), "--quiet"]) == 0
    saved = yaml.safe_load((out / "cells" / "kernel=rq__estimator=unbiased__seed=0" / "config.yaml").read_text())
    assert saved["model"]["kernel"] == "rational_quadratic"
    table = pd.read_csv(out / "ablation.csv")
    assert set(table.kernel) == {"rq"} and (table.n_seeds <= 1).all() and table["std"].isna().all()
    assert "rq" in capsys.readouterr().out


def test_summary_files_are_written_atomically(
    finished: tuple[Path, Path, list[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid, original, _, _ = finished
    out = tmp_path / "out"
    shutil.copytree(original, out)
    (out / "ablation.png").unlink()
    spec: GridSpec = read_grid(grid)

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        Path(args[0]).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(summary.Figure, "savefig", broken)
    with pytest.raises(OutputError, match=r"Cannot write .*ablation.png: disk full"):  # one line, naming the file
        summary.summarize_grid(spec, spec.cells(), out)
    assert not (out / "ablation.png").exists() and not list(out.glob(".*.tmp"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "ablation.csv"), pd.read_csv(original / "ablation.csv"))


def test_bundled_kang18_grid_expands_to_30_valid_cells(kang18_path: Path) -> None:
    spec = read_grid(REPO / "examples" / "ablation_kang18.yaml")
    cells = spec.cells()
    assert len(cells) == 30
    assert {c.labels["kernel"] for c in cells} == {"energy", "rbf", "mixture", "matern32"}
    assert {c.config.model.estimator for c in cells} == {"biased", "unbiased", "embedding"}
    for cell in cells:
        model, estimator = cell.config.model, cell.labels["estimator"]
        if estimator.startswith("rff-"):  # random Fourier features of rbf, V- or U-statistic
            unbiased = {"unbiased": True} if estimator == "rff-unbiased" else {}
            assert (model.estimator, model.estimator_params) == ("embedding", {"embedding": "rff", "num_features": 512, **unbiased})
            assert model.kernel == "rbf" and model.kernel_params == {"lengthscale": "median"}
        else:
            assert (model.estimator, model.estimator_params) == (estimator, {})
    assert {c.config.split.holdout[0] for c in cells} == {"CD14+Mono"}


def test_bundled_tiny_width_grid_widens_only_the_tiny_denoiser_of_the_kang18_demo(kang18_path: Path) -> None:
    demo = load_config(REPO / "examples" / "kang18_holdout_celltype.yaml")
    cells = read_grid(REPO / "examples" / "ablation_tiny_width.yaml").cells()
    assert [(c.labels["hidden"], c.labels["seed"]) for c in cells] == [
        (h, s) for h in ("64", "128", "192") for s in ("0", "1", "2")
    ]
    for cell in cells:
        hidden, seed = int(cell.labels["hidden"]), int(cell.labels["seed"])
        assert cell.config.model.denoiser_params == {"size": "tiny", "hidden": hidden}
        assert cell.config.seed == seed
        assert Path(cell.config.data.path).name == Path(demo.data.path).name  # the grid resolves the path
        as_demo = replace(cell.config, name=demo.name, seed=demo.seed, data=replace(cell.config.data, path=demo.data.path),
                          model=replace(cell.config.model, denoiser_params=demo.model.denoiser_params))
        assert as_demo == demo  # nothing else differs from the demo


def test_a_failing_cell_stops_the_grid_in_one_line_naming_it(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def diverges(config: Any, cell_folder: Path, *, progress: bool = True) -> pd.DataFrame:
        raise PerturbDiffError("The training loss became nan at step 2; lower train.lr.")

    monkeypatch.setattr(runner, "run_cell", diverges)
    code = main(["ablate", str(write_grid(folder, GRID)), "--out", str(tmp_path / "out"), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, f"Cell {NAMES[0]} failed", "train.lr", "finished cells are kept")


def test_a_cell_another_run_holds_is_refused_naming_it(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two grids (or a grid and a suite) into one folder must not train the same cell at once."""
    out = tmp_path / "out"
    with RunFolder(cell_dir(out, read_grid(write_grid(folder, GRID)).cells()[0])):
        code = main(["ablate", str(write_grid(folder, GRID)), "--out", str(out), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, f"Cell {NAMES[0]} failed", "in use by another perturbdiff run", f"pid {os.getpid()}")


@pytest.mark.slow
def test_side_by_side_a_failing_cell_stops_the_grid_naming_it_and_the_running_ones_finish(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``--jobs 2`` the error of a cell in a worker process reaches the user as one line naming it, and the cell
    running beside it finishes and is kept."""
    out = tmp_path / "out"
    grid = {**GRID, "set": {**GRID["set"], "sample.steps": 2, "data.set_size": 8}, "grid": {**GRID["grid"], "seed": [0]}}
    cells = read_grid(write_grid(folder, grid, "jobs.yaml")).cells()
    with RunFolder(cell_dir(out, cells[0])):
        code = main(["ablate", str(write_grid(folder, grid, "jobs.yaml")), "--out", str(out), "--quiet", "--jobs", "2"])
    err = capsys.readouterr().err
    progress, error = err[: err.index("perturbdiff: error:")], err[err.index("perturbdiff: error:"):]
    assert_one_line_error(code, error, f"Cell {cells[0].name} failed", "in use by another perturbdiff run")
    assert "running 2 cells at a time" in progress and f"[2/2] {cells[1].name}: finished in" in progress
    assert "Traceback" not in progress
    assert (cell_dir(out, cells[1]) / "metrics.csv").is_file()


def test_a_cell_folder_written_before_a_config_key_existed_still_resumes(finished: tuple[Path, Path, list[str], str]) -> None:
    """A finished grid must not be refused because perturbdiff has since gained a config key (with its default)."""
    grid, out, _, _ = finished
    spec = read_grid(grid)
    saved = cell_dir(out, spec.cells()[0]) / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["data"]["min_cells_per_condition"]
    original = saved.read_text()
    try:
        saved.write_text(yaml.safe_dump(older))
        runner.check_folders(spec.cells(), out)  # no error
    finally:
        saved.write_text(original)
