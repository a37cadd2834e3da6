"""``perturbdiff train / predict / run``: tiny happy paths and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import yaml
from test_cli import assert_one_line_error
from test_training import TINY_NET

from perturbdiff_core.cli import main
from perturbdiff_core.cli.commands.train import fit
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.runs.checkpoint import load_checkpoint
from perturbdiff_core.runs.training import TrainingInterrupted

BASELINES = ["control", "context_mean", "context_fold", "context_mixture", "linear", "random_train"]

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_model")
    synthetic_screen(600, 40, seed=3).write_h5ad(folder / "screen.h5ad")
    config = {
        "seed": 2,
        "data": {"path": str(folder / "screen.h5ad"), "cell_type_key": "cell_type", "set_size": 12},
        "split": {"kind": "holdout_combination", "holdout": ["A+B"], "val_fraction": 0.3},
        "model": {"ema_decay": 0.9},
        "train": {"steps": 4, "batch_size": 3, "lr": 0.003, "warmup_steps": 1, "log_every": 2, "val_every": 2,
                  "val_sampling_steps": 3, "checkpoint_every": 2, "device": "cpu"},
        "sample": {"steps": 4},
        "evaluate": {"max_cells": 60},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_then_predict(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = main(["train", str(config_file), "--out", str(run), "--quiet", "--set", TINY_NET, "seed=4", "--set", "train.steps=3"])
    assert code == 0, capsys.readouterr().err
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint.step == 3 and checkpoint.run_config.seed == 4 and checkpoint.run_config.name == "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3
    assert f"Trained 3 steps into {run}" in capsys.readouterr().err

    assert main(["predict", "--run", str(run), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    adata = ad.read_h5ad(run / "predictions_1.h5ad")  # a new file: never the run's own predictions.h5ad
    assert set(adata.obs.perturbation) == {"A+B", "control"}
    assert f"to {run / 'predictions_1.h5ad'}" in err

    code = main(["predict", "--run", str(run), "--device", "cpu", "--seed", "-1"])
    assert_one_line_error(code, capsys.readouterr().err, "--seed must be a non-negative integer, got -1")

    out = tmp_path / "other.h5ad"
    assert main(["predict", "--run", str(run), "--conditions", "C|t2", "--n-cells", "5", "--out", str(out), "--device", "cpu"]) == 0
    assert (ad.read_h5ad(out).obs.perturbation == "C").sum() == 5


@pytest.mark.slow
def test_run_trains_predicts_and_evaluates(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["run", str(config_file), "--out", str(run), "--quiet", "--set", TINY_NET]) == 0
    for name in ("config.yaml", "split.json", "checkpoints/last.pt", "train_log.csv", "predictions.h5ad", "metrics.csv", "report.html"):
        assert (run / name).is_file(), name
    assert not (run / ".perturbdiff.lock").exists()  # released at the end
    metrics = pd.read_csv(run / "metrics.csv")
    assert set(metrics.method) == {"model", *BASELINES}
    assert set(metrics.condition) == {"A+B|t1", "A+B|t2", "__all__"}  # the labels of split.json
    assert "beats the best baseline" in capsys.readouterr().out
    header = " ".join((run / "report.html").read_text().split())
    assert "anchor</dt><dd>none (auto: every test context was trained)" in header  # what auto resolved to, named
    assert "ensemble</dt><dd>context_mixture, weight 0.5, averaged into the mean change of 2 of 2" in header
    # A finished run resumed goes straight to prediction and evaluation.
    assert main(["run", str(config_file), "--out", str(run), "--quiet", "--resume", "--set", TINY_NET]) == 0


def test_run_says_what_it_does_in_plain_lines_when_stderr_is_a_file(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A summary before training, then a line per tenth of every long stage; no carriage returns."""
    assert main(["run", str(config_file), "--out", str(tmp_path / "run"), "--set", TINY_NET, "train.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    summary = [line for line in lines if line.split(" ", 1)[0] in ("data", "split", "model", "train")]
    assert [line.split()[0] for line in summary] == ["data", "split", "model", "train"], err
    assert summary[0].startswith("data   screen.h5ad: 600 cells, 40 genes")
    assert "holdout_combination: " in summary[1] and "1 test condition" not in summary[1]  # A+B in two cell types
    assert "held out: A+B -> A+B|t1, A+B|t2" in err
    assert summary[3].endswith("on cpu, training with 1 thread") and "4 steps x 3 sets of 12 cells" in summary[3]
    assert sum(line.startswith("training with") or "training with" in line for line in lines) == 1  # logged once
    for stage in ("preparing the data (screen.h5ad): done", "train: 4/4 steps (100%)", "predict (ControlBaseline): 2/2",
                  "evaluate (model): 2/2 conditions (100%)", "evaluate (random_train): 2/2", "writing report.html: done"):
        assert stage in err, stage
    assert len([line for line in lines if line.startswith("train: ")]) <= 10


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "{config}", "--set", "train.stepz=3"], ["train.stepz", "train.steps"]),
        (["train", "{config}", "--set", "trian.steps=3"], ["Unknown config key trian (did you mean 'train'?)"]),
        (["train", "{tmp}/absent.yaml"], ["No such config file"]),
        (["train", "{config}", "--set", "data.path=/nonexistent/x.h5ad"], ["No such file"]),
        (["train", "{config}", "--set", "train.steps=0"], ["train.steps"]),
        (["train", "{config}", "--out", "{tmp}/fresh", "--resume"], ["No checkpoint"]),
        (["predict", "--run", "{tmp}/nothing"], ["No run folder"]),
        (["predict", "--run", "{tmp}", "--device", "cpu"], ["No checkpoint"]),
        (["predict", "--run", "{tmp}", "--device", "cuda:99"], ["--device = 'cuda:99'", "cpu"]),
        (["train", "{config}", "--set", "seed=-1"], ["seed = -1 is out of range"]),
        (["train", "{config}", "--set", "train.device=cuda:99"], ["train.device = 'cuda:99'", "auto"]),
        (["run", "{config}", "--set", "split.holdout=[Q+R]"], ["Q+R"]),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], fragments: list[str], config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(config=config_file, tmp=tmp_path) for a in argv]
    if argv[0] in ("train", "run") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main([*argv, "--quiet"] if argv[0] != "predict" else argv)
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_corrupt_checkpoint_and_existing_run_are_one_line(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--quiet", "--set", TINY_NET, "train.steps=1"]) == 0
    capsys.readouterr()
    assert_one_line_error(main(["train", str(config_file), "--out", str(run), "--quiet"]), capsys.readouterr().err, "--resume")
    assert_one_line_error(
        main(["train", str(config_file), "--out", str(run), "--quiet", "--resume", "--set", "model.mmd_weight=0.5"]),
        capsys.readouterr().err,
        "model.mmd_weight",
    )
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(main(["predict", "--run", str(run), "--device", "cpu"]), capsys.readouterr().err, "corrupt")


def test_predict_never_replaces_the_runs_own_outputs(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["run", str(config_file), "--out", str(run), "--quiet", "--set", TINY_NET, "train.steps=1"]) == 0
    own = {name: (run / name).read_bytes() for name in ("predictions.h5ad", "metrics.csv", "report.html")}
    capsys.readouterr()
    for n in (1, 2):
        assert main(["predict", "--run", str(run), "--device", "cpu", "--seed", str(n)]) == 0
        assert f"to {run / f'predictions_{n}.h5ad'}" in capsys.readouterr().err
    for name in ("predictions.h5ad", "metrics.csv", "config.yaml"):
        code = main(["predict", "--run", str(run), "--device", "cpu", "--out", str(run / name)])
        assert_one_line_error(code, capsys.readouterr().err, f"would replace the run's own {name}")
    code = main(["predict", "--run", str(run), "--device", "cpu", "--out", str(run / "checkpoints" / "x.h5ad")])
    assert_one_line_error(code, capsys.readouterr().err, "lies in the run's own checkpoints folder")
    code = main(["predict", "--run", str(run), "--device", "cpu", "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "is a folder; give the name of a file")
    assert {name: (run / name).read_bytes() for name in own} == own


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "{config}", "--out", "{file}"], ["{file} is a file, not a folder"]),
        (["run", "{config}", "--out", "{file}/run"], ["Cannot write {file}/run: {file} is a file, not a folder"]),
        (["train", "{tmp}"], ["{tmp} is a folder, not a config file"]),
        (["etest", "{data}", "--permutations", "9", "--out", "{tmp}"], ["{tmp} is a folder; give the name of a file"]),
        (["etest", "{data}", "--permutations", "9", "--out", "{file}/r.csv"], ["{file} is a file, not a folder"]),
    ],
)
def test_paths_that_cannot_be_written_are_one_line(
    argv: list[str], fragments: list[str], config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {"config": config_file, "tmp": tmp_path, "file": tmp_path / "afile", "data": config_file.parent / "screen.h5ad"}
    (tmp_path / "afile").write_text("not a folder")
    code = main([a.format(**names) for a in argv] + (["--quiet"] if argv[0] in ("train", "run") else []))
    assert_one_line_error(code, capsys.readouterr().err, *(f.format(**names) for f in fragments))
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.kernel=rbf", "model.kernel_params={lengthscale: -1}"], "lengthscale must be a positive"),
        (["model.denoiser_params={size: huge}"], "huge"),
        (["data.encoder=onehto"], "did you mean 'onehot'"),
        (["model.schedule=cosin"], "did you mean 'cosine'"),
        (["split.holdout=[Q+R]"], "Q+R"),
        (["--resume"], "No checkpoint"),
    ],
)
def test_a_refused_run_leaves_no_folder_behind(
    overrides: list[str], fragment: str, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "new" / "run"
    flags = [o for o in overrides if o.startswith("--")]
    sets = [o for o in overrides if not o.startswith("--")]
    code = main(["train", str(config_file), "--out", str(run), "--quiet", *flags, *(["--set", *sets] if sets else [])])
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not run.exists()


def test_plugins_are_checked_before_the_data_is_read(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_anndata = tmp_path / "plain.h5ad"
    not_anndata.write_bytes(b"not even HDF5")
    code = main(["train", str(config_file), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f"data.path={not_anndata}", "model.kernel=rbff"])
    assert_one_line_error(code, capsys.readouterr().err, "No plug-in named 'rbff'", "did you mean 'rbf'")


def test_a_misspelt_baseline_fails_before_training(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = main(["run", str(config_file), "--out", str(run), "--quiet", "--set", "evaluate.baselines=[contrl]"])
    assert_one_line_error(code, capsys.readouterr().err, "contrl")
    assert not run.exists()


def test_interruption_says_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted:
        run_dir = tmp_path / "run"

        def fit(self) -> None:
            raise TrainingInterrupted(3, self.run_dir / "checkpoints" / "last.pt")

    assert fit(Interrupted(), "run") == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "step 3" in lines[0] and f"perturbdiff run {tmp_path / 'run' / 'config.yaml'} --out {tmp_path / 'run'} --resume" in lines[0]


def test_an_interruption_after_training_says_how_to_predict_and_evaluate(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while run predicts or evaluates: training is saved whole, so the hint is --resume, which finishes."""
    from perturbdiff_core.runs import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "predict_all", interrupted)
        assert main(["run", str(config_file), "--out", str(run), "--quiet", "--set", TINY_NET]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after training finished; predict and evaluate with: perturbdiff run {run / 'config.yaml'} " \
           f"--out {run} --resume" in " ".join(err.split())
    assert main(["run", str(run / "config.yaml"), "--out", str(run), "--quiet", "--resume"]) == 0
    assert (run / "metrics.csv").is_file()
