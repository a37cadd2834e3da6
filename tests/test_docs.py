"""The docs say what the code does: the generated reference pages are up to date and complete, the
run-folder page names every file a run writes, and the README's commands are valid as written."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
import typing
from pathlib import Path

import pandas as pd
import pytest
import yaml

from perturbdiff_core import names
from perturbdiff_core.cli import build_parser, main
from perturbdiff_core.cli.reference import (
    CONFIG_PAGE,
    METRICS_PAGE,
    config_fields,
    config_reference,
    metrics_reference,
    sections,
)
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.evaluation.definitions import DEFINITIONS

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "run .venv/bin/python scripts/make_docs.py and commit the result"


def test_the_config_reference_is_up_to_date() -> None:
    assert (ROOT / CONFIG_PAGE).read_text() == config_reference(), f"{CONFIG_PAGE} is stale: {REGENERATE}"


def test_the_metrics_page_is_up_to_date() -> None:
    assert (ROOT / METRICS_PAGE).read_text() == metrics_reference(), f"{METRICS_PAGE} is stale: {REGENERATE}"


def test_every_config_field_is_in_the_reference_with_a_description() -> None:
    page = (ROOT / CONFIG_PAGE).read_text()
    leaves = [
        f"{prefix}.{field.name}" if prefix else field.name
        for prefix, cls in sections()
        for field in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(typing.get_type_hints(cls)[field.name])
    ]
    assert len(leaves) > 70 and [key for key, *_ in config_fields()] == leaves
    undocumented = [key for key, _, _, text in config_fields() if not text.strip()]
    assert not undocumented, f"describe {undocumented} in the Attributes section of the config dataclass"
    assert all(f"| `{key}` |" in page for key in leaves)


def test_every_metric_is_on_the_metrics_page() -> None:
    page = (ROOT / METRICS_PAGE).read_text()
    assert all(f"| `{name}` |" in page for name in DEFINITIONS)


def test_the_run_folder_page_names_every_file_a_run_writes() -> None:
    page = (ROOT / "docs" / "run_folder.md").read_text()
    files = [
        names.CONFIG_FILE, names.SPLIT_FILE, names.STATE_FILE, names.LOCK_FILE, names.LOG_FILE, names.PREDICTIONS_FILE,
        names.METRICS_FILE, names.REPORT_FILE, names.TRANSFER_FILE, f"{names.NEW_PREDICTIONS}_<n>.h5ad",
        f"{names.CHECKPOINT_DIR}/{names.LAST_CHECKPOINT}", f"{names.CHECKPOINT_DIR}/{names.PREVIOUS_CHECKPOINT}",
    ]
    assert [name for name in files if f"`{name}`" not in page] == []


def readme_commands() -> list[list[str]]:
    """The ``perturbdiff`` command lines of the README's bash blocks, as argument lists (env settings dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words = words[1:]
            if words and Path(words[0]).name == "perturbdiff":
                commands.append(words[1:])
    return commands


def test_the_readme_commands_parse() -> None:
    commands = readme_commands()
    assert {"run", "etest", "evaluate", "ablate"} <= {c[0] for c in commands}
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"the README's 'perturbdiff {' '.join(args)}' does not parse")


def bash_lines(text: str) -> list[str]:
    """The command lines of a text's bash blocks, comments dropped."""
    return [
        shlex.join(shlex.split(line, comments=True))
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if shlex.split(line, comments=True)
    ]


def test_ci_runs_the_readme_test_command_then_the_tests_it_leaves_out() -> None:
    """The first screen gives two commands, the second runs the quick tests; .ci/run runs exactly that, then
    the KeOps and slow tests, which together with the first step make the whole suite."""
    readme = (ROOT / "README.md").read_text()
    first = bash_lines(readme)[:2]
    assert first[0] == "bash scripts/quickstart.sh"
    quick = first[1]
    assert quick == shlex.join([".venv/bin/python", "-m", "pytest", "-q", "-m", "not keops and not slow"])
    ci = [shlex.join(shlex.split(line)) for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(".venv/bin/python -m pytest")]
    rest = shlex.join([".venv/bin/python", "-m", "pytest", "-q", "-m", "keops or slow"])
    assert ci == [quick, rest]
    assert rest in bash_lines(readme), "the README states the second step too"
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in markers} >= {"keops", "slow"}


@pytest.mark.usefixtures("one_thread")
def test_the_readme_evaluate_example_runs(tmp_path: Path, capsys) -> None:
    """On a tiny run in place of runs/kang18_holdout_celltype: the example needs no other key."""
    synthetic_screen(400, 30, seed=1).write_h5ad(tmp_path / "screen.h5ad")
    config = {
        "data": {"path": str(tmp_path / "screen.h5ad"), "cell_type_key": "cell_type", "set_size": 12},
        "split": {"kind": "holdout_combination", "holdout": ["A+B"]},
        "model": {"denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2}},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "val_every": 0, "device": "cpu"},
        "sample": {"steps": 2, "populations": 1},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "kang18_holdout_celltype"
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(run), "--quiet"]) == 0
    examples = [args for args in readme_commands() if args[0] == "evaluate" and "--run" in args]
    assert examples
    for args in examples:
        args = [a.replace("runs/kang18_holdout_celltype", str(run)) for a in args]
        assert main(args) == 0, capsys.readouterr().err
        written = pd.read_csv(run / "eval" / "metrics.csv")
        assert {"model", "control", "context_mean"} <= set(written.method)
        assert (run / "eval" / "report.html").is_file()
